"""POST /v1/chat/completions: messages -> chat template -> engine -> `chat.completion`(`.chunk`s).

With `tools` (and `--tool-call-parser`), the tools are rendered by the chat template, and the
parser reads the calls from each choice's text (serving/tools.py): a whole choice is parsed at its
end; a stream sends content until tool-call markup may begin, then each call as OpenAI does (its id
and name once read, then fragments of its arguments as they come). `tool_choice: "required"` or a
named function constrains the output to calls (the parameters' JSON schema included) with the
engine's grammar mask."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

from graph.api import RequestOutput, SamplingParams, StructuredSpec
from models.tokenizer import ChatTemplateError, NoChatTemplateError, Tokenizer
from serving.errors import bad_request
from serving.generation import sse_frame
from serving.handler import Part, Reply
from serving.logprobs import chat_logprobs
from serving.protocol import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChatResponseMessage,
    DeltaFunction,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    NamedToolChoice,
    ToolCall,
    UsageInfo,
)
from serving.tools import CallDelta, ToolParser, ToolStream, call_schema, parser

_NO_TEMPLATE = (
    "This model has no chat template, so it cannot serve /v1/chat/completions. "
    "Use /v1/completions with a prompt instead."
)


def _turn(m: ChatMessage) -> dict[str, Any]:
    # Chat templates know `system`; `developer` is OpenAI's newer name for the same turn.
    turn: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
    if m.name is not None:
        turn["name"] = m.name
    if m.tool_call_id is not None:
        turn["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        turn["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": _arguments(c)}}
            for c in m.tool_calls
        ]
    return turn


def _arguments(call: ToolCall) -> Any:
    """A call's arguments as templates take them (transformers: a dict), or the text if not JSON."""
    try:
        return json.loads(call.function.arguments)
    except json.JSONDecodeError:
        return call.function.arguments


def render_prompt(
    tokenizer: Tokenizer,
    messages: list[ChatMessage],
    tools: list[dict[str, Any]] | None = None,
    template: str | None = None,
    add_generation_prompt: bool = True,
) -> list[int]:
    """Messages (and tools) -> the chat template (the model's, or `template`) -> token ids (the
    template adds any special tokens). Only the template's own refusal is the client's fault (400);
    anything else it raises is a bug of ours or of the template, and reaches the app's 500 handler,
    which logs its trace."""
    try:
        return tokenizer.encode_chat(
            [_turn(m) for m in messages], add_generation_prompt=True, tools=tools, template=template
        )
    except NoChatTemplateError as e:
        raise bad_request(_NO_TEMPLATE, "messages", "no_chat_template") from e
    except ChatTemplateError as e:  # the template itself refuses (e.g. "roles must alternate")
        raise bad_request(f"The model's chat template rejected the messages: {e.__cause__ or e}", "messages") from e


