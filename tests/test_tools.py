"""The tool-call parsers on recorded model texts (no model): one and several calls, text around
them, malformed JSON (content, never an exception), and the incremental parser of streams fed in
pieces, whose content and calls (a name first, then argument fragments) are those of the whole text."""

from __future__ import annotations

import json

import pytest

from serving.tools import CallDelta, ToolStream, call_schema, parser

HERMES_TWO = (
    "Let me look both up.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}\n</tool_call>'
)


def calls_of(name: str, text: str) -> tuple[str | None, list[tuple[str, dict]]]:
    content, calls = parser(name).parse(text)
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


def test_hermes_reads_several_calls_and_the_text_around_them():
    content, calls = calls_of("hermes", HERMES_TWO)
    assert content == "Let me look both up."
    assert calls == [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"timezone": "Europe/Paris"})]
    assert calls_of("hermes", '<tool_call>{"name": "f", "arguments": {}}</tool_call>') == (None, [("f", {})])


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par\n</tool_call>',  # cut JSON
        '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
        '<tool_call>\n["get_weather"]\n</tool_call>',
        "The weather is fine.",
        '<tool_call>\n{"name": "get_weather", "arguments": {}}',  # never closed (cut by max_tokens)
    ],
)
def test_hermes_malformed_calls_are_content(text):
    assert calls_of("hermes", text) == (text, [])


def test_llama3_json_reads_calls_joined_by_semicolons():
    text = (
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "get_time", "parameters": {}}'
    )
    assert calls_of("llama3_json", text) == (None, [("get_weather", {"city": "Oslo"}), ("get_time", {})])
    assert calls_of("llama3_json", '{"name": "f", "arguments": {"x": 1}}') == (None, [("f", {"x": 1})])
    for text in ('{"name": "f", "parameters": {', "Hello {there}", '{"city": "Oslo"}'):
        assert calls_of("llama3_json", text) == (text, [])


def stream(name: str, pieces: list[str]) -> tuple[str, list[CallDelta], bool]:
    """-> (the content, every call delta, whether the message was calls) of `pieces` streamed."""
    s, content, deltas = ToolStream(parser(name)), "", []
    for piece in pieces:
        text, calls = s.feed(piece)
        content, deltas = content + text, deltas + calls
    rest, calls, are_calls = s.finish()
    return content + rest, deltas + calls, are_calls


def reassemble(deltas: list[CallDelta]) -> list[tuple[str, str]]:
    """The calls as a client puts them together, checking that each begins with its id and name."""
    calls: dict[int, list[str]] = {}
    for d in deltas:
        if d.index not in calls:
            assert d.id and d.id.startswith("call_") and d.name and d.arguments == "", d
            calls[d.index] = [d.name, ""]
        else:
            assert d.id is None and d.name is None and d.arguments, d
            calls[d.index][1] += d.arguments
    assert sorted(calls) == list(range(len(calls)))
    return [(name, args) for name, args in calls.values()]


def whole(name: str, text: str) -> tuple[str, list[tuple[str, str]]]:
    content, calls = parser(name).parse(text)
    return (content or "").strip(), [(c.name, c.arguments) for c in calls]


def test_every_split_of_two_hermes_calls_streams_the_calls_of_the_whole_text():
    content, calls = whole("hermes", HERMES_TWO)
    for at in range(len(HERMES_TWO) + 1):
        streamed, deltas, are_calls = stream("hermes", [HERMES_TWO[:at], HERMES_TWO[at:]])
        assert are_calls and reassemble(deltas) == calls, at
        assert "<tool_call>" not in streamed and streamed.strip() == content, at


@pytest.mark.parametrize("step", [1, 3, 17])
def test_hermes_arguments_stream_in_fragments_after_the_name(step):
    pieces = [HERMES_TWO[i : i + step] for i in range(0, len(HERMES_TWO), step)]
    streamed, deltas, are_calls = stream("hermes", pieces)
    assert are_calls and reassemble(deltas) == whole("hermes", HERMES_TWO)[1]
    assert streamed.strip() == "Let me look both up."
    for index in (0, 1):
        mine = [d for d in deltas if d.index == index]
        assert mine[0].name and len(mine) > 2  # the name, then several fragments
    # the first call's name and first fragment come before the second call is written
    first_args = next(i for i, d in enumerate(deltas) if d.index == 0 and d.arguments)
    assert first_args < next(i for i, d in enumerate(deltas) if d.index == 1)


def test_llama3_json_calls_stream_in_fragments():
    text = '{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "get_time", "parameters": {}}'
    for t in (text, "<|python_tag|>" + text):
        streamed, deltas, are_calls = stream("llama3_json", list(t))
        assert are_calls and streamed == "" and reassemble(deltas) == whole("llama3_json", t)[1]
        assert len([d for d in deltas if d.index == 0]) > 2


@pytest.mark.parametrize(
    "text",
    [
        "No tools needed: the answer is 4.",
        "a <tool_cal> lookalike <tool",
        '<tool_call>\n["get_weather"]\n</tool_call>',
        '<tool_call>\n{"name": 3, "arguments": {}}\n</tool_call>',
    ],
)
@pytest.mark.parametrize("step", [1, 4, 17])
def test_streamed_text_that_is_no_call_is_content(text, step):
    streamed, deltas, are_calls = stream("hermes", [text[i : i + step] for i in range(0, len(text), step)])
    assert (streamed, deltas, are_calls) == (text, [], False)


def test_a_call_in_another_key_order_streams_whole_once_complete():
    text = '<tool_call>{"arguments": {"x": [1, "]}"]}, "name": "f"}</tool_call> Done.'
    streamed, deltas, are_calls = stream("hermes", list(text))
    assert are_calls and streamed == "Done." and reassemble(deltas) == whole("hermes", text)[1]
    assert [d.arguments for d in deltas] == ["", '{"x": [1, "]}"]}']


def test_a_call_cut_after_its_name_stays_a_call_in_a_stream():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    streamed, deltas, are_calls = stream("hermes", list(text))
    assert not are_calls and streamed == ""  # the finish reason stays the engine's ("length")
    assert reassemble(deltas) == [("get_weather", '{"city": "Par')]
    assert whole("hermes", text) == (text, [])  # whole, it is content


def test_call_schema_fixes_the_name_and_takes_the_parameters():
    schema = call_schema("f", {"type": "object", "properties": {"x": {"type": "integer"}}})
    assert schema["properties"]["name"] == {"const": "f"} and schema["required"] == ["name", "arguments"]
