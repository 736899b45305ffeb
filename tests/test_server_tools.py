"""Tools through the official `openai` client, on the bundled SmolLM2 with the shipped Hermes-style
template (`--chat-template serving/templates/hermes_tools.jinja --tool-call-parser hermes`):
`required` and a named `tool_choice` give calls whose arguments validate (the grammar mask holds
even a 135M model to the schema), streamed calls come name first then argument fragments that add
up to the whole response's, a full round trip, `none` gives plain content, and bad tool inputs are
400s after which the server serves on; then the same calls with `--tool-call-parser llama3_json`."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import jsonschema
import pytest

from tests.server_fixtures import MODEL, REPO, ServerProcess, assert_matches_schema, ready_server
from tests.test_server_errors import assert_error

pytest_plugins = ("tests.server_fixtures",)

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "pattern": "^[A-Z][a-z]+/[A-Z][a-z]+$"}},
    "required": ["timezone"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "description": "Time in a timezone", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather like in Paris?"}]


@pytest.fixture(scope="module")
def tool_server(aot_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    template = str(REPO / "serving" / "templates" / "hermes_tools.jinja")
    log = tmp_path_factory.mktemp("logs") / "tools.log"
    with ready_server(aot_dir, log, "--chat-template", template, "--tool-call-parser", "hermes") as proc:
        yield proc


@pytest.fixture(scope="module")
def client(tool_server):
    import openai

    return openai.OpenAI(base_url=tool_server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def create(client, **kwargs):
    kwargs = {"model": MODEL, "messages": ASK, "tools": TOOLS, "temperature": 0.8, "max_tokens": 80, **kwargs}
    return client.chat.completions.create(**kwargs)


def assert_valid_calls(message, names=tuple(SCHEMAS)) -> None:
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_and_named_tool_choice_give_valid_calls(client):
    for seed in range(3):
        choice = create(client, tool_choice="required", parallel_tool_calls=False, seed=seed).choices[0]
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        assert_valid_calls(choice.message)
    named = {"type": "function", "function": {"name": "get_time"}}
    out = create(client, tool_choice=named, seed=4, n=2)
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert_valid_calls(choice.message, ("get_time",))


def streamed_calls(client, **kwargs) -> tuple[str, str | None, list[dict]]:
    """-> (content, finish reason, calls) of a stream, its calls put together as a client does;
    each call's `fragments` counts the chunks that carried its arguments."""
    calls: dict[int, dict] = {}
    content, finish = "", None
    for chunk in create(client, stream=True, **kwargs):
        assert_matches_schema(chunk.to_dict(), "CreateChatCompletionStreamResponse")
        for c in chunk.choices:
            content += c.delta.content or ""
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or ():
                if d.index not in calls:  # the first chunk of a call: id, type and name, no arguments yet
                    assert d.id.startswith("call_") and d.type == "function" and d.function.name, d
                    assert d.function.arguments == "", d
                    calls[d.index] = {"name": d.function.name, "arguments": "", "fragments": 0}
                else:
                    assert d.id is None and d.function.name is None and d.function.arguments, d
                    calls[d.index]["arguments"] += d.function.arguments
                    calls[d.index]["fragments"] += 1
    return content, finish, list(calls.values())


def test_streamed_tool_calls_come_name_first_then_argument_fragments(client):
    whole = create(client, tool_choice="required", seed=11).choices[0].message
    content, finish, calls = streamed_calls(client, tool_choice="required", seed=11)
    assert finish == "tool_calls" and "tool_call" not in content
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in whole.tool_calls
    ]
    assert max(c["fragments"] for c in calls) > 1, calls  # streamed as generated, not whole at the end


def test_a_round_trip_and_tool_choice_none(client):
    call = create(client, tool_choice={"type": "function", "function": {"name": "get_weather"}}, seed=1)
    message = call.choices[0].message
    history = [
        *ASK,
        {"role": "assistant", "tool_calls": [c.model_dump() for c in message.tool_calls]},
        {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": '{"temperature": 21}'},
    ]
    final = create(client, messages=history, temperature=0, max_tokens=24).choices[0]
    assert final.message.content and final.finish_reason in ("stop", "length", "tool_calls")
    plain = create(client, tool_choice="none", temperature=0, max_tokens=16).choices[0]
    assert plain.message.tool_calls is None and plain.message.content


BAD = [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "not in 'tools'"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    ({"messages": [*ASK, {"role": "tool", "content": "21"}]}, "messages[1].tool_call_id", "tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0]", "only an 'assistant'"),
    ({"response_format": {"type": "json_object"}}, "tools", "exclude each other"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name", ""),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objectx"}}}],
      "tool_choice": "required"}, "tools", "objectx"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "param", "words"), BAD, ids=[f"{p}-{i}" for i, (_, p, _) in enumerate(BAD)])
def test_bad_tool_inputs_are_400(tool_server, extra, param, words):
    body = {"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 4, **extra}
    with httpx.Client(base_url=tool_server.url, timeout=300) as http:
        assert_error(http.post("/v1/chat/completions", json=body), 400, param, words)
        ok = http.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 4})
        assert ok.status_code == 200, ok.text


@pytest.fixture(scope="module")
def llama3_client(aot_dir, tmp_path_factory):
    import openai

    template = str(REPO / "serving" / "templates" / "hermes_tools.jinja")
    log = tmp_path_factory.mktemp("logs") / "tools-llama3.log"
    with ready_server(aot_dir, log, "--chat-template", template, "--tool-call-parser", "llama3_json") as proc:
        yield openai.OpenAI(base_url=proc.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_llama3_json_calls_validate_and_stream_as_the_whole_response(llama3_client):
    kwargs = {"tool_choice": "required", "parallel_tool_calls": False, "seed": 5}
    choice = create(llama3_client, **kwargs).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert_valid_calls(choice.message)
    content, finish, calls = streamed_calls(llama3_client, **kwargs)
    assert finish == "tool_calls" and content == ""
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in choice.message.tool_calls
    ]
    assert max(c["fragments"] for c in calls) > 1, calls
