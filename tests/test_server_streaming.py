"""Streaming: the SSE wire format, streamed == non-streamed, and concurrent streams that do not
disturb one another."""

from __future__ import annotations

import concurrent.futures
import json

import httpx

from tests.server_fixtures import MODEL, assert_matches_schema, sse_events

# server, openai_client (the official client), http (httpx)
pytest_plugins = ("tests.server_fixtures",)

SEA = [{"role": "user", "content": "Write two sentences about the sea."}]


def stream_events(http: httpx.Client, route: str, body: dict) -> list:
    with http.stream("POST", route, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return sse_events(response.iter_lines())


def test_chat_stream_wire_format(http):
    body = {"model": MODEL, "messages": SEA, "max_tokens": 6, "temperature": 0}
    events = stream_events(http, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    for chunk in chunks:
        assert_matches_schema(chunk, "CreateChatCompletionStreamResponse")
        assert chunk["object"] == "chat.completion.chunk" and chunk["model"] == MODEL
        assert "usage" in chunk
    assert len({(c["id"], c["created"], c["system_fingerprint"]) for c in chunks}) == 1
    first, *middle, finish, usage = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(set(c["choices"][0]["delta"]) == {"content"} for c in middle) and len(middle) == 6
    assert all(c["choices"][0]["finish_reason"] is None and c["usage"] is None for c in [first, *middle])
    assert finish["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    plain = stream_events(http, "/v1/chat/completions", body)
    assert all("usage" not in c for c in plain[:-1])


def test_chat_stream_equals_non_stream(openai_client):
    kwargs = {"model": MODEL, "messages": SEA, "max_tokens": 24, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    whole = openai_client.chat.completions.create(**kwargs)
    chunks = list(openai_client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    streamed_lp = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert streamed_lp == whole.choices[0].logprobs.content
    # The same counts; only how many prompt tokens the prefix cache held may differ (the second
    # request can find the first's pages, whatever ran before this test).
    uncached = {"prompt_tokens_details"}
    assert chunks[-1].usage.model_dump(exclude=uncached) == whole.usage.model_dump(exclude=uncached)


def test_completion_stream_equals_non_stream(openai_client):
    kwargs = {"model": MODEL, "prompt": "The sea is", "max_tokens": 24, "temperature": 0, "logprobs": 1, "echo": True}
    whole = openai_client.completions.create(**kwargs).choices[0]
    chunks = list(openai_client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [whole.finish_reason]
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset


def test_completion_stream_wire_format(http):
    body = {"model": MODEL, "prompt": ["The sea is", "Once upon a time"], "max_tokens": 4, "n": 2, "temperature": 0}
    events = stream_events(http, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    *chunks, usage = events[:-1]
    for chunk in chunks:
        assert len(chunk["choices"]) == 1 and "usage" not in chunk
        if chunk["choices"][0]["finish_reason"] is not None:  # the reference has no null finish_reason
            assert_matches_schema(chunk, "CreateCompletionResponse")
    assert_matches_schema(usage, "CreateCompletionResponse")
    texts = {i: "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i) for i in range(4)}
    finishes = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"] == "length"]
    assert sorted(finishes) == [0, 1, 2, 3]
    assert texts[0] == texts[1] and texts[2] == texts[3] and texts[0] != texts[2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 16


def test_chat_n_streams_each_choice_in_order(http):
    body = {"model": MODEL, "messages": SEA, "max_tokens": 5, "n": 3, "temperature": 1.0, "seed": 11}
    chunks = stream_events(http, "/v1/chat/completions", body)[:-1]
    for index in range(3):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert mine[-1]["finish_reason"] == "length" and mine[-1]["delta"] == {}
        assert all(m["finish_reason"] is None for m in mine[:-1])


def _stream_text(url: str, prompt: str) -> str:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.Client(base_url=url, timeout=600) as client:
        events = stream_events(client, "/v1/completions", body)
    return "".join(e["choices"][0]["text"] for e in events[:-1])


def test_32_concurrent_streams_each_get_their_text_alone(server, http):
    # 8 prompts of different lengths, each 4 times: 32 streams on an 8-row batch, joining as others leave.
    prompts = [
        "The sea is",
        "Once upon a time, in a land far away,",
        "def fibonacci(n):",
        "List three colours:",
        "The capital of Italy is Rome. The capital of Spain is",
        "Q: What is two plus two?\nA:",
        "Roses are red,",
        "In 1969, the first humans",
    ]
    alone = {}
    for prompt in prompts:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0}
        alone[prompt] = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    together = prompts * 4
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        texts = list(pool.map(lambda p: _stream_text(server.url, p), together))
    assert texts == [alone[p] for p in together]


def test_a_stream_refused_before_it_starts_is_a_plain_json_error(http):
    """An invalid request is refused before streaming starts: a plain JSON error, not a stream."""
    body = {"model": MODEL, "messages": SEA, "max_tokens": 600, "stream": True}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/json")
    assert json.loads(response.text)["error"]["code"] == "context_length_exceeded"
