"""Tool calls in a model's text: the parsers of `--tool-call-parser`, the grammar that makes a
model call a tool (`tool_choice: "required"` or a named function), and the incremental parser that
streams calls as OpenAI does while keeping their markup out of streamed content.

- `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number, text around
  them is content (Hermes, Qwen 2.5/3, the shipped `serving/templates/hermes_tools.jinja`).
- `llama3_json`: the whole message is `{"name": ..., "parameters": {...}}`, several joined by `;`,
  after an optional `<|python_tag|>` (Llama 3.1/3.2 with JSON tool calls).

A call's `arguments` are the JSON text the model wrote when they are an object or array (so that
streamed fragments add up to them), else re-encoded. Malformed calls are content, never an error.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from typing import Any

PARSERS = ("hermes", "llama3_json")


def _new_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclasses.dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text
    id: str = dataclasses.field(default_factory=_new_id)


@dataclasses.dataclass(frozen=True)
class CallDelta:
    """One streamed piece of call `index`: its first has the id and name (and no arguments), the
    next ones fragments of its arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class _JsonScan:
    """Where the JSON object or array that begins at `start` ends, read as the text grows: brackets
    are counted outside strings (the JSON itself is checked once whole, by `json.loads`)."""

    def __init__(self, start: int) -> None:
        self.start = self.pos = start
        self.end: int | None = None
        self._depth, self._in_string, self._escaped = 0, False, False

    def advance(self, text: str, limit: int) -> int | None:
        """Read up to `limit`; -> the end (after the closing bracket) once read."""
        while self.end is None and self.pos < limit:
            c = text[self.pos]
            self.pos += 1
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif c == "\\":
                    self._escaped = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth <= 0:
                    self.end = self.pos
        return self.end


def _partial_suffix(text: str, marker: str) -> int:
    """How many last characters of `text` may begin `marker`."""
    return next((k for k in range(len(marker) - 1, 0, -1) if text.endswith(marker[:k])), 0)


