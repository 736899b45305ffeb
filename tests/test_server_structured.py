"""Structured outputs through the HTTP API on the bundled SmolLM2 (the session's shared server):
22 JSON schemas at temperature 0.8, three seeds each (n = 3), streamed and not; JSON mode; regex
and choice under vLLM's field names on both routes; and every bad constraint answered with a 400
that names its parameter while the server serves on."""

from __future__ import annotations

import concurrent.futures
import json
import re

import jsonschema
import pytest

from tests.server_fixtures import MODEL
from tests.test_server_errors import assert_error, assert_still_serving

pytest_plugins = ("tests.server_fixtures",)


def _obj(required: dict, optional: dict | None = None) -> dict:
    props = {**required, **(optional or {})}
    return {"type": "object", "properties": props, "required": list(required), "additionalProperties": False}


NAME = {"type": "string", "maxLength": 16}
INT = {"type": "integer", "minimum": 0, "maximum": 99}
SCHEMAS: dict[str, tuple[str, dict]] = {
    "person": ("a person", _obj({"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}})),
    "nested": (
        "a user account",
        _obj(
            {
                "user": _obj({"id": {"type": "integer", "minimum": 1, "maximum": 9999}, "handle": NAME}),
                "active": {"type": "boolean"},
            }
        ),
    ),
    "array-bounds": (
        "three tags for a blog post",
        _obj({"tags": {"type": "array", "items": NAME, "minItems": 2, "maxItems": 3}}),
    ),
    "enums": ("a t-shirt", _obj({"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": ["S", "M", "L"]}})),
    "optional": ("a city", _obj({"city": NAME}, {"population": {"type": "integer", "minimum": 0, "maximum": 10**8}})),
    "number-ranges": (
        "today's weather",
        _obj({"celsius": {"type": "number", "minimum": -20, "maximum": 45}, "humidity": INT}),
    ),
    "patterns": (
        "a US address",
        _obj(
            {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}, "state": {"type": "string", "pattern": "^[A-Z]{2}$"}}
        ),
    ),
    "anyof-scalar": ("a value", _obj({"value": {"anyOf": [INT, {"type": "string", "maxLength": 8}]}})),
    "anyof-objects": (
        "a shape",
        _obj(
            {
                "shape": {
                    "anyOf": [
                        _obj({"kind": {"const": "circle"}, "radius": {"type": "number", "minimum": 0, "maximum": 10}}),
                        _obj({"kind": {"const": "square"}, "side": {"type": "number", "minimum": 0, "maximum": 10}}),
                    ]
                }
            }
        ),
    ),
    "array-of-objects": (
        "a shopping list",
        _obj({"items": {"type": "array", "items": _obj({"name": NAME, "qty": INT}), "minItems": 1, "maxItems": 2}}),
    ),
    "top-level-array": (
        "some lottery numbers",
        {"type": "array", "items": INT, "minItems": 3, "maxItems": 5},
    ),
    "nullable": ("a status", _obj({"ok": {"type": "boolean"}, "error": {"type": ["string", "null"], "maxLength": 16}})),
    "deep": ("a coordinate", _obj({"a": _obj({"b": _obj({"c": INT})})})),
    "date-pattern": (
        "a meeting",
        _obj({"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}, "topic": NAME}),
    ),
    "integer-enum": ("a review", _obj({"rating": {"enum": [1, 2, 3, 4, 5]}, "comment": NAME})),
    "const": ("a config", _obj({"version": {"const": "1.0"}, "debug": {"type": "boolean"}})),
    "exclusive-minimum": (
        "a price",
        _obj(
            {
                "amount": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000},
                "currency": {"enum": ["USD", "EUR"]},
            }
        ),
    ),
    "array-of-enums": (
        "working days",
        _obj({"days": {"type": "array", "items": {"enum": ["mon", "tue", "wed", "thu", "fri"]}, "maxItems": 3}}),
    ),
    "refs": (
        "a line segment",
        {
            "$defs": {"point": _obj({"x": INT, "y": INT})},
            **_obj({"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}}),
        },
    ),
    "string-lengths": (
        "a product code",
        _obj({"code": {"type": "string", "minLength": 4, "maxLength": 6, "pattern": "^[A-Z0-9]+$"}}),
    ),
    "integer-range": (
        "a count",
        _obj({"count": {"type": "integer", "minimum": 10, "maximum": 20}, "even": {"type": "boolean"}}),
    ),
    "top-level-enum": ("a Greek letter", {"enum": ["alpha", "beta", "gamma"]}),
}


def ask(what: str) -> list[dict]:
    return [{"role": "user", "content": f"Reply in JSON: {what}."}]


def chat_choices(client, stream: bool, **kwargs) -> list[tuple[str, str]]:
    """-> (content, finish_reason) per choice, streamed or not."""
    kwargs = {"model": MODEL, "temperature": 0.8, "max_tokens": 64, **kwargs}
    if not stream:
        return [(c.message.content, c.finish_reason) for c in client.chat.completions.create(**kwargs).choices]
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return [(texts[i], finish[i]) for i in sorted(texts)]


def test_json_schemas_give_valid_json_streamed_and_not(openai_client):
    def one(i: int, name: str) -> tuple[str, list[tuple[str, str]]]:
        what, schema = SCHEMAS[name]
        fmt = {"type": "json_schema", "json_schema": {"name": name.replace("-", "_"), "schema": schema, "strict": True}}
        return name, chat_choices(openai_client, i % 2 == 1, messages=ask(what), response_format=fmt, n=3, seed=i)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(len(SCHEMAS)), SCHEMAS))
    finished = 0
    for name, choices in results:
        assert len(choices) == 3
        for text, finish in choices:
            assert finish in ("stop", "length"), (name, finish)
            if finish == "stop":  # cut by max_tokens, the JSON may be incomplete
                jsonschema.validate(json.loads(text), SCHEMAS[name][1])
                finished += 1
    assert finished >= 0.9 * 3 * len(SCHEMAS), results


def test_json_mode_gives_objects(openai_client):
    fmt = {"type": "json_object"}
    for stream in (False, True):
        for text, finish in chat_choices(
            openai_client, stream, messages=ask("a cat"), response_format=fmt, n=3, seed=5
        ):
            if finish == "stop":
                assert isinstance(json.loads(text), dict)
            else:
                assert text.lstrip().startswith("{")


def test_regex_and_choice_under_vllm_names_on_both_routes(openai_client):
    phone = r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"
    moods = ["happy", "sad", "angry"]
    out = openai_client.completions.create(
        model=MODEL, prompt="Call me at", max_tokens=24, temperature=0.8, n=3, extra_body={"guided_regex": phone}
    )
    assert all(re.fullmatch(phone, c.text) and c.finish_reason == "stop" for c in out.choices), out
    out = openai_client.completions.create(
        model=MODEL,
        prompt="I feel",
        max_tokens=8,
        temperature=0.8,
        n=3,
        extra_body={"structured_outputs": {"choice": moods}},
    )
    assert all(c.text in moods for c in out.choices), out
    for body in ({"guided_choice": moods}, {"structured_outputs": {"regex": "(yes|no)!"}}):
        for text, finish in chat_choices(openai_client, True, messages=ask("Are you happy?"), n=2, extra_body=body):
            assert (text in moods if "guided_choice" in body else text in ("yes!", "no!")) and finish == "stop"
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMAS["enums"][1]}}
    out = openai_client.completions.create(
        model=MODEL, prompt="A shirt as JSON:", max_tokens=32, temperature=0.8, extra_body={"response_format": fmt}
    )
    jsonschema.validate(json.loads(out.choices[0].text), SCHEMAS["enums"][1])
    grammar = 'start: "The answer is " NUMBER "."\nNUMBER: /[0-9]{1,3}/'
    out = openai_client.completions.create(
        model=MODEL, prompt="6 times 7?", max_tokens=16, temperature=0.8, extra_body={"guided_grammar": grammar}
    )
    assert re.fullmatch(r"The answer is [0-9]{1,3}\.", out.choices[0].text), out


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format", "objectx"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "is required"),
    ({"response_format": {"type": "xml"}}, "response_format.type", ""),
    ({"guided_regex": "(("}, "guided_regex", "regex"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_grammar": "start: foo"}, "guided_grammar", "foo"),
    ({"guided_choice": []}, "guided_choice", "at least one"),
    ({"structured_outputs": {"regex": "(("}}, "structured_outputs.regex", "regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs.choice", "only one"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex", "only one"),
    ({"structured_outputs": {"backend": "xgrammar"}}, "structured_outputs.backend", "Unrecognized"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "param", "words"), BAD, ids=[p for _, p, _ in BAD])
def test_a_bad_constraint_is_400_naming_its_parameter(http, extra, param, words):
    assert_error(http.post("/v1/chat/completions", json={**CHAT, **extra}), 400, param, words)
    assert_still_serving(http)
