"""Engine replicas (`--replicas N`): N engines, each in a process of its own pinned to its share of
the CPU cores, with its own executables and KV pool, behind one front that has the engine's
interface (`submit`, `abort`, `stats`, `shutdown`, ...). A request runs whole on the replica that
took it (`pick`): the least loaded, and among equals the one that was sent the longest start of
its prompt before (its prefix cache likely holds it). Balance comes first: letting a replica one
request above the other take a prompt it had cached broke the lock-step of a closed loop of 16
clients (mixed steps in 36 of 1,302 steps, ITL p99 67 -> 118 ms).

Why, on CPU: XLA:CPU splits the ops of a step over one pool of threads on every core and joins them
at each op's end (~340 thread wake-ups a batch-16 SmolLM2 decode step). Any other work on a core
(the HTTP server, the load generator, the machine's neighbours) delays each join, and the step
with it. A replica pinned to one core joins nothing. Measured side by side on a 2-core Zen 4
(SmolLM2, int8 weights, bfloat16 cache, 200 tokens of context, 600 steps): one engine, batch 16 on
both cores: 62-70 ms a step, p99 93-96 ms; two replicas, batch 8 each on its own core at the same
time: 52-54 ms, p99 68-76 ms. The cost: a request alone runs on its replica's cores only (batch 1:
22.6 -> 26 ms a step), each replica holds its own copy of the weights and loads or compiles its
own executables, and a prefix is cached in the replica that computed it.

The front talks to each replica over a pipe: a call (submit, stats, reset, shutdown) is answered
in the order sent; a request's deltas come as they are made. A replica ignores SIGINT and SIGTERM
(the front stops it) and stops on its own when the front's end of the pipe closes. A replica that
dies breaks the front (`broken`): its requests end with an error, and the server stops, as it
does when a process of a multi-host mesh dies.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import contextlib
import importlib
import itertools
import logging
import multiprocessing
import os
import signal
import threading
import uuid
from multiprocessing.connection import Connection
from typing import Any

from graph.api import EngineBrokenError, EngineConfig, EngineStoppedError, RequestOutput, SamplingParams
from graph.engine import Engine, ModelFacts, RequestStream
from models.loader import LoadedModel

log = logging.getLogger(__name__)
CALL_TIMEOUT = 60.0  # seconds a replica may take to answer a call (a grammar compiles in `submit`)
REMEMBERED = 4096  # prompt starts a replica is remembered by (least recently sent forgotten first)


def split_cpus(cpus: set[int], n: int) -> list[set[int]]:
    """`cpus` in `n` contiguous shares as even as they go (ValueError if there are fewer than `n`)."""
    ordered = sorted(cpus)
    if n > len(ordered):
        raise ValueError(f"--replicas {n} needs a CPU core for each replica; this process may use {len(ordered)}")
    size, extra = divmod(len(ordered), n)
    shares, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        shares.append(set(ordered[start:end]))
        start = end
    return shares


def _describe(error: BaseException) -> tuple[str, str, str, dict[str, Any]]:
    """An exception as plain data: class, message and attributes (raised again by `_rebuild`)."""
    attrs = {k: v for k, v in vars(error).items() if isinstance(v, (str, int, float, bool, type(None)))}
    return type(error).__module__, type(error).__qualname__, str(error), attrs


def _rebuild(described: tuple[str, str, str, dict[str, Any]]) -> Exception:
    module, name, message, attrs = described
    cls: Any = None
    if module == "builtins" or module.split(".")[0] in ("graph", "models", "serving"):
        with contextlib.suppress(ImportError, AttributeError):
            cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        return RuntimeError(f"{name}: {message}")
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(attrs)
    return error


# ---- a replica's process ----


def replica_main(
    conn: Connection, index: int, cpus: set[int], source: str | None, config: EngineConfig, log_level: int
) -> None:
    """A replica: pin to `cpus`, load the model, build its engine, then serve the front's calls."""
    # every thread (an import may have started some), before jax starts its pools
    for thread in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that ended since the listing
            os.sched_setaffinity(int(thread), cpus)
    for sig in (signal.SIGINT, signal.SIGTERM):  # the front stops it; Ctrl+C reaches the whole group
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(
        level=log_level,
        format=f"%(asctime)s %(levelname)s replica {index} %(name)s: %(message)s",
        force=True,
    )
    from models import loader

    try:
        model = loader.load_model(source, config.dtype, config.tokenizer_cache())
        engine = Engine.create(model, config)
    except BaseException as e:  # the front raises it again
        conn.send(("failed", _describe(e)))
        return
    conn.send(("ready", None))
    asyncio.run(_ReplicaLoop(conn, engine).run())


