"""A real server for the server tests: `python -m serving.main` in a subprocess on a free loopback
port, with the real bundled model and the real engine.

Compiling the engine is the slow part of a start, so the session compiles one small bucket set once
(`python -m graph.aot`) and every server of the session loads it with `--aot-dir`. The shared server
is started once per session however many test modules use it. Every subprocess gets the session's
compilation cache (`cache_args`, tests/conftest.py), so a start that does compile reuses what any
other start of the session compiled.

Test modules load the fixtures with `pytest_plugins = ("tests.server_fixtures",)` and import the
helpers they use.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from graph.api import EngineConfig

if TYPE_CHECKING:
    from graph.engine import Engine
    from serving.config import ServerConfig

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
# The session's one small bucket set, for its servers and its in-process engine (tests/conftest.py
# `smol_llm`): compiled once, then loaded from the session's compilation cache. One prefill bucket
# and four decode buckets: ~30 s to compile on 2 cores. The session's configs skip the start-up
# warm-up (1.5 s a SmolLM2 engine, and no test times a first step): tests/test_engine.py checks it,
# and the multi-host, int8 AOT and default-flags servers run it.
SMALL = EngineConfig(
    max_batch=8, max_seq_len=512, min_context_tokens=512, min_prefill_tokens=64, max_prefill_tokens=64, kv_pages=256,
    warmup=False,
)  # fmt: skip


def engine_args(config: EngineConfig) -> tuple[str, ...]:
    """`config`'s non-default fields as command-line options."""
    return tuple(
        arg
        for field in dataclasses.fields(config)
        if (value := getattr(config, field.name)) != field.default
        for arg in _option(field.name.replace("_", "-"), value)
    )


def _option(name: str, value: object) -> tuple[str, ...]:
    if isinstance(value, bool):  # a switch: --name / --no-name
        return (f"--{name}" if value else f"--no-{name}",)
    return f"--{name}", str(value)


SMALL_ENGINE = engine_args(SMALL)
# The session's engine config for the tiny random model (tests/conftest.py `tiny_model`), for the
# tests that need no buckets of their own: compiled once in the session. A test that wants
# alternating prefill and decode steps takes it with max_num_batched_tokens=0, whose executables
# are a subset (the same, less the mixed steps'), all loaded from the session's compilation cache.
TINY = EngineConfig(max_batch=4, max_seq_len=128, max_prefill_tokens=64, min_context_tokens=128, warmup=False)
MAX_SEQ_LEN = SMALL.max_seq_len
READY = re.compile(r"^Server ready on (http://\S+) \(Press CTRL\+C to quit\)$")
LISTENING = re.compile(r"listening on (\S+):(\d+); loading the model")


class ServerProcess:
    """One server subprocess; its stdout and stderr are kept (and written to `log_path`)."""

    def __init__(
        self,
        args: list[str],
        log_path: Path,
        command: list[str] | None = None,
        env: dict[str, str] | None = None,
        nice: bool = False,
    ) -> None:
        self.command = command or [sys.executable, "-m", "serving.main", "--port", "0", *cache_args(), *args]
        self.env = env
        self.nice = nice  # at the lowest CPU priority (`EarlyJobs`), and stopped with the early jobs
        self.log_path = log_path
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.url = ""
        self._changed = threading.Condition()
        self.proc: subprocess.Popen[str] | None = None
        self._readers: list[threading.Thread] = []

    def start(self) -> ServerProcess:
        self.proc = subprocess.Popen(
            ["nice", "-n", "19", *self.command] if self.nice else self.command,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a signal to the test runner's group does not reach it
            env=self.env,
        )
        for stream, lines in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr)):
            reader = threading.Thread(target=self._read, args=(stream, lines), daemon=True)
            reader.start()
            self._readers.append(reader)
        if self.nice:  # a session of its own is an autogroup of its own, where Linux has them: nice that too
            with contextlib.suppress(OSError):
                Path(f"/proc/{self.proc.pid}/autogroup").write_text("19")
            LIVE_NICE.add(self)
        return self

    def _read(self, stream: Any, lines: list[str]) -> None:
        with open(self.log_path, "a") as log:
            for line in stream:
                log.write(line)
                log.flush()
                with self._changed:
                    lines.append(line.rstrip("\n"))
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, pattern: re.Pattern[str], lines: list[str], timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in lines:
                    if m := pattern.search(line):
                        return m
                if self.proc is not None and self.proc.poll() is not None:
                    break  # raised below, outside the lock the readers need to finish
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {pattern.pattern!r} after {timeout}s\n{self.log_tail()}")
                self._changed.wait(min(left, 1.0))
        self.check_alive()
        raise AssertionError("unreachable: the process has exited")

    def log_tail(self, lines: int = 40) -> str:
        with self._changed:
            tail = (self.stderr + self.stdout)[-lines:]
        return f"log ({self.log_path}), last lines:\n" + "\n".join(tail)

    def check_alive(self) -> None:
        """Raise with the log's tail if the process has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            for reader in self._readers:  # they end at EOF: the log is then complete
                reader.join(timeout=10)
            raise RuntimeError(f"server exited with {self.proc.returncode}\n{self.log_tail()}")

    def wait_listening(self, timeout: float = 120) -> str:
        m = self.wait_for(LISTENING, self.stderr, timeout)
        return f"http://{m[1]}:{m[2]}"

    def wait_ready(self, timeout: float = 300) -> str:
        """Wait for the ready line, then for /health to answer 200."""
        self.url = self.wait_for(READY, self.stdout, timeout)[1]
        response = self.first_response("/health")
        assert response.status_code == 200, response.text
        return self.url

    def first_response(self, path: str, base_url: str | None = None, timeout: float = 60) -> httpx.Response:
        """GET `path`, retrying refused connections for up to `timeout` seconds while the process
        lives (the server promises none after its "listening" line; this guards what precedes it)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return httpx.get((base_url or self.url) + path, timeout=60)
            except httpx.ConnectError:
                self.check_alive()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        LIVE_NICE.discard(self)
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        """SIGKILL to it and what it started (its session's process group), then reap it."""
        LIVE_NICE.discard(self)
        if self.proc is not None and self.proc.poll() is None:
            _signal_group(self, signal.SIGKILL)
            self.proc.wait()


