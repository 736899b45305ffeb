"""Failing safe, through the real server and the official client: a stream whose step fails gets an
error frame and the next request is answered as if nothing happened; a burst that would wait too
long is shed with 429 and Retry-After; /health and the /metrics counters say what happened."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Iterator

import httpx
import pytest

from tests.server_fixtures import MODEL, ServerProcess, ready_server, wait_idle

# aot_dir (the session's compiled bucket set)
pytest_plugins = ("tests.server_fixtures",)

FAIL_STEP = 3  # the first request's prefill and one decode step stream two tokens, then its step fails
MAX_QUEUE_WAIT = 2  # seconds; each step sleeps 0.05 s, so 64 prompt tokens take at least that
BODY = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}


@pytest.fixture(scope="module")
def faulty(aot_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "faulty.log"
    extra = ("--debug-fail-step", str(FAIL_STEP), "--debug-step-delay", "0.05", "--max-queue-wait", str(MAX_QUEUE_WAIT))
    with ready_server(aot_dir, log, *extra) as proc:
        yield proc


def test_a_stream_in_a_failed_step_gets_an_error_frame_and_the_next_request_succeeds(faulty):
    import openai

    client = openai.OpenAI(base_url=faulty.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    streamed = []
    with pytest.raises(openai.APIError) as failed:
        for chunk in client.completions.create(**BODY, stream=True, extra_body={"ignore_eos": True}):
            streamed.append(chunk.choices[0].text)
    assert failed.value.body["type"] == "server_error" and failed.value.body["code"] == "engine_error"
    assert "debug_fail_step" in failed.value.message
    partial = "".join(streamed)
    assert partial, "the step failed before any token was streamed"
    answer = client.completions.create(**BODY, extra_body={"ignore_eos": True}).choices[0]
    assert answer.finish_reason == "length" and answer.text.startswith(partial)  # the same greedy tokens
    metrics = wait_idle(faulty.url)
    assert metrics["xlaserve_kv_pages_used"] == 0
    assert metrics["xlaserve_requests_failed_total"] == 1
    assert metrics["xlaserve_queue_wait_seconds_count"] == 2  # each request's first step
    assert httpx.get(faulty.url + "/health").json() == {"status": "ok"}


def _status_then_leave(url: str, prompt: list[int], everyone: threading.Barrier) -> tuple[int, str | None, dict]:
    """Stream a completion of `prompt`; once every client of the burst has its answer's status,
    leave (closing the stream). -> (status, Retry-After, error body of a refusal)."""
    body = {**BODY, "prompt": prompt, "max_tokens": 100, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=url, timeout=300) as client, client.stream("POST", "/v1/completions", json=body) as r:
        error = {}
        if r.status_code != 200:
            r.read()
            error = r.json()["error"]
        everyone.wait(timeout=120)
        return r.status_code, r.headers.get("retry-after"), error


def test_a_burst_that_would_wait_too_long_is_shed_with_429_and_retry_after(faulty):
    url = faulty.url
    before = wait_idle(url)
    # 16 prompts of 400 distinct tokens: the 8th finds 2,800 prompt tokens ahead of it (at least 44
    # chunks of at most 64, over 2.2 s of steps)
    prompts = [list(range(1000 + 400 * i, 1400 + 400 * i)) for i in range(16)]
    everyone = threading.Barrier(len(prompts))
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: _status_then_leave(url, p, everyone), prompts))
    shed = [r for r in results if r[0] == 429]
    let_in = [r for r in results if r[0] == 200]
    assert shed and let_in and len(shed) + len(let_in) == len(prompts), results
    for _, retry_after, error in shed:
        assert int(retry_after) >= 1
        assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
        assert "expected wait" in error["message"]
    metrics = wait_idle(url)
    assert metrics["xlaserve_kv_pages_used"] == 0
    assert metrics["xlaserve_requests_shed_total"] - before["xlaserve_requests_shed_total"] == len(shed)
    # every client let in left long before its 100 tokens (5 s of steps): each counts as aborted
    assert metrics["xlaserve_requests_aborted_total"] - before["xlaserve_requests_aborted_total"] == len(let_in)
    assert httpx.post(url + "/v1/completions", json=BODY, timeout=300).status_code == 200
