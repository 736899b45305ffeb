"""A server's life: 503 while loading, the API key, the bounded queue (429), the generated CLI, and
SIGTERM with requests in flight: each one gets its answer or an error, and the process exits 0."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server_fixtures import (
    LISTENING,
    MODEL,
    REPO,
    SMALL_ENGINE,
    ServerProcess,
    cache_args,
    engine_metrics,
    sse_events,
    start_server,
    wait_idle,
)

# aot_dir (the session's compiled bucket set)
pytest_plugins = ("tests.server_fixtures",)

KEY = "sekrit-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 400, "temperature": 0, "ignore_eos": True}
SHUTDOWN_TIMEOUT = 10
# Each step of the guarded server takes at least this long, so a LONG request outlasts the test's
# checks and the shutdown timeout on any machine, however fast its device.
STEP_DELAY = 0.05


@dataclasses.dataclass
class Lifecycle:
    proc: ServerProcess
    health_while_loading: httpx.Response


@pytest.fixture(scope="module")
def guarded(aot_dir, tmp_path_factory) -> Iterator[Lifecycle]:
    """A server of its own: API key, a queue of 4, a short shutdown timeout."""
    log = tmp_path_factory.mktemp("logs") / "guarded.log"
    extra = ("--api-key", KEY, "--max-queue", "4", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT), "--access-log")
    proc = start_server(aot_dir, log, *extra, "--debug-step-delay", str(STEP_DELAY))
    try:
        health = proc.first_response("/health", base_url=proc.wait_listening())
        proc.wait_ready()
        yield Lifecycle(proc, health)
    finally:
        proc.stop()


def test_health_is_503_while_loading_then_200(guarded):
    loading = guarded.health_while_loading
    assert loading.status_code == 503
    assert loading.json()["error"]["code"] == "model_loading"
    assert httpx.get(guarded.proc.url + "/health").json() == {"status": "ok"}


def test_api_key_guards_the_v1_routes(guarded):
    import openai

    url = guarded.proc.url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = httpx.get(url + "/v1/models", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/v1/models", headers=AUTH).status_code == 200
    assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=1).usage.completion_tokens == 1


def _hold_stream(url: str, opened: threading.Event, release: threading.Event) -> int:
    body = {**LONG, "stream": True}
    with httpx.Client(base_url=url, headers=AUTH, timeout=300) as client:
        with client.stream("POST", "/v1/completions", json=body) as response:
            opened.set()
            release.wait()
            return response.status_code


def _wait_for(url: str, key: str, value: int) -> None:
    deadline = time.monotonic() + 120
    while engine_metrics(url)[key] < value:
        assert time.monotonic() < deadline, f"{key} never reached {value}"
        time.sleep(0.02)


def _wait_unhealthy(url: str, timeout: float = 60) -> None:
    """Until /health fails (503, or no longer listening): the signal is handled asynchronously."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url + "/health", timeout=30).raise_for_status()
        except httpx.HTTPError:
            return
        assert time.monotonic() < deadline, "still healthy after SIGTERM"
        time.sleep(0.05)


def test_a_full_queue_answers_429_and_recovers(guarded):
    url = guarded.proc.url
    release = threading.Event()
    held = []
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        try:
            # One at a time (the queue bound counts requests the step loop has not picked up yet):
            # a full batch of 8, then 4 waiting.
            for i in range(12):
                opened = threading.Event()
                held.append(pool.submit(_hold_stream, url, opened, release))
                assert opened.wait(120)
                running = min(i + 1, 8)
                _wait_for(url, "xlaserve_batch_running_requests", running)
                _wait_for(url, "xlaserve_queue_waiting_requests", i + 1 - running)
            response = httpx.post(url + "/v1/completions", json={**LONG, "max_tokens": 1}, headers=AUTH)
            assert response.status_code == 429, response.text
            assert response.json()["error"]["type"] == "rate_limit_error"
            assert int(response.headers["retry-after"]) >= 1
        finally:
            release.set()
        assert [h.result() for h in held] == [200] * 12
    assert wait_idle(url)["xlaserve_kv_pages_used"] == 0
    assert httpx.post(url + "/v1/completions", json={**LONG, "max_tokens": 1}, headers=AUTH).status_code == 200


def _stream_outcome(url: str, route: str, body: dict, opened: threading.Event) -> list:
    with httpx.Client(base_url=url, headers=AUTH, timeout=300) as client:
        with client.stream("POST", route, json={**body, "stream": True}) as response:
            assert response.status_code == 200
            opened.set()  # the engine has the request
            return sse_events(response.iter_lines())