# ---- fixtures ------------------------------------------------------------------------------------
# Test modules load these with `pytest_plugins = ("tests.server_fixtures",)`: one plugin module, so
# a session fixture is one instance however many modules use it.


def cache_args() -> list[str]:
    """`--compile-cache DIR` for a server or compile subprocess: the session's cache, which
    tests/conftest.py makes the default directory in this process."""
    from graph import compile_cache

    return ["--compile-cache", str(compile_cache.default_dir())]


def compile_small_artifact(out: Path) -> Path:
    """SMALL compiled with `python -m graph.aot` into `out` (tests/conftest.py's `aot_dir`)."""
    command = [sys.executable, "-m", "graph.aot", "--model", MODEL, "--out", str(out), *cache_args(), *SMALL_ENGINE]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


LIVE_NICE: set[ServerProcess] = set()  # the early jobs' processes still running, for `EarlyJobs.stop`


def _signal_group(proc: ServerProcess, sig: int) -> None:
    """`sig` to a process started in a session of its own and what it started (`make serve`'s
    server), all in that session's process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.proc.pid, sig)


@contextlib.contextmanager
def make_serve(args: list[str], log_path: Path, nice: bool = False) -> Iterator[ServerProcess]:
    """The README's `make serve ARGS="..."`, started (not yet ready: call wait_ready), and stopped
    on exit with make and the server it started; `nice`: at the lowest CPU priority (`EarlyJobs`)."""
    make = ["make"]
    dry_run = subprocess.run(["make", "-n", "serve"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    if stamp := re.search(r"^touch (\S+)$", dry_run, re.MULTILINE):  # a venv not made by make: take it as is
        make += ["-o", stamp[1]]
    command = [*make, "serve", f"ARGS={' '.join([*cache_args(), *args])}"]
    proc = ServerProcess([], log_path, command=command, nice=nice).start()
    try:
        yield proc
    finally:
        LIVE_NICE.discard(proc)
        _signal_group(proc, signal.SIGTERM)
        proc.proc.wait(timeout=120)


class EarlyJobs:
    """Work of some tests begun when the session begins, in one background thread, one job after
    another, for tests that would otherwise wait for compiles in a subprocess: the session's
    artifact (tests/conftest.py `aot_dir`, while the fast tier runs), then the two processes of
    tests/test_multihost.py and the default-flags servers (tests/test_server_defaults.py: a default
    bucket set takes a minute or more to compile). The rest of the suite leaves one of the 2 cores
    idle about half the time (its single-threaded Python), which the jobs use; their processes run
    at the lowest CPU priority (`nice`). A server job runs its servers from start to stop and
    returns what its test checks, so no idle server holds memory while the rest of the suite runs.

    A test module offers jobs with `early_jobs(its selected items) -> {key: job}`, a job being
    `job(log_dir) -> result`; its tests take a result with `result(key, job, log_dir)`, which
    raises what the job raised, or runs the job in the test when none was begun for it."""

    def __init__(self, jobs: dict[str, Callable[[Path], Any]], log_dir: Path) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="early-job")
        self._futures = {key: self._pool.submit(job, log_dir) for key, job in jobs.items()}

    def result(self, key: str, job: Callable[[Path], Any], log_dir: Path) -> Any:
        future = self._futures.pop(key, None)
        return job(log_dir) if future is None else future.result(timeout=1800)

    def stop(self) -> None:
        """Drop the jobs not begun and stop the processes of the one running."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        for proc in list(LIVE_NICE):
            _signal_group(proc, signal.SIGTERM)


