"""POST /v1/chat/completions: messages -> chat template -> engine -> `chat.completion`(`.chunk`s)."""

from __future__ import annotations

from collections.abc import Iterator

from graph.api import RequestOutput
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
    DeltaMessage,
    UsageInfo,
)

_NO_TEMPLATE = (
    "This model has no chat template, so it cannot serve /v1/chat/completions. "
    "Use /v1/completions with a prompt instead."
)


def render_prompt(tokenizer: Tokenizer, messages: list[ChatMessage]) -> list[int]:
    """Messages -> the model's chat template -> token ids (the template adds any special tokens).
    Only the template's own refusal is the client's fault (400); anything else it raises is a bug
    of ours or of the template, and reaches the app's 500 handler, which logs its trace."""
    turns = []
    for m in messages:
        # Chat templates know `system`; `developer` is OpenAI's newer name for the same turn.
        turn = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.name is not None:
            turn["name"] = m.name
        turns.append(turn)
    try:
        return tokenizer.encode_chat(turns, add_generation_prompt=True)
    except NoChatTemplateError as e:
        raise bad_request(_NO_TEMPLATE, "messages", "no_chat_template") from e
    except ChatTemplateError as e:  # the template itself refuses (e.g. "roles must alternate")
        raise bad_request(f"The model's chat template rejected the messages: {e.__cause__ or e}", "messages") from e


class ChatReply(Reply):
    id_prefix = "chatcmpl"
    prompt_param = "messages"
    req: ChatCompletionRequest

    @property
    def user(self) -> str | None:
        return self.req.user or self.req.safety_identifier

    def prompts(self) -> list[list[int]]:
        return [render_prompt(self.engine.tokenizer, self.req.messages)]

    def max_tokens(self, prompts: list[list[int]]) -> int:
        max_tokens = self.req.max_new_tokens()
        if max_tokens is None:  # as OpenAI: up to the end of the context
            return max(1, self.engine.max_seq_len - len(prompts[0]))
        return max_tokens

    def logprobs(self) -> tuple[int | None, int | None]:
        return (self.req.top_logprobs or 0) if self.req.logprobs else None, None

    def part(self, index: int, out: RequestOutput) -> Part:
        logprobs = chat_logprobs(self.token_texts, out.logprobs or ()) if self.req.logprobs else None
        return Part(out.text, logprobs, out.finish_reason)

    def frames(self, index: int, part: Part) -> Iterator[bytes]:
        """A content delta, then (on the last part) a finish chunk with an empty delta."""
        if part.text or part.logprobs:
            logprobs = ChatChoiceLogprobs(content=part.logprobs) if part.logprobs is not None else None
            yield self.chunk([ChatChunkChoice(index=index, delta=DeltaMessage(content=part.text), logprobs=logprobs)])
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
        message = ChatResponseMessage(content="".join(p.text for p in parts))
        return ChatChoice(index=index, message=message, logprobs=logprobs, finish_reason=parts[-1].finish_reason)

    def response(self, choices: list[ChatChoice], usage: UsageInfo) -> ChatCompletionResponse:
        return ChatCompletionResponse(**self.envelope(), choices=choices, usage=usage)

    def chunk(self, choices: list[ChatChunkChoice], usage: UsageInfo | None = None) -> bytes:
        chunk = ChatCompletionChunk(**self.envelope(), choices=choices, usage=usage)
        # With include_usage every chunk has `usage` (null but in the last one), as OpenAI sends it.
        return sse_frame(chunk, exclude=None if self.include_usage else {"usage"})
