"""Two processes on loopback, one mesh (graph/multihost.py): `jax.distributed` over CPU with two
simulated devices each, the bundled SmolLM2 data-parallel over all four (a 4 x 1 global mesh;
its 3 KV heads allow no tensor axis of 2 or 4). Process 0 serves HTTP; process 1 follows its steps,
with the executables process 0 compiled (from the compilation cache). They answer as the
one-process server does, stop together on SIGTERM, and a dead follower makes process 0 fail its
in-flight requests and exit non-zero. The first pair runs from the session's start, at the lowest
CPU priority (an early job, tests/conftest.py `early`); its test checks what it did.

Two devices a process, not more: every simulated device is a thread on the same 2 cores, and with
four a process (8 x 1) a step took ~3 s here instead of ~0.7 s, for the same code paths (several
local devices in each process, rows split across processes)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.server_fixtures import MODEL, SMALL, ServerProcess, engine_args

pytest_plugins = ("tests.server_fixtures",)
pytestmark = pytest.mark.slow

LOCAL_DEVICES = 2
ENV = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"}
COMPLETION = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 12}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def two_processes(log_dir, warmup: bool = False, nice: bool = False) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    mesh = ["--data-parallel", str(2 * LOCAL_DEVICES), "--num-processes", "2"]
    engine = engine_args(dataclasses.replace(SMALL, warmup=warmup))
    args = [*engine, *mesh, "--coordinator", f"127.0.0.1:{_free_port()}"]
    follower = ServerProcess([*args, "--process-id", "1"], log_dir / "process1.log", env=ENV, nice=nice).start()
    leader = ServerProcess([*args, "--process-id", "0"], log_dir / "process0.log", env=ENV, nice=nice).start()
    try:
        leader.wait_ready(timeout=1200)
        yield leader, follower
    finally:
        for p in (leader, follower):
            p.kill()


def _answers(url: str) -> list[str]:
    """Each route, streamed and not, sent together: one batch, so the two processes split its rows
    (a step costs ~0.7 s here: 4 simulated devices on 2 cores, gloo collectives over loopback; a
    request's tokens do not depend on what shares its steps, tests/test_mixed_and_prefix.py)."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)

    def completion() -> str:
        return client.completions.create(**COMPLETION).choices[0].text

    def streamed() -> str:
        return "".join(c.choices[0].text for c in client.completions.create(**COMPLETION, stream=True))

    def chat() -> str:
        return client.chat.completions.create(**CHAT, temperature=0).choices[0].message.content

    def chat_streamed() -> str:
        stream = client.chat.completions.create(**CHAT, temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream)

    routes = (completion, streamed, chat, chat_streamed)
    with concurrent.futures.ThreadPoolExecutor(len(routes)) as pool:
        return list(pool.map(lambda route: route(), routes))


@dataclasses.dataclass
class Run:
    """What the two processes did, from their start to their stop."""

    answers: list[str]
    follower_compiled: list[str]  # the follower's "executables ready" lines
    leader_status: int | None  # exit statuses after process 0's SIGTERM (None: still running after 60 s)
    follower_status: int | None
    follower_saw_stop: bool  # the follower logged that process 0 stopped
    logs: str


def _run_two_processes(log_dir, nice: bool = False) -> Run:
    """Start the two processes (with the start-up warm-up, 5 s here: the follower runs the warm-up
    steps process 0 sends too), ask every route, SIGTERM process 0, and see how both end."""

    def status(p: ServerProcess) -> int | None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return p.wait(60)
        return None

    with two_processes(log_dir, warmup=True, nice=nice) as (leader, follower):
        answers = _answers(leader.url)
        leader.signal(signal.SIGTERM)
        leader_status, follower_status = status(leader), status(follower)
        return Run(
            answers,
            [line for line in follower.stderr if "executables ready in" in line],
            leader_status,
            follower_status,
            any("process 0 stopped after" in line for line in follower.stderr),
            leader.log_tail() + "\n" + follower.log_tail(),
        )


def early_jobs(items: list[pytest.Item]) -> dict[str, Callable[[Path], Run]]:
    """The session runs the two processes from its start, at the lowest CPU priority: their compile
    and warm-up (~50 s) use the core the rest of the suite leaves idle (tests/conftest.py `early`)."""
    wanted = any(item.originalname == "test_two_processes_answer_as_one_and_stop_together" for item in items)
    return {"two-processes": functools.partial(_run_two_processes, nice=True)} if wanted else {}


def test_two_processes_answer_as_one_and_stop_together(server, tmp_path, early):
    run = early.result("two-processes", _run_two_processes, tmp_path)
    assert run.answers == _answers(server.url), run.logs
    # process 0 publishes its setup once its table is built: the follower compiles none of it
    assert any(re.search(r"executables ready in \S+: 0 compiled, ", line) for line in run.follower_compiled), run.logs
    assert (run.leader_status, run.follower_status) == (0, 0), run.logs
    assert run.follower_saw_stop, run.logs


def test_a_dead_follower_fails_the_requests_in_flight_and_process_0_exits(tmp_path):
    import openai

    with two_processes(tmp_path) as (leader, follower):
        client = openai.OpenAI(base_url=leader.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        streamed: list[str] = []
        outcome: dict[str, object] = {}

        def stream() -> None:
            try:
                body = {**COMPLETION, "max_tokens": 400, "stream": True, "extra_body": {"ignore_eos": True}}
                for chunk in client.completions.create(**body):
                    streamed.append(chunk.choices[0].text)
                    outcome["finish"] = chunk.choices[0].finish_reason
            except openai.APIError as e:
                outcome["error"] = e

        reader = threading.Thread(target=stream)
        reader.start()
        while len(streamed) < 3:  # decoding
            time.sleep(0.05)
            leader.check_alive()
        follower.proc.kill()
        killed = time.monotonic()
        reader.join(60)
        assert not reader.is_alive(), "the request in flight was never answered"
        assert "error" in outcome, f"the stream ended without an error: {outcome}"
        status = leader.wait(30 - (time.monotonic() - killed))
        assert status != 0