class ChatReply(Reply):
    id_prefix = "chatcmpl"
    prompt_param = "messages"
    req: ChatCompletionRequest

    def __init__(self, req: ChatCompletionRequest, state: Any, engine: Any) -> None:
        super().__init__(req, state, engine)
        self.template = state.chat_template
        self.tool_mode = req.tool_mode()
        self.parser: ToolParser | None = None
        if self.tool_mode != "none":
            if state.config.tool_call_parser is None:
                raise bad_request("This server takes no 'tools': it was started without --tool-call-parser", "tools")
            self.parser = parser(state.config.tool_call_parser)
        self._streams: dict[int, ToolStream] = {}

    @property
    def user(self) -> str | None:
        return self.req.user or self.req.safety_identifier

    def prompts(self) -> list[list[int]]:
        tools = [t.model_dump(exclude_none=True) for t in self.req.tools or ()] if self.parser else None
        return [render_prompt(self.engine.tokenizer, self.req.messages, tools, self.template)]

    def sampling_params(self, prompts: list[list[int]]) -> SamplingParams:
        params = super().sampling_params(prompts)
        if self.parser is None or self.tool_mode == "auto":
            return params
        tools = self.req.tools or []
        if isinstance(self.req.tool_choice, NamedToolChoice):
            tools = [t for t in tools if t.function.name == self.req.tool_choice.function.name]
        schemas = [call_schema(t.function.name, t.function.parameters) for t in tools]
        grammar = self.parser.grammar(schemas, parallel=self.req.parallel_tool_calls is not False)
        self.structured_param = "tools"
        return dataclasses.replace(params, structured=StructuredSpec("grammar", grammar))

    def max_tokens(self, prompts: list[list[int]]) -> int:
        max_tokens = self.req.max_new_tokens()
        if max_tokens is None:  # as OpenAI: up to the end of the context
            return max(1, self.engine.max_seq_len - len(prompts[0]))
        return max_tokens

    def logprobs(self) -> tuple[int | None, int | None]:
        return (self.req.top_logprobs or 0) if self.req.logprobs else None, None

    def part(self, index: int, out: RequestOutput) -> Part:
        logprobs = chat_logprobs(self.token_texts, out.logprobs or ()) if self.req.logprobs else None
        if self.parser is None or not self.req.stream:  # a whole choice is parsed in `choice`
            return Part(out.text, logprobs, out.finish_reason)
        stream = self._streams.setdefault(index, ToolStream(self.parser))
        (text, calls), finish = stream.feed(out.text), out.finish_reason
        if finish is not None:
            rest, last, are_calls = stream.finish()
            text, calls = text + rest, calls + last
            finish = "tool_calls" if are_calls else finish
        return Part(text, logprobs, finish, calls or None)

    def frames(self, index: int, part: Part) -> Iterator[bytes]:
        """A content delta, a chunk per piece of a tool call, then (on the last part) a finish chunk
        with an empty delta."""
        if part.text or part.logprobs:
            logprobs = ChatChoiceLogprobs(content=part.logprobs) if part.logprobs is not None else None
            yield self.chunk([ChatChunkChoice(index=index, delta=DeltaMessage(content=part.text), logprobs=logprobs)])
        for call in part.tool_calls or ():
            yield self.chunk([ChatChunkChoice(index=index, delta=DeltaMessage(tool_calls=[_delta(call)]))])
        if part.finish_reason is not None:
            yield self.chunk([ChatChunkChoice(index=index, delta=DeltaMessage(), finish_reason=part.finish_reason)])

    def head(self, n_choices: int) -> list[bytes]:
        """A role delta per choice."""
        role = DeltaMessage(role="assistant", content="")
        return [self.chunk([ChatChunkChoice(index=i, delta=role)]) for i in range(n_choices)]

    def choice(self, index: int, parts: list[Part]) -> ChatChoice:
        logprobs = None
        if self.req.logprobs:
            logprobs = ChatChoiceLogprobs(content=[entry for p in parts for entry in p.logprobs])
        content, calls, finish = "".join(p.text for p in parts), [], parts[-1].finish_reason
        if self.parser is not None:
            text, calls = self.parser.parse(content)
            content, finish = (text or "", "tool_calls") if calls else (content, finish)
        tool_calls = [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]
        message = ChatResponseMessage(content=content or (None if tool_calls else ""), tool_calls=tool_calls or None)
        return ChatChoice(index=index, message=message, logprobs=logprobs, finish_reason=finish)

    def response(self, choices: list[ChatChoice], usage: UsageInfo) -> ChatCompletionResponse:
        return ChatCompletionResponse(**self.envelope(), choices=choices, usage=usage)

    def chunk(self, choices: list[ChatChunkChoice], usage: UsageInfo | None = None) -> bytes:
        chunk = ChatCompletionChunk(**self.envelope(), choices=choices, usage=usage)
        # With include_usage every chunk has `usage` (null but in the last one), as OpenAI sends it.
        return sse_frame(chunk, exclude=None if self.include_usage else {"usage"})


def _delta(call: CallDelta) -> DeltaToolCall:
    if call.id is None:
        return DeltaToolCall(index=call.index, function=DeltaFunction(arguments=call.arguments))
    name = DeltaFunction(name=call.name, arguments=call.arguments)
    return DeltaToolCall(index=call.index, id=call.id, type="function", function=name)
