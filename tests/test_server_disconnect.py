"""Clients that go away: each of their requests is aborted before its end (the server counts it) and
every KV page is free again."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest

from tests.server_fixtures import MODEL, engine_metrics, wait_idle

# server
pytest_plugins = ("tests.server_fixtures",)

# Long enough that, run to the end, 16 of them would keep the 8-row batch busy for minutes.
LONG = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 400, "temperature": 0, "ignore_eos": True}
ABORTED_WITHIN = 30.0  # seconds; far less than the requests would run
ABORTED = "xlaserve_requests_aborted_total"  # requests ended early, once per HTTP request


def _leave_after_two_chunks(url: str, route: str, body: dict) -> int:
    with httpx.Client(base_url=url, timeout=300) as client, client.stream("POST", route, json=body) as response:
        assert response.status_code == 200
        chunks = 0
        for line in response.iter_lines():
            chunks += line.startswith("data: ")
            if chunks == 2:
                return chunks  # leaving the `with` closes the connection mid-stream
    raise AssertionError("the stream ended before the client left")


def assert_all_pages_free(url: str) -> None:
    metrics = wait_idle(url, timeout=ABORTED_WITHIN)
    assert metrics["xlaserve_batch_running_requests"] == 0
    assert metrics["xlaserve_queue_waiting_requests"] == 0
    assert metrics["xlaserve_kv_pages_used"] == 0
    assert metrics["xlaserve_kv_pages_free"] >= metrics["xlaserve_kv_pages_total"]


def test_16_clients_leaving_mid_stream_free_every_page(server):
    before = wait_idle(server.url)[ABORTED]
    jobs = [("/v1/completions", {**LONG, "stream": True})] * 8
    chat = {**LONG, "messages": [{"role": "user", "content": "Tell me a long story."}], "stream": True}
    del chat["prompt"]
    jobs += [("/v1/chat/completions", chat)] * 8
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        done = list(pool.map(lambda job: _leave_after_two_chunks(server.url, *job), jobs))
    assert done == [2] * 16
    assert_all_pages_free(server.url)
    assert engine_metrics(server.url)[ABORTED] - before == 16  # none ran to its end


def test_a_non_streaming_client_that_times_out_is_aborted(server):
    before = wait_idle(server.url)[ABORTED]
    # 400 tokens take seconds even on a fast device; the client gives up after half of one
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=server.url, timeout=0.5) as client:
        client.post("/v1/completions", json=LONG)
    assert_all_pages_free(server.url)
    assert engine_metrics(server.url)[ABORTED] - before == 1
    response = httpx.post(server.url + "/v1/completions", json={**LONG, "max_tokens": 2}, timeout=120)
    assert response.status_code == 200