class ToolParser:
    """One parser: `parse` a whole message; its markup begins with one of `starts`, a call's ends
    with `end` (if any), and `next_call` finds the JSON of each call (for streaming)."""

    starts: tuple[str, ...] = ()
    end: str = ""
    args_keys: tuple[str, ...] = ("arguments",)

    def __init__(self) -> None:
        keys = "|".join(self.args_keys)
        # A call's JSON up to the first character of its arguments, when its name comes first.
        self.head = re.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:' + keys + r')"\s*:\s*(?=\S)')

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """-> (content, calls); no calls and the text as content when nothing parses."""
        raise NotImplementedError

    def next_call(self, text: str, at: int) -> int | None:
        """Where the JSON (`{`) of the next call after `at` begins; None while that is unknown,
        -1 if what follows cannot be a call."""
        raise NotImplementedError

    def grammar(self, schemas: list[dict[str, Any]], parallel: bool) -> str:
        """A Lark grammar (llguidance's, with `%json`) of one call, or several if `parallel`,
        whose JSON is one of `schemas` ({"name", "arguments"} objects)."""
        raise NotImplementedError

    def call(self, body: str) -> ParsedCall | None:
        """One call's JSON text -> the call, or None if it is none."""
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        if (m := self.head.match(body)) and body[m.end()] in "{[":
            end = _JsonScan(m.end()).advance(body, len(body))
            return ParsedCall(obj["name"], body[m.end() : end])
        args = next((obj[k] for k in self.args_keys if k in obj), {})
        return ParsedCall(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


def _call_schema(schemas: list[dict[str, Any]]) -> str:
    return json.dumps(schemas[0] if len(schemas) == 1 else {"anyOf": schemas})


class HermesParser(ToolParser):
    starts = ("<tool_call>",)
    end = "</tool_call>"
    _CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
    _OPEN = re.compile(r"<tool_call>\s*(\S)")

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        calls = []
        for m in self._CALL.finditer(text):
            call = self.call(m[1])
            if call is None:
                return text, []
            calls.append(call)
        if not calls:
            return text, []
        content = self._CALL.sub("", text).strip()
        return content or None, calls

    def next_call(self, text: str, at: int) -> int | None:
        m = self._OPEN.search(text, at)
        return None if m is None else m.start(1) if m[1] == "{" else -1

    def grammar(self, schemas: list[dict[str, Any]], parallel: bool) -> str:
        call = f'"<tool_call>\\n" %json {_call_schema(schemas)} "\\n</tool_call>"'
        return f"start: call{'+' if parallel else ''}\ncall: {call}"


class Llama3JsonParser(ToolParser):
    starts = ("{", "<|python_tag|>")
    args_keys = ("parameters", "arguments")
    _TAG = "<|python_tag|>"

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        body = text.strip().removeprefix(self._TAG).strip()
        if not body.startswith("{"):
            return text, []
        calls, decoder, at = [], json.JSONDecoder(), 0
        try:
            while at < len(body):
                start = at
                _, at = decoder.raw_decode(body, at)
                call = self.call(body[start:at])
                if call is None:
                    return text, []
                calls.append(call)
                at = len(body) - len(body[at:].lstrip().removeprefix(";").lstrip())
        except json.JSONDecodeError:
            return text, []
        return None, calls

    def next_call(self, text: str, at: int) -> int | None:
        rest = text[at:].lstrip().removeprefix(self._TAG).lstrip().removeprefix(";").lstrip()
        if not rest:
            return None
        return len(text) - len(rest) if rest[0] == "{" else -1

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


@dataclasses.dataclass
class _OpenCall:
    """A call of the stream: where its JSON begins, and what of it was sent."""

    scan: _JsonScan  # its JSON object
    id: str = dataclasses.field(default_factory=_new_id)
    name: str | None = None  # once sent
    args: _JsonScan | None = None  # its arguments, when they are sent as they come
    sent: str = ""  # the arguments sent


class ToolStream:
    """A streamed message's text -> content deltas and tool-call deltas (`CallDelta`).

    Content flows until the parser's markup could begin; from there nothing is content until the
    end. Each call is sent as soon as its name is read, then its arguments as they come, when it is
    `{"name": ..., "arguments": {...}}` in that order; a call in another shape is sent whole once
    its JSON is complete. At the end (`finish`) the held text is parsed whole: calls not yet sent
    are sent then, or the held text is content if it was no call after all. A call already sent
    stays a call even if the rest then fails to parse (cut by max_tokens, or broken JSON)."""

    def __init__(self, p: ToolParser) -> None:
        self._parser = p
        self._text = ""
        self._sent = 0  # characters of _text sent as content
        self._region: int | None = None  # where the markup began
        self._calls: list[_OpenCall] = []
        self._stuck = False  # what follows is no call the stream can read: wait for the end

    def feed(self, delta: str) -> tuple[str, list[CallDelta]]:
        """-> (content, call deltas) that `delta` adds."""
        self._text += delta
        content = self._content() if self._region is None else ""
        return content, self._advance() if self._region is not None else []

    def _content(self) -> str:
        starts = self._parser.starts
        at = min((i for s in starts if (i := self._text.find(s, self._sent)) >= 0), default=-1)
        end = at if at >= 0 else len(self._text) - max(_partial_suffix(self._text, s) for s in starts)
        out, self._sent = self._text[self._sent : end], max(self._sent, end)
        if at >= 0:
            self._region = at
        return out

    def _advance(self) -> list[CallDelta]:
        text, out = self._text, []
        while not self._stuck:
            if not self._calls or self._calls[-1].scan.end is not None:
                at = self._calls[-1].scan.end if self._calls else self._region
                start = self._parser.next_call(text, at)
                if start is None:
                    break
                if start < 0:
                    self._stuck = True
                    break
                self._calls.append(_OpenCall(_JsonScan(start)))
            call, index = self._calls[-1], len(self._calls) - 1
            limit = self._limit(call.scan.start)
            call.scan.advance(text, limit)
            out += self._call_deltas(index, call, limit)
            if call.scan.end is None:
                break
        return out

    def _limit(self, start: int) -> int:
        """How far a call's JSON may be read: not into (what may begin) its end marker."""
        if not self._parser.end:
            return len(self._text)
        at = self._text.find(self._parser.end, start)
        return at if at >= 0 else len(self._text) - _partial_suffix(self._text, self._parser.end)

    def _call_deltas(self, index: int, call: _OpenCall, limit: int) -> list[CallDelta]:
        text, out = self._text, []
        if call.name is None and (m := self._parser.head.match(text, call.scan.start)):
            call.name = json.loads(m[1])
            out.append(CallDelta(index, call.id, call.name))
            if text[m.end()] in "{[":
                call.args = _JsonScan(m.end())
        if call.args is not None:
            end = call.args.advance(text, limit)
            fragment = text[call.args.start + len(call.sent) : end if end is not None else call.args.pos]
            if fragment:
                call.sent += fragment
                out.append(CallDelta(index, arguments=fragment))
        elif call.scan.end is not None:  # complete, and not sent as it came: whole now
            parsed = self._parser.call(text[call.scan.start : call.scan.end])
            if parsed is None or parsed.name != (call.name or parsed.name):
                self._stuck = True
                return out
            if call.name is None:
                call.name = parsed.name
                out.append(CallDelta(index, call.id, call.name))
            call.sent = parsed.arguments
            out.append(CallDelta(index, arguments=parsed.arguments))
        return out

    def finish(self) -> tuple[str, list[CallDelta], bool]:
        """-> (the rest of the content, the last call deltas, whether the message is calls that
        all parse)."""
        if self._region is None:
            return self._text[self._sent :], [], False
        content, calls = self._parser.parse(self._text[self._region :])
        sent = [c for c in self._calls if c.name is not None]
        if (
            calls
            and len(calls) >= len(sent)
            and all(c.name == s.name and c.arguments.startswith(s.sent) for c, s in zip(calls, sent, strict=False))
        ):
            out = []
            for index, c in enumerate(calls):
                if index < len(sent):
                    if rest := c.arguments[len(sent[index].sent) :]:
                        out.append(CallDelta(index, arguments=rest))
                else:
                    out += [CallDelta(index, c.id, c.name), CallDelta(index, arguments=c.arguments)]
            return content or "", out, True
        if not sent:
            return self._text[self._sent :], [], False
        # Calls were sent and cannot be taken back: what follows the last whole one is content.
        end = sent[-1].scan.end
        rest = "" if end is None else self._text[end:].lstrip().removeprefix(self._parser.end)
        return rest.strip(), [], False