def test_sigterm_answers_every_in_flight_request_and_exits_0(guarded):
    url, proc = guarded.proc.url, guarded.proc
    story = [{"role": "user", "content": "Tell me a long story."}]
    jobs = [
        ("/v1/completions", LONG),
        ("/v1/completions", LONG),
        ("/v1/chat/completions", {**LONG, "prompt": None, "messages": story}),
        ("/v1/completions", {**LONG, "max_tokens": 4}),  # short enough to finish within the timeout
    ]
    with concurrent.futures.ThreadPoolExecutor(len(jobs) + 1) as pool:
        streams = []
        long_post = None
        for i, (route, body) in enumerate(jobs):  # one at a time: the queue holds 4
            if i == 3:  # the long post before the short stream, which may finish at any time
                long_post = pool.submit(httpx.post, url + "/v1/completions", json=LONG, headers=AUTH, timeout=300)
                _wait_for(url, "xlaserve_batch_running_requests", 4)  # the 3 long streams and the long post
            opened = threading.Event()
            body = {k: v for k, v in body.items() if v is not None}
            streams.append(pool.submit(_stream_outcome, url, route, body, opened))
            assert opened.wait(120)
            if i < 3:
                _wait_for(url, "xlaserve_batch_running_requests", i + 1)
        proc.signal(signal.SIGTERM)
        _wait_unhealthy(url)
        *long_streams, short_stream = [s.result(timeout=SHUTDOWN_TIMEOUT + 60) for s in streams]
        for events in long_streams:  # cut off after the shutdown timeout: an error event, then [DONE]
            assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "shutting_down", events[-3:]
        assert short_stream[-1] == "[DONE]" and short_stream[-2]["choices"][0]["finish_reason"] == "length"
        assert long_post is not None
        response = long_post.result(timeout=60)
        assert response.status_code == 503 and response.json()["error"]["code"] == "shutting_down"
    assert proc.wait(timeout=60) == 0
    assert not any("Traceback" in line for line in proc.stderr), "\n".join(proc.stderr[-40:])


def test_help_lists_every_option_with_its_default():
    from graph.api import EngineConfig
    from serving.config import ServerConfig

    result = subprocess.run(
        [sys.executable, "-m", "serving.main", "--help"], cwd=REPO, capture_output=True, text=True, check=True
    )
    text = " ".join(result.stdout.split())
    options = text[text.index("options:") :]
    for cls in (ServerConfig, EngineConfig):
        for field in dataclasses.fields(cls):
            if field.name == "engine":
                continue
            default = getattr(cls(), field.name)
            flag = "--" + field.name.replace("_", "-")
            entry = options[options.index(flag + ("," if isinstance(default, bool) else " ")) :]
            helped = re.sub(r"^--\S+( [A-Z_]+)?(, --\S+)? ", "", entry.partition("(default:")[0])
            assert len(helped) > 10, f"{flag} has no help text"
            assert re.search(r"\(default: ([^)]*)\)", entry)[1] == ("none" if default is None else str(default)), flag


def _connect_when_listening(aot_dir: Path) -> bytes:
    """Start a server and, on the reading thread itself, connect the moment its "listening" line
    arrives; -> the raw answer to GET /health."""
    command = [sys.executable, "-m", "serving.main", "--port", "0", *cache_args(), *SMALL_ENGINE]
    command += ["--aot-dir", str(aot_dir)]
    proc = subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        for line in proc.stderr:
            if m := LISTENING.search(line):
                with socket.create_connection((m[1], int(m[2])), timeout=60) as conn:
                    conn.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
                    return b"".join(iter(lambda: conn.recv(65536), b""))
        raise AssertionError(f"the server exited with {proc.wait()} before listening")
    finally:
        proc.kill()
        proc.wait()


def test_connections_are_accepted_from_the_listening_line_on(aot_dir):
    """serving/main.py's start-up guarantee: 20 starts, four at a time (the host's cores are
    shared, as on a busy machine), each connecting (without any retry) the moment its "listening"
    line appears, are never refused and get 503 `model_loading`."""
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for answer in pool.map(lambda _: _connect_when_listening(aot_dir), range(20)):
            assert answer.startswith(b"HTTP/1.1 503 "), answer
            assert b'"model_loading"' in answer