def start_server(aot: Path, log_path: Path, *extra: str) -> ServerProcess:
    """A server over the session's AOT artifact (not yet ready: call wait_ready)."""
    return ServerProcess([*SMALL_ENGINE, "--aot-dir", str(aot), *extra], log_path).start()


@contextlib.contextmanager
def ready_server(aot: Path, log_path: Path, *extra: str) -> Iterator[ServerProcess]:
    """A server over the session's AOT artifact, ready to answer; stopped on exit."""
    proc = start_server(aot, log_path, *extra)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def server(aot_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The session's shared server."""
    with ready_server(aot_dir, tmp_path_factory.mktemp("logs") / "server.log") as proc:
        yield proc


@pytest.fixture(scope="session")
def aot_engine(aot_dir: Path, smol_model: Any) -> Iterator[Engine]:
    """An engine in this process over the session's AOT artifact: the shared server's engine."""
    from graph.engine import Engine
    from serving.config import parse_args

    engine = Engine.create(smol_model, parse_args([*SMALL_ENGINE, "--aot-dir", str(aot_dir)]).engine)
    yield engine
    engine.shutdown(timeout=0)


@contextlib.contextmanager
def serve(engine: Engine, config: ServerConfig | None = None) -> Iterator[str]:
    """The real app over `engine`, served by uvicorn on a loopback port from a thread; -> its URL."""
    import uvicorn

    from serving.app import build_app
    from serving.config import ServerConfig
    from serving.main import bind
    from serving.state import ServerState

    state = ServerState(config or ServerConfig())
    state.set_engine(engine)
    sock = bind("127.0.0.1", 0)  # listening already: requests wait in the backlog until uvicorn runs
    server = uvicorn.Server(uvicorn.Config(build_app(state), log_config=None, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """The bundled model's real tokenizer, for tests that need token ids."""
    from models.loader import resolve
    from models.tokenizer import load_tokenizer

    return load_tokenizer(resolve(MODEL)[1])


@pytest.fixture(scope="module")
def openai_client(server: ServerProcess) -> Any:
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=300) as client:
        yield client


# ---- helpers -----------------------------------------------------------------------------------


def sse_events(lines: Iterator[str]) -> list[Any]:
    """The `data:` payloads of an SSE stream: JSON objects, and the final "[DONE]" as a string."""
    events = []
    for line in lines:
        if not line.startswith("data: "):
            assert line == "", f"unexpected SSE line {line!r}"
            continue
        payload = line[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def engine_metrics(url: str) -> dict[str, float]:
    """Every sample of /metrics by name and labels (xlaserve_kv_pages_used,
    xlaserve_engine_steps_by_kind_total{kind="prefill"})."""
    text = httpx.get(url + "/metrics", timeout=30).text
    return {m[1]: float(m[2]) for m in re.finditer(r"^(\w+(?:\{[^}]*\})?) (\S+)$", text, re.MULTILINE)}


def wait_idle(url: str, timeout: float = 30) -> dict[str, float]:
    """Poll /metrics until nothing runs or waits; -> the last sample."""
    deadline = time.monotonic() + timeout
    while True:
        m = engine_metrics(url)
        idle = m["xlaserve_batch_running_requests"] == 0 and m["xlaserve_queue_waiting_requests"] == 0
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


# ---- the OpenAI reference schema -----------------------------------------------------------------

# A copy of OpenAI's published schema for our routes (../shared/openai/openapi-subset.yaml), kept
# in the repository so that the check runs wherever the tests do.
SCHEMA_FILE = REPO / "tests" / "data" / "openapi-subset.yaml"


def _nullable_to_json_schema(node: Any) -> Any:
    """OpenAPI 3.0's `nullable: true` (still used in the reference) -> JSON Schema's null type."""
    if isinstance(node, list):
        return [_nullable_to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable_to_json_schema(v) for k, v in node.items()}
    if node.pop("nullable", False):
        if isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
            if "enum" in node:
                node["enum"] = [*node["enum"], None]
        else:
            node = {"anyOf": [node, {"type": "null"}]}
    return node


@functools.cache
def _schemas() -> dict[str, Any]:
    import yaml

    spec = _nullable_to_json_schema(yaml.safe_load(SCHEMA_FILE.read_text()))  # missing: the test fails
    assert {"CreateCompletionResponse", "CreateChatCompletionResponse"} <= set(spec["components"]["schemas"])
    return spec


def assert_matches_schema(obj: Any, name: str) -> None:
    """Validate a response object against components/schemas/NAME of the OpenAI reference."""
    spec = _schemas()
    import jsonschema

    schema = {"$ref": f"#/components/schemas/{name}", "components": spec["components"]}
    jsonschema.validate(obj, schema, cls=jsonschema.Draft202012Validator)
