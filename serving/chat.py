"""POST /v1/chat/completions: messages -> chat template -> engine -> `chat.completion`(`.chunk`s)."""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from graph.api import RequestOutput
from models.tokenizer import NoChatTemplateError, Tokenizer
from serving.errors import bad_request
from serving.generation import (
    SSE_HEADERS,
    Generation,
    choice_params,
    context_check,
    finish_error,
    sampling_params,
    sse_frame,
    sse_stream,
    until_disconnect,
)
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
    now,
)
from serving.state import ServerState

if TYPE_CHECKING:
    from graph.engine import Engine

log = logging.getLogger("serving.chat")

_NO_TEMPLATE = (
    "This model has no chat template, so it cannot serve /v1/chat/completions. "
    "Use /v1/completions with a prompt instead."
)


def render_prompt(tokenizer: Tokenizer, messages: list[ChatMessage]) -> list[int]:
    """Messages -> the model's chat template -> token ids (the template adds any special tokens)."""
    if not tokenizer.has_chat_template:
        raise bad_request(_NO_TEMPLATE, "messages", "no_chat_template")
    turns = []
    for m in messages:
        # Chat templates know `system`; `developer` is OpenAI's newer name for the same turn.
        turn = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.name is not None:
            turn["name"] = m.name
        turns.append(turn)
    try:
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=True)
    except NoChatTemplateError as e:
        raise bad_request(_NO_TEMPLATE, "messages", "no_chat_template") from e
    except Exception as e:  # the template itself refuses (e.g. "roles must alternate")
        raise bad_request(f"The model's chat template rejected the messages: {e}", "messages") from e
    return tokenizer.encode(text, add_special_tokens=False)


@dataclasses.dataclass
class _Chat:
    """One validated chat request, ready to submit."""

    req: ChatCompletionRequest
    request_id: str
    created: int
    model: str
    fingerprint: str

    def chunk(self, choices: list[ChatChunkChoice], usage: UsageInfo | None = None) -> bytes:
        chunk = ChatCompletionChunk(
            id=self.request_id,
            created=self.created,
            model=self.model,
            choices=choices,
            system_fingerprint=self.fingerprint,
            usage=usage,
        )
        return sse_frame(chunk, exclude=None if self.include_usage else {"usage"})

    @property
    def include_usage(self) -> bool:
        return bool(self.req.stream_options and self.req.stream_options.include_usage)


def _prepare(state: ServerState, engine: Engine, req: ChatCompletionRequest) -> tuple[_Chat, Generation]:
    state.check_model(req.model)
    prompt = render_prompt(engine.model.tokenizer, req.messages)
    max_tokens = req.max_new_tokens()
    if max_tokens is None:  # as OpenAI: up to the end of the context
        max_tokens = max(1, engine.max_seq_len - len(prompt))
    context_check(engine, len(prompt), max_tokens, "the messages", "messages")
    if req.min_tokens and req.min_tokens > max_tokens:
        raise bad_request(f"'min_tokens' ({req.min_tokens}) is larger than max_tokens ({max_tokens})", "min_tokens")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    base = sampling_params(req, engine, max_tokens=max_tokens, logprobs=logprobs)
    params = choice_params(base, req.n or 1, state.config.max_n)
    chat = _Chat(req, f"chatcmpl-{uuid.uuid4().hex}", now(), state.model_name, engine.system_fingerprint)
    gen = Generation(engine, state.metrics, chat.request_id)
    gen.submit([prompt], params, "messages")
    log.debug(
        "%s: %d prompt tokens, n=%d, user=%s",
        chat.request_id,
        len(prompt),
        len(params),
        req.user or req.safety_identifier,
    )
    return chat, gen


async def create_chat_completion(request: Request, state: ServerState, req: ChatCompletionRequest) -> Response:
    engine = state.ready_engine()
    chat, gen = _prepare(state, engine, req)
    if req.stream:
        return StreamingResponse(_stream(chat, gen, state), media_type="text/event-stream", headers=SSE_HEADERS)
    try:
        results = await until_disconnect(request, gen.collect())
    finally:
        await gen.close()
    choices = []
    for index, result in enumerate(results):
        if (error := finish_error(result.finish_reason, result.error)) is not None:
            raise error
        logprobs = None
        if req.logprobs:
            logprobs = ChatChoiceLogprobs(content=chat_logprobs(state.token_texts, result.logprobs))
        message = ChatResponseMessage(content="".join(result.text))
        choices.append(ChatChoice(index=index, message=message, logprobs=logprobs, finish_reason=result.finish_reason))
    response = ChatCompletionResponse(
        id=chat.request_id,
        created=chat.created,
        model=chat.model,
        choices=choices,
        usage=gen.usage(),
        system_fingerprint=chat.fingerprint,
    )
    return JSONResponse(response.model_dump(mode="json"))


def _stream(chat: _Chat, gen: Generation, state: ServerState) -> AsyncIterator[bytes]:
    """Role deltas, then content deltas as they come, a finish chunk per choice, usage, [DONE]."""

    def frames(index: int, out: RequestOutput) -> Iterator[bytes]:
        if out.text or out.logprobs:
            logprobs = None
            if chat.req.logprobs:
                logprobs = ChatChoiceLogprobs(content=chat_logprobs(state.token_texts, out.logprobs or ()))
            yield chat.chunk([ChatChunkChoice(index=index, delta=DeltaMessage(content=out.text), logprobs=logprobs)])
        if out.finish_reason is not None:
            yield chat.chunk([ChatChunkChoice(index=index, delta=DeltaMessage(), finish_reason=out.finish_reason)])

    roles = [
        chat.chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
        for i in range(gen.n_choices)
    ]
    usage = lambda: [chat.chunk([], usage=gen.usage())] if chat.include_usage else []
    return sse_stream(gen, chat.request_id, frames, head=roles, tail=usage)
