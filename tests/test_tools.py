"""The tool-call parsers on recorded model texts (no model): one and several calls, text around
them, malformed JSON (content, never an exception), and the streaming splitter, whose content and
calls are those of the whole text."""

from __future__ import annotations

import json

import pytest

from serving.tools import StreamSplitter, call_schema, parser

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


@pytest.mark.parametrize("text", [HERMES_TWO, "No tools needed: the answer is 4.", "a <tool_cal> lookalike <tool"])
@pytest.mark.parametrize("step", [1, 4, 17])
def test_streamed_text_splits_as_the_whole_text_parses(text, step):
    splitter = StreamSplitter(parser("hermes"))
    streamed = "".join(splitter.feed(text[i : i + step]) for i in range(0, len(text), step))
    rest, calls = splitter.finish()
    content, whole = parser("hermes").parse(text)
    assert "<tool_call>" not in streamed
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole]
    assert (streamed + rest).strip() == (content or "").strip()


def test_call_schema_fixes_the_name_and_takes_the_parameters():
    schema = call_schema("f", {"type": "object", "properties": {"x": {"type": "integer"}}})
    assert schema["properties"]["name"] == {"const": "f"} and schema["required"] == ["name", "arguments"]
