"""Tool calls in a model's text: the parsers of `--tool-call-parser`, the grammar that makes a
model call a tool (`tool_choice: "required"` or a named function), and the streaming splitter that
keeps tool-call markup out of streamed content.

- `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number, text around
  them is content (Hermes, Qwen 2.5/3, the shipped `serving/templates/hermes_tools.jinja`).
- `llama3_json`: the whole message is `{"name": ..., "parameters": {...}}`, several joined by `;`,
  after an optional `<|python_tag|>` (Llama 3.1/3.2 with JSON tool calls).

Malformed calls are content, never an error.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from typing import Any

PARSERS = ("hermes", "llama3_json")


@dataclasses.dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text
    id: str = dataclasses.field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def _call(obj: Any, args_key: str) -> ParsedCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", {}))
    return ParsedCall(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


class ToolParser:
    """One parser: `parse` a whole message; `start` is where its markup begins (for streaming)."""

    start: str = ""

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """-> (content, calls); no calls and the text as content when nothing parses."""
        raise NotImplementedError

    def grammar(self, schemas: list[dict[str, Any]], parallel: bool) -> str:
        """A Lark grammar (llguidance's, with `%json`) of one call, or several if `parallel`,
        whose JSON is one of `schemas` ({"name", "arguments"} objects)."""
        raise NotImplementedError


def _call_schema(schemas: list[dict[str, Any]]) -> str:
    return json.dumps(schemas[0] if len(schemas) == 1 else {"anyOf": schemas})


class HermesParser(ToolParser):
    start = "<tool_call>"
    _CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        calls = []
        for m in self._CALL.finditer(text):
            try:
                call = _call(json.loads(m[1]), "arguments")
            except json.JSONDecodeError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
        if not calls:
            return text, []
        content = self._CALL.sub("", text).strip()
        return content or None, calls

    def grammar(self, schemas: list[dict[str, Any]], parallel: bool) -> str:
        call = f'"<tool_call>\\n" %json {_call_schema(schemas)} "\\n</tool_call>"'
        return f"start: call{'+' if parallel else ''}\ncall: {call}"


class Llama3JsonParser(ToolParser):
    start = "{"
    _TAG = "<|python_tag|>"

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        body = text.strip().removeprefix(self._TAG).strip()
        if not body.startswith("{"):
            return text, []
        calls, decoder, at = [], json.JSONDecoder(), 0
        try:
            while at < len(body):
                obj, at = decoder.raw_decode(body, at)
                call = _call(obj, "parameters")
                if call is None:
                    return text, []
                calls.append(call)
                at = len(body) - len(body[at:].lstrip().removeprefix(";").lstrip())
        except json.JSONDecodeError:
            return text, []
        return None, calls

    def grammar(self, schemas: list[dict[str, Any]], parallel: bool) -> str:
        schemas = [{**s, "properties": {"name": s["properties"]["name"], "parameters": s["properties"]["arguments"]},
                    "required": ["name", "parameters"]} for s in schemas]  # fmt: skip
        more = ' ("; " call)*' if parallel else ""
        return f"start: call{more}\ncall: %json {_call_schema(schemas)}"


def parser(name: str) -> ToolParser:
    return {"hermes": HermesParser, "llama3_json": Llama3JsonParser}[name]()


def call_schema(name: str, parameters: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON of a call of function `name` with these parameters."""
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": parameters or {"type": "object"}},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


class StreamSplitter:
    """A streamed message's text -> content deltas, holding back what may be tool-call markup.

    Content flows until the parser's markup could begin; from there the text is held, and the
    whole message is parsed at its end (`finish`): its calls are sent then, or the held text as
    content if it was no call after all."""

    def __init__(self, p: ToolParser) -> None:
        self._parser = p
        self._text = ""
        self._sent = 0  # characters of _text sent as content
        self._held = False

    def feed(self, delta: str) -> str:
        self._text += delta
        if self._held:
            return ""
        at = self._text.find(self._parser.start, self._sent)
        if at >= 0:
            self._held = True
            out, self._sent = self._text[self._sent : at], at
            return out
        keep = next(
            (k for k in range(len(self._parser.start) - 1, 0, -1) if self._text.endswith(self._parser.start[:k])), 0
        )
        end = len(self._text) - keep
        out, self._sent = self._text[self._sent : end], max(self._sent, end)
        return out

    def finish(self) -> tuple[str, list[ParsedCall]]:
        """-> (the rest of the content, the calls)."""
        rest = self._text[self._sent :]
        content, calls = self._parser.parse(rest)
        return (content or "", calls) if calls else (rest, [])
