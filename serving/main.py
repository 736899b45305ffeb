"""`python -m serving.main [--model M] ...`: load a model, compile its engine, serve the OpenAI API.

Start-up: bind the socket and listen on it first (a busy port fails at once), log
`listening on HOST:PORT; loading the model`, start uvicorn, and only once uvicorn serves the
socket load the model and compile or load the engine on a loader thread (both log their
progress); then print `Server ready on http://HOST:PORT (Press CTRL+C to quit)`.

A guarantee tools that start the server (tests, orchestrators) may rely on: from the moment the
"listening" line is written, connections to the port are accepted (they wait in the socket's
backlog until uvicorn takes them) and `/health` answers 503 (`model_loading`) until the engine is
ready, then 200. A connection is never refused between that line and shutdown.

Shutdown, on SIGINT or SIGTERM: new requests get 503 and the listening socket closes; the engine
stops taking requests and lets those in flight finish for up to --shutdown-timeout seconds, then
ends the rest, whose clients get an error answer; uvicorn waits until every response is sent, and
the process exits 0. A second SIGINT exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Generator, Sequence
from typing import TYPE_CHECKING, Any

import uvicorn

from graph.api import ArtifactMismatchError
from graph.multihost import follow as follow_steps
from graph.multihost import initialize as join_processes
from models.errors import ModelLoadError
from serving.app import build_app
from serving.config import ServerConfig, parse_args
from serving.state import ServerState

if TYPE_CHECKING:
    from graph.engine import Engine
    from graph.replicas import Replicas

log = logging.getLogger("serving.main")
BACKLOG = 2048  # uvicorn's default


class _Server(uvicorn.Server):
    """uvicorn, with signal handling that reports the signal and exits normally afterwards
    (uvicorn's own re-raises the signal once it has shut down, ending the process with it)."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit
        self.serving = asyncio.Event()  # set once uvicorn accepts connections on the socket

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.serving.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def handle_exit(self, sig: int, frame: Any) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        if first:
            log.info("received %s: finishing in-flight requests, then exiting", signal.Signals(sig).name)
            self._on_exit()


def load_engine(config: ServerConfig) -> Engine | Replicas:
    """Load the model and build its engine (compiling, or loading AOT executables), or start
    its replicas (`--replicas`)."""
    from graph.engine import Engine
    from models import loader

    if config.replicas > 1:
        from graph.replicas import Replicas

        return Replicas.start(config.model, config.engine, config.replicas, logging.getLogger().level)

    model = loader.load_model(config.model, config.engine.dtype, config.engine.tokenizer_cache())
    return Engine.create(model, config.engine)


async def _in_daemon_thread(fn: Callable[[], Any]) -> Any:
    """Run `fn` on a daemon thread: a server told to stop while loading need not wait for it."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)

    def run() -> None:
        try:
            result, error = fn(), None
        except BaseException as e:
            result, error = None, e
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="model-loader", daemon=True).start()
    return await future


def follow(config: ServerConfig) -> int:
    """A process other than 0 of a multi-process server: load the same model, then run the steps
    process 0 publishes (graph/multihost.py)."""
    from models import loader

    try:
        model = loader.load_model(config.model, config.engine.dtype, config.engine.tokenizer_cache())
        return follow_steps(model, config.engine)
    except (ModelLoadError, ArtifactMismatchError, ValueError) as e:
        log.error("%s", e)
        return 1


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    # Listen now: connections made as soon as the "listening" line is out queue in the backlog
    # while uvicorn starts (asyncio's own listen() on this socket later only resets the backlog).
    sock.listen(BACKLOG)
    sock.set_inheritable(True)
    return sock


class _Lifecycle:
    """Ties the server, the engine and the signals together."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.state = ServerState(config)
        self._engine_shutdown: threading.Thread | None = None

    def on_exit(self) -> None:
        self.state.stopping = True
        engine = self.state.engine
        if engine is not None and self._engine_shutdown is None:
            timeout = self.config.shutdown_timeout
            self._engine_shutdown = threading.Thread(target=engine.shutdown, args=(timeout,), name="engine-shutdown")
            self._engine_shutdown.start()

    async def run(self, sock: socket.socket) -> int:
        uv_config = uvicorn.Config(
            build_app(self.state),
            log_config=None,
            access_log=self.config.access_log,
            lifespan="off",
            timeout_graceful_shutdown=self.config.shutdown_timeout + 10,
            backlog=BACKLOG,
        )
        server = _Server(uv_config, self.on_exit)
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        # Load only once uvicorn serves the socket, so a request queued in the backlog before the
        # engine exists is answered (503) rather than racing the load.
        accepting = asyncio.ensure_future(server.serving.wait())
        await asyncio.wait({serving, accepting}, return_when=asyncio.FIRST_COMPLETED)
        accepting.cancel()
        loading = asyncio.ensure_future(_in_daemon_thread(lambda: load_engine(self.config)))
        await asyncio.wait({serving, loading}, return_when=asyncio.FIRST_COMPLETED)
        if not loading.done():  # stopped (or failed to start) while loading
            loading.cancel()
            await serving
            return 0
        try:
            engine = loading.result()
        except (ModelLoadError, ArtifactMismatchError, ValueError) as e:  # the user's to fix: no traceback
            log.error("%s", e)
            return await self._abandon(server, serving)
        except Exception:
            log.exception("could not start the engine")
            return await self._abandon(server, serving)
        self.state.set_engine(engine)
        # The model, tokenizer and executables (~220k objects) live as long as this process: a full
        # collection that scans them took 0.3 s on the 2-core CPU, a pause every stream saw in its
        # inter-token gaps. Frozen, the collector only scans what requests create.
        gc.collect()
        gc.freeze()
        if server.should_exit:  # a signal came during the load: stop the engine we just made
            self.on_exit()
        else:
            host, port = sock.getsockname()[:2]
            host = f"[{host}]" if ":" in host else host
            print(f"Server ready on http://{host}:{port} (Press CTRL+C to quit)", flush=True)
        several = self.config.num_processes > 1 or self.config.replicas > 1
        watch = asyncio.create_task(self._exit_when_broken(server, engine)) if several else None
        await serving
        if self._engine_shutdown is not None:
            self._engine_shutdown.join()
        if watch is not None:
            watch.cancel()
            return 1 if engine.broken is not None else 0
        return 0

    @staticmethod
    async def _exit_when_broken(server: uvicorn.Server, engine: Engine | Replicas) -> None:
        """Several processes: a broken engine (another process died) cannot recover, so the server
        stops (its requests have had their errors) and exits non-zero."""
        while not server.should_exit:
            if engine.broken is not None:
                log.error("the engine broke (%s): stopping the server", engine.broken)
                server.should_exit = True
                return
            await asyncio.sleep(0.5)

    @staticmethod
    async def _abandon(server: uvicorn.Server, serving: asyncio.Task[None]) -> int:
        server.should_exit = True
        await serving
        return 1


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )
    # uvicorn's own start-up lines ("Uvicorn running on ...") would announce a server that is not
    # ready yet; the ready line is ours.
    if level != "debug":
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's ~15 lines per checkpoint restore


def main(argv: Sequence[str] | None = None, prog: str = "python -m serving.main") -> int:
    config = parse_args(argv, prog)
    setup_logging(config.log_level)
    if config.num_processes > 1:
        join_processes(config.coordinator, config.num_processes, config.process_id)
        if config.process_id != 0:  # no HTTP here: run process 0's steps
            return follow(config)
    try:
        sock = bind(config.host, config.port)
    except OSError as e:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, e.strerror or e)
        return 1
    log.info("listening on %s:%d; loading the model", config.host, sock.getsockname()[1])
    status = asyncio.run(_Lifecycle(config).run(sock))
    if status and config.num_processes > 1:  # another process is gone: leaving jax.distributed would wait on it
        logging.shutdown()
        os._exit(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
