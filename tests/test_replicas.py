"""Engine replicas (`--replicas N`, graph/replicas.py): a real server whose engines run in
processes of their own, each pinned to its own cores, answering exactly as one engine does."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
from pathlib import Path

import pytest
from openai import BadRequestError, OpenAI

from graph.api import InvalidRequestError, QueueFullError
from graph.replicas import _describe, _rebuild, _Replica, pick, split_cpus
from tests.server_fixtures import MAX_SEQ_LEN, MODEL, ServerProcess, ready_server, wait_idle

pytest_plugins = ("tests.server_fixtures",)

PROMPTS = [f"List {n} colours of the rainbow, one per line:" for n in range(2, 8)]


def test_cores_are_split_evenly_and_refused_when_too_few() -> None:
    assert split_cpus({0, 1, 2, 3, 4, 5, 6, 7}, 3) == [{0, 1, 2}, {3, 4, 5}, {6, 7}]
    assert split_cpus({4, 9}, 2) == [{4}, {9}]
    with pytest.raises(ValueError, match="--replicas 3 needs a CPU core for each replica; this process may use 2"):
        split_cpus({0, 1}, 3)


def test_a_request_goes_to_the_least_loaded_replica_and_among_equals_to_its_cached_prefix() -> None:
    replicas = [_Replica(i, None, None, {i}) for i in range(3)]
    system = list(range(100, 164))  # 4 pages of 16 tokens
    first = pick(replicas, [*system, 1, 2, 3], 16)
    first.load += 1
    others = [r for r in replicas if r is not first]
    assert pick(replicas, [*system[:16], 4, 5], 16) in others  # balance first: its first page is cached
    for r in replicas:
        r.load = 1
    assert pick(replicas, [*system, *[6] * 40], 16) is first  # equal loads: the one with the longest start
    assert pick(replicas, system[:40], 16) is first  # 2 of its pages
    second = pick(replicas, [7] * 64, 16)
    assert pick(replicas, [7] * 64, 16) is second
    first.load = 2
    assert pick(replicas, system, 16) is not first


def test_a_replicas_error_reaches_the_front_as_raised() -> None:
    full = _rebuild(_describe(QueueFullError("too many queued requests (4)", 2.5)))
    assert isinstance(full, QueueFullError) and str(full) == "too many queued requests (4)" and full.retry_after == 2.5
    bad = _rebuild(_describe(InvalidRequestError("'seed' must be between 0 and 4294967295", "seed")))
    assert isinstance(bad, InvalidRequestError) and bad.param == "seed"
    assert type(_rebuild(_describe(KeyError("x")))) is KeyError
    foreign = _rebuild(("somewhere.else", "Odd", "it went wrong", {}))
    assert isinstance(foreign, RuntimeError) and "it went wrong" in str(foreign)


def _replica_pids(server: ServerProcess) -> list[int]:
    """The replicas' processes, as the server's log names them (each the server's child)."""
    pid = server.proc.pid
    children = {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    named = [int(p) for p in re.findall(r"replica \d+ ready \(pid (\d+), cores", "\n".join(server.stderr))]
    assert set(named) <= children
    return named


def _cores(pid: int) -> set[int]:
    """The cores a process may run on (its `Cpus_allowed_list`, e.g. "0-3,6")."""
    listed = re.search(r"Cpus_allowed_list:\s*(\S+)", Path(f"/proc/{pid}/status").read_text())[1]
    cores: set[int] = set()
    for part in listed.split(","):
        first, _, last = part.partition("-")
        cores |= set(range(int(first), int(last or first) + 1))
    return cores


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks of 1/100 s


def _answers(url: str) -> list[str]:
    client = OpenAI(base_url=url + "/v1", api_key="none")

    def one(prompt: str) -> str:
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
        return out.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(one, PROMPTS))


def test_replicas_answer_as_one_engine_does_and_a_dead_one_stops_the_server(server, aot_dir, tmp_path) -> None:
    with ready_server(aot_dir, tmp_path / "replicas.log", "--replicas", "2") as replicas:
        pids = _replica_pids(replicas)
        assert len(pids) == 2
        shares = [_cores(p) for p in pids]  # each on cores of its own: this machine's, split in two
        assert not shares[0] & shares[1] and shares[0] | shares[1] == os.sched_getaffinity(0)
        before = [_cpu_seconds(p) for p in pids]

        # concurrent greedy requests, spread over both replicas, answer token for token as one engine
        assert _answers(replicas.url) == _answers(server.url)
        assert all(_cpu_seconds(p) - b > 0.2 for p, b in zip(pids, before, strict=True)), "a replica took no work"

        # a repeated prompt goes back to the replica that cached it
        long_prompt = " ".join(PROMPTS * 4)
        usage = [client_usage(replicas.url, long_prompt) for _ in range(2)]
        assert usage[0].prompt_tokens_details.cached_tokens == 0
        assert usage[1].prompt_tokens_details.cached_tokens >= usage[1].prompt_tokens - 16

        # a replica's refusal is the server's, with its OpenAI error
        client = OpenAI(base_url=replicas.url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(BadRequestError) as refused:
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=MAX_SEQ_LEN)
        assert refused.value.status_code == 400 and "maximum context length" in str(refused.value)

        # a stream closed early is aborted in its replica: nothing stays running
        stream = client.completions.create(model=MODEL, prompt="Tell a long story:", max_tokens=400, stream=True)
        next(iter(stream))
        stream.close()
        idle = wait_idle(replicas.url)
        assert idle["xlaserve_batch_running_requests"] == idle["xlaserve_queue_waiting_requests"] == 0
        assert idle["xlaserve_kv_pages_used"] == 0

        # a replica that dies ends the server with an error status, as a dead host of a mesh does
        os.kill(pids[1], signal.SIGKILL)
        assert replicas.wait(60) == 1
        assert "replica 1" in replicas.log_tail(80)


def test_sigterm_lets_each_replica_finish_its_requests_and_exits_0(aot_dir, tmp_path) -> None:
    with ready_server(aot_dir, tmp_path / "replicas.log", "--replicas", "2") as replicas:
        client = OpenAI(base_url=replicas.url + "/v1", api_key="none", max_retries=0)
        streams = [
            client.completions.create(model=MODEL, prompt=p, max_tokens=40, temperature=0, stream=True)
            for p in PROMPTS[:2]
        ]
        firsts = [next(iter(s)) for s in streams]  # both running (one on each replica: equal loads)
        replicas.signal(signal.SIGTERM)
        for first, stream in zip(firsts, streams, strict=True):
            chunks = [first, *stream]
            assert chunks[-1].choices[0].finish_reason == "length"
            assert sum(len(c.choices[0].text) > 0 for c in chunks) > 10
        assert replicas.wait(60) == 0
        assert not any("Traceback" in line for line in replicas.stderr), replicas.log_tail()


def client_usage(url: str, prompt: str):
    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=1).usage
