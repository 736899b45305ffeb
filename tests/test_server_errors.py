"""Every bad input gets its OpenAI-shaped error with the right status, and the server keeps
serving: after each one, a good request succeeds."""

from __future__ import annotations

import pytest

from tests.server_fixtures import MAX_SEQ_LEN, MODEL, assert_matches_schema

# server, openai_client (the official client), http (httpx)
pytest_plugins = ("tests.server_fixtures",)

HI = [{"role": "user", "content": "Hi"}]
CHAT = {"model": MODEL, "messages": HI, "max_tokens": 2}
COMPLETION = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}

# (route, body, status, param, words the message must contain)
BAD_REQUESTS = [
    ("chat", {"model": MODEL}, 400, "messages", "Missing required parameter"),
    ("chat", {"messages": HI}, 400, "model", "Missing required parameter"),
    ("chat", {**CHAT, "messages": []}, 400, "messages", "at least 1"),
    ("chat", {**CHAT, "messages": "Hi"}, 400, "messages", "valid list"),
    ("chat", {**CHAT, "messages": [{"role": "user"}]}, 400, "messages[0].content", "content"),
    ("chat", {**CHAT, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "expected a string"),
    ("chat", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "unknown role"),
    ("chat", {**CHAT, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].tool_call_id", "tool_call_id"),
    (
        "chat",
        {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "messages[0].content[0].type",
        "not supported",
    ),
    ("chat", {**CHAT, "temperature": 2.5}, 400, "temperature", "less than or equal to 2"),
    ("chat", {**CHAT, "temperature": "hot"}, 400, "temperature", "valid number"),
    ("chat", {**CHAT, "top_p": 0}, 400, "top_p", "greater than 0"),
    ("chat", {**CHAT, "top_p": 1.5}, 400, "top_p", "less than or equal to 1"),
    ("chat", {**CHAT, "presence_penalty": -2.5}, 400, "presence_penalty", "greater than or equal to -2"),
    ("chat", {**CHAT, "frequency_penalty": 3}, 400, "frequency_penalty", "less than or equal to 2"),
    ("chat", {**CHAT, "n": 0}, 400, "n", "greater than or equal to 1"),
    ("chat", {**CHAT, "n": 129}, 400, "n", "this server allows at most 128"),  # --max-n's default
    ("chat", {**CHAT, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "less than or equal to 20"),
    ("chat", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs", "logprobs"),
    ("chat", {**CHAT, "max_tokens": -1}, 400, "max_tokens", "greater than or equal to 1"),
    ("chat", {**CHAT, "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ("chat", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ("chat", {**CHAT, "logit_bias": {"hello": 1}}, 400, "logit_bias", "token ids"),
    ("chat", {**CHAT, "logit_bias": {"5": 150}}, 400, "logit_bias", "between -100 and 100"),
    ("chat", {**CHAT, "logit_bias": {"999999": 1}}, 400, "logit_bias", "outside the vocabulary"),
    ("chat", {**CHAT, "seed": 1.5}, 400, "seed", "valid integer"),
    ("chat", {**CHAT, "seed": 2**32}, 400, "seed", "between 0 and 4294967295"),
    ("chat", {**CHAT, "seed": -1}, 400, "seed", "between 0 and 4294967295"),
    ("chat", {**CHAT, "min_tokens": 3}, 400, "min_tokens", "larger than max_tokens (2)"),
    ("chat", {**CHAT, "stream": "yes"}, 400, "stream", "valid boolean"),
    ("chat", {**CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options", "only allowed"),
    ("chat", {**CHAT, "frobnicate": 1}, 400, "frobnicate", "Unrecognized request argument"),
    ("chat", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", "--tool-call-parser"),
    ("chat", {**CHAT, "tool_choice": "auto"}, 400, "tool_choice", "needs 'tools'"),
    ("chat", {**CHAT, "response_format": {"type": "json_schema"}}, 400, "response_format", "is required"),
    ("chat", {**CHAT, "audio": {"voice": "alloy", "format": "wav"}}, 400, "audio", "not supported"),
    ("chat", {**CHAT, "max_tokens": MAX_SEQ_LEN}, 400, "messages", f"maximum context length is {MAX_SEQ_LEN}"),
    ("chat", {**CHAT, "extra_body": 1}, 400, "extra_body", "Unrecognized"),
    ("chat", {**CHAT, "model": "gpt-4o"}, 404, "model", "does not exist"),
    ("completion", {**COMPLETION, "best_of": 3}, 400, "best_of", "must equal 'n'"),
    ("completion", {**COMPLETION, "stop_token_ids": [10**7]}, 400, "stop_token_ids", "outside the vocabulary"),
    ("completion", {**COMPLETION, "stop_token_ids": list(range(40))}, 400, "stop_token_ids", "too many"),
    ("chat", {**CHAT, "include_stop_str_in_output": True}, 400, "include_stop_str_in_output", "Unrecognized"),
    ("completion", {**COMPLETION, "prompt": []}, 400, "prompt", "empty"),
    ("completion", {**COMPLETION, "prompt": [[]]}, 400, "prompt", "empty"),
    ("completion", {**COMPLETION, "prompt": [1.5]}, 400, "prompt", "expected a string"),
    ("completion", {**COMPLETION, "prompt": [10**7]}, 400, "prompt", "outside the vocabulary"),
    ("completion", {**COMPLETION, "prompt": [-1]}, 400, "prompt", "negative"),
    ("completion", {**COMPLETION, "prompt": ""}, 400, "prompt", "empty"),
    ("completion", {**COMPLETION, "seed": 2**63}, 400, "seed", "between 0 and 4294967295"),
    ("completion", {**COMPLETION, "min_tokens": 3}, 400, "min_tokens", "larger than max_tokens (2)"),
    ("completion", {**COMPLETION, "max_tokens": -1}, 400, "max_tokens", "greater than or equal to 0"),
    ("completion", {**COMPLETION, "max_tokens": 0}, 400, "max_tokens", "echo"),
    ("completion", {**COMPLETION, "logprobs": 21}, 400, "logprobs", "less than or equal to 20"),
    ("completion", {**COMPLETION, "suffix": "end"}, 400, "suffix", "not supported"),
    ("completion", {**COMPLETION, "messages": HI}, 400, "messages", "Unrecognized"),
    (
        "completion",
        {**COMPLETION, "max_tokens": MAX_SEQ_LEN},
        400,
        "prompt",
        f"maximum context length is {MAX_SEQ_LEN}",
    ),
    ("completion", {**COMPLETION, "model": "davinci-002"}, 404, "model", "does not exist"),
]
ROUTES = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}


def assert_error(response, status: int, param: str | None = None, words: str = "") -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert_matches_schema(body, "ErrorResponse")
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    assert words.lower() in error["message"].lower(), error
    return error


def assert_still_serving(http) -> None:
    response = http.post("/v1/completions", json={**COMPLETION, "max_tokens": 1})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(("route", "body", "status", "param", "words"), BAD_REQUESTS)
def test_bad_request_gets_its_error_and_the_server_keeps_serving(http, route, body, status, param, words):
    assert_error(http.post(ROUTES[route], json=body), status, param, words)
    assert_still_serving(http)


@pytest.mark.parametrize(
    ("content", "words"), [(b"{not json", "could not parse the JSON"), (b"[1, 2]", "JSON object"), (b"", "parse")]
)
def test_malformed_json_is_400(http, content, words):
    headers = {"content-type": "application/json"}
    error = assert_error(http.post("/v1/chat/completions", content=content, headers=headers), 400, None, words)
    assert error["type"] == "invalid_request_error"
    assert_still_serving(http)


def test_unknown_route_is_404_and_wrong_method_is_405(http):
    assert_error(http.get("/v1/nothing"), 404, None, "Unknown route")
    assert_error(http.post("/v1/engines"), 404, None, "Unknown route")
    response = http.get("/v1/chat/completions")
    assert_error(response, 405, None, "not allowed")
    assert "POST" in response.headers["allow"]
    assert_error(http.delete("/v1/models"), 405, None, "not allowed")
    assert_error(http.get("/v1/models/gpt-4o"), 404, "model", "does not exist")
    assert_still_serving(http)


def test_body_over_the_limit_is_413_with_or_without_content_length(http):
    big = b'{"model": "x", "prompt": "' + b"a" * (5 * 1024 * 1024) + b'"}'
    assert_error(http.post("/v1/completions", content=big), 413, None, "larger than")
    chunked = (big[i : i + 65536] for i in range(0, len(big), 65536))  # no Content-Length: chunked
    assert_error(http.post("/v1/completions", content=chunked), 413, None, "larger than")
    assert_still_serving(http)


def test_the_official_client_raises_the_matching_exceptions(openai_client):
    import openai

    with pytest.raises(openai.BadRequestError, match="temperature"):
        openai_client.chat.completions.create(model=MODEL, messages=HI, temperature=9)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        openai_client.chat.completions.create(model="gpt-4o", messages=HI)
    with pytest.raises(openai.BadRequestError, match="tool-call-parser"):
        openai_client.chat.completions.create(
            model=MODEL, messages=HI, tools=[{"type": "function", "function": {"name": "f"}}]
        )
    ok = openai_client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_no_op_values_of_unimplemented_parameters_are_accepted(http):
    body = {**CHAT, "store": False, "response_format": {"type": "text"}, "service_tier": "auto", "modalities": ["text"]}
    assert http.post("/v1/chat/completions", json=body).status_code == 200
    body = {**COMPLETION, "best_of": 1, "suffix": None}
    assert http.post("/v1/completions", json=body).status_code == 200


def test_chat_without_a_chat_template_is_400(tokenizer):
    """The bundled model has a template; the same real tokenizer with its template removed has none."""
    import copy

    from serving.chat import render_prompt
    from serving.errors import APIError
    from serving.protocol import ChatMessage

    bare = copy.copy(tokenizer)
    bare.hf = copy.copy(tokenizer.hf)
    bare.hf.chat_template = None
    with pytest.raises(APIError) as raised:
        render_prompt(bare, [ChatMessage(role="user", content="Hi")])
    assert raised.value.status == 400 and "no chat template" in raised.value.message
    assert render_prompt(tokenizer, [ChatMessage(role="user", content="Hi")])