class _ReplicaLoop:
    """A replica's side of the pipe: the front's calls in, each request's deltas out (all sends
    from this event loop's thread)."""

    def __init__(self, conn: Connection, engine: Engine) -> None:
        self.conn, self.engine = conn, engine
        self.forwarding: dict[str, asyncio.Task[None]] = {}  # request id -> its deltas' forwarding
        self.calls: set[asyncio.Future[None]] = set()  # blocking calls on their threads
        self.stopped = asyncio.Event()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.conn.fileno(), self._on_message)
        watch = asyncio.create_task(self._watch_broken())
        await self.stopped.wait()
        loop.remove_reader(self.conn.fileno())
        watch.cancel()

    def _send(self, message: tuple[Any, ...]) -> None:
        with contextlib.suppress(OSError):  # the front is gone: nobody to tell
            self.conn.send(message)

    def _on_message(self) -> None:
        try:
            message = self.conn.recv()
        except (EOFError, OSError):  # the front is gone: stop at once
            asyncio.get_running_loop().remove_reader(self.conn.fileno())
            message = ("shutdown", None, 0.0)
        kind, token, *args = message
        if kind == "submit":
            self._submit(token, *args)
        elif kind == "abort":  # the engine ends an aborted request without a last delta
            self.engine.abort(args[0])
            if (task := self.forwarding.get(args[0])) is not None:
                task.cancel()
        elif kind == "stats":
            self._send(("reply", token, self.engine.stats(), None))
        elif kind in ("reset", "shutdown"):
            task = asyncio.ensure_future(self._in_thread(kind, token, *args))
            self.calls.add(task)
            task.add_done_callback(self.calls.discard)

    def _submit(self, token: int, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        try:
            stream = self.engine.submit(prompt_ids, params, request_id=request_id)
        except Exception as e:
            self._send(("reply", token, None, _describe(e)))
            return
        self._send(("reply", token, None, None))
        task = self.forwarding[request_id] = asyncio.ensure_future(self._forward(request_id, stream))
        task.add_done_callback(lambda _: self.forwarding.pop(request_id, None))

    async def _forward(self, request_id: str, stream: RequestStream) -> None:
        async for out in stream:
            self._send(("out", request_id, out))

    async def _in_thread(self, kind: str, token: int | None, *args: Any) -> None:
        """A call that blocks (a cache reset, the engine's shutdown) on a thread of its own."""
        loop = asyncio.get_running_loop()
        if kind == "reset":
            await loop.run_in_executor(None, self.engine.reset_prefix_cache)
        else:
            await loop.run_in_executor(None, self.engine.shutdown, *args)
            # every request's last delta out (pushed to its stream before the engine stopped)
            if self.forwarding:
                await asyncio.wait(list(self.forwarding.values()), timeout=5.0)
        if token is not None:
            self._send(("reply", token, None, None))
        if kind == "shutdown":
            self.stopped.set()

    async def _watch_broken(self) -> None:
        while (reason := self.engine.broken) is None:
            await asyncio.sleep(0.5)
        self._send(("broken", None, reason))


# ---- the front ----


class _Replica:
    def __init__(self, index: int, process: Any, conn: Connection, cpus: set[int]) -> None:
        self.index, self.process, self.conn, self.cpus = index, process, conn, cpus
        self.load = 0  # requests taken and not finished
        self.starts: collections.OrderedDict[int, None] = collections.OrderedDict()  # prompt starts sent here
        self.broken: str | None = None
        self.send_lock = threading.Lock()
        self.pending: dict[int, concurrent.futures.Future[Any]] = {}


class _ReplicaGone(Exception):
    pass


def pick(replicas: list[_Replica], prompt_ids: list[int], page_size: int) -> _Replica:
    """The least loaded replica; among equals, the one sent the longest start of this prompt (whole
    pages: 1, 2, 4, ... of them, and all), then one chosen by the prompt's first page. The one
    picked remembers the prompt's starts."""
    pages = len(prompt_ids) // page_size
    lengths = sorted({1 << i for i in range(pages.bit_length())} | ({pages} if pages else set()))
    starts = [hash(tuple(prompt_ids[: n * page_size])) for n in lengths]

    def matched(r: _Replica) -> int:
        return next((i + 1 for i in reversed(range(len(starts))) if starts[i] in r.starts), 0)

    first, n = hash(tuple(prompt_ids[:page_size])), len(replicas)
    chosen = min(replicas, key=lambda r: (r.load, -matched(r), (r.index - first) % n))
    for start in starts:
        chosen.starts[start] = None
        chosen.starts.move_to_end(start)
    while len(chosen.starts) > REMEMBERED:
        chosen.starts.popitem(last=False)
    return chosen


class Replicas(ModelFacts):
    """The front of N engine replicas, with the interface the server uses of an `Engine`."""

    def __init__(self, model: LoadedModel, config: EngineConfig, replicas: list[_Replica]) -> None:
        self.model, self.config, self.replicas = model, config, replicas
        self._lock = threading.Lock()
        self._requests: dict[str, tuple[RequestStream, _Replica]] = {}  # request id -> (stream, replica)
        self._tokens = itertools.count()
        self._accepting = True
        self._stopped = False
        # before multiprocessing's own exit hook, which would wait forever for a replica that ignores SIGTERM
        atexit.register(self.shutdown, 0.0)
        for r in replicas:
            threading.Thread(target=self._read, args=(r,), name=f"replica-{r.index}-reader", daemon=True).start()

    @classmethod
    def start(cls, source: str | None, config: EngineConfig, n: int, log_level: int = logging.INFO) -> Replicas:
        """Start `n` replicas of `source`'s engine, each on its share of this process's cores, and
        load the model's tokenizer here meanwhile; raise what a replica's start raised."""
        import jax

        from models import loader

        if jax.default_backend() != "cpu":  # every replica would take the same accelerators
            raise ValueError("--replicas splits the CPU cores between engines; on GPU or TPU use --data-parallel")
        if not hasattr(os, "sched_setaffinity"):
            raise ValueError("--replicas pins each replica to its cores, which needs Linux")
        shares = split_cpus(os.sched_getaffinity(0), n)
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no jax state, no threads
        replicas = []
        for i, cpus in enumerate(shares):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=replica_main,
                args=(theirs, i, cpus, source, config, log_level),
                name=f"xlaserve-replica-{i}",
                daemon=True,
            )
            process.start()
            theirs.close()
            replicas.append(_Replica(i, process, ours, cpus))
        try:
            model = loader.load_model(source, config.dtype, config.tokenizer_cache(), weights=False)
            for r in replicas:
                try:
                    kind, detail = r.conn.recv()
                except EOFError:  # it died before a word
                    kind, detail = "gone", None
                if kind == "failed":
                    raise _rebuild(detail)
                if kind != "ready":
                    raise RuntimeError(f"replica {r.index} exited while starting (code {r.process.exitcode})")
                log.info("replica %d ready (pid %d, cores %s)", r.index, r.process.pid, sorted(r.cpus))
        except BaseException:
            for r in replicas:
                r.process.kill()
            raise
        return cls(model, config, replicas)

    # ---- the engine's interface ----

    @property
    def broken(self) -> str | None:
        if self._stopped:
            return None
        return next((f"replica {r.index}: {r.broken}" for r in self.replicas if r.broken is not None), None)

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> RequestStream:
        """Queue a request on the least loaded replica; raises what that replica's engine raised."""
        request_id = request_id or uuid.uuid4().hex
        with self._lock:
            if not self._accepting:
                raise EngineStoppedError("the server is shutting down")
            if (reason := self.broken) is not None:
                raise EngineBrokenError(reason)
            if request_id in self._requests:
                raise ValueError(f"request id {request_id!r} is already in use")
            replica = pick(self.replicas, prompt_ids, self.config.page_size)
            stream = RequestStream(self, request_id, asyncio.get_running_loop())
            self._requests[request_id] = (stream, replica)
            replica.load += 1
        try:
            self._call(replica, "submit", request_id, list(prompt_ids), params)
        except BaseException as e:
            with self._lock:
                self._requests.pop(request_id, None)
                replica.load -= 1
            if isinstance(e, _ReplicaGone):
                raise EngineBrokenError(f"replica {replica.index}: {replica.broken}") from None
            raise
        return stream

    def abort(self, request_id: str) -> None:
        with self._lock:  # an aborted request gets no last delta: it is done here
            entry = self._requests.pop(request_id, None)
            if entry is not None:
                entry[1].load -= 1
        if entry is not None:
            with contextlib.suppress(_ReplicaGone):  # its requests end with its error anyway
                self._send(entry[1], ("abort", None, request_id))

    def stats(self) -> dict[str, Any]:
        """Every replica's engine stats, summed (numbers, and dicts of numbers key by key)."""
        total: dict[str, Any] = {}
        for r in self.replicas:
            try:
                stats = self._call(r, "stats")
            except (_ReplicaGone, concurrent.futures.TimeoutError):
                continue
            for key, value in stats.items():
                if isinstance(value, dict):
                    merged = total.setdefault(key, collections.Counter())
                    merged.update(value)
                else:
                    total[key] = total.get(key, 0) + value
        return {k: dict(v) if isinstance(v, collections.Counter) else v for k, v in total.items()}

    def reset_prefix_cache(self) -> None:
        for r in self.replicas:
            with contextlib.suppress(_ReplicaGone):
                self._call(r, "reset")

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop taking requests, let each replica finish its running ones for up to `timeout`
        seconds (the rest end with "abort"), then stop the replicas' processes."""
        with self._lock:
            if self._stopped:
                return
            self._accepting = False
        calls = [(r, self._start_call(r, "shutdown", timeout)) for r in self.replicas]
        for r, future in calls:
            with contextlib.suppress(Exception):
                future.result(timeout=timeout + CALL_TIMEOUT)
            r.process.join(timeout=10)
            if r.process.is_alive():
                r.process.kill()
                r.process.join()
            r.conn.close()
        self._stopped = True
        atexit.unregister(self.shutdown)

    # ---- the pipes ----

    def _send(self, r: _Replica, message: tuple[Any, ...]) -> None:
        with r.send_lock:
            if r.broken is not None:
                raise _ReplicaGone
            try:
                r.conn.send(message)
            except OSError:
                raise _ReplicaGone from None

    def _start_call(self, r: _Replica, kind: str, *args: Any) -> concurrent.futures.Future[Any]:
        token = next(self._tokens)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        r.pending[token] = future
        try:
            self._send(r, (kind, token, *args))
        except _ReplicaGone as e:
            r.pending.pop(token, None)
            future.set_exception(e)
        return future

    def _call(self, r: _Replica, kind: str, *args: Any) -> Any:
        return self._start_call(r, kind, *args).result(timeout=CALL_TIMEOUT)

    def _read(self, r: _Replica) -> None:
        """A replica's messages: call replies, request deltas, its engine broken; until it is gone."""
        while True:
            try:
                kind, key, *rest = r.conn.recv()
            except (EOFError, OSError):
                break
            if kind == "out":
                self._deliver(r, key, rest[0])
            elif kind == "reply":
                future = r.pending.pop(key, None)
                if future is not None:
                    value, error = rest
                    future.set_result(value) if error is None else future.set_exception(_rebuild(error))
            elif kind == "broken":
                r.broken = rest[0]
        r.process.join(5)
        if not self._accepting and r.broken is None and r.process.exitcode == 0:  # stopped by `shutdown`
            return
        r.broken = r.broken or f"its process exited (code {r.process.exitcode})"
        log.error("replica %d broke: %s", r.index, r.broken)
        for future in list(r.pending.values()):
            future.set_exception(_ReplicaGone())
        r.pending.clear()
        with self._lock:
            lost = [rid for rid, (_, owner) in self._requests.items() if owner is r]
        for rid in lost:
            error = f"replica {r.index} failed: {r.broken}"
            self._deliver(r, rid, RequestOutput(rid, "", [], None, finish_reason="error", error=error))

    def _deliver(self, r: _Replica, request_id: str, out: RequestOutput) -> None:
        with self._lock:
            entry = self._requests.get(request_id)
            if entry is not None and out.finish_reason is not None:
                del self._requests[request_id]
                r.load -= 1
        if entry is not None:
            entry[0].push(out)
