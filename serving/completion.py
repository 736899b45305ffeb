"""POST /v1/completions: prompt(s) -> engine -> `text_completion` (whole, or as a stream of chunks)."""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from graph.api import RequestOutput
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
from serving.logprobs import CompletionLogprobsBuilder, TokenTexts, merge_completion_logprobs
from serving.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, UsageInfo, now
from serving.state import ServerState

if TYPE_CHECKING:
    from graph.engine import Engine

log = logging.getLogger("serving.completion")


def encode_prompts(engine: Engine, req: CompletionRequest) -> tuple[list[list[int]], list[str]]:
    """-> (token ids, text) of each prompt; text prompts are tokenized, token prompts checked."""
    tokenizer = engine.model.tokenizer
    vocab = engine.model.cfg.vocab_size
    ids, texts = [], []
    for prompt in req.prompts():
        if isinstance(prompt, str):
            tokens = tokenizer.encode(prompt)
            if not tokens:
                raise bad_request("'prompt' is empty: it must contain at least one token", "prompt")
            ids.append(tokens)
            texts.append(prompt)
        else:
            if any(t >= vocab for t in prompt):
                raise bad_request(f"'prompt' holds a token id outside the vocabulary (0..{vocab - 1})", "prompt")
            ids.append(prompt)
            texts.append(tokenizer.decode(prompt) if req.echo else "")
    return ids, texts


class _ChoiceText:
    """Turns one choice's deltas into completion text (+ logprobs), echoing the prompt first."""

    def __init__(self, prompt_ids: list[int], echo_text: str | None, texts: TokenTexts, logprobs: bool) -> None:
        self._prompt_ids = prompt_ids
        self._echo_text = echo_text
        self._builder = CompletionLogprobsBuilder(texts) if logprobs else None

    def step(self, out: RequestOutput) -> tuple[str, CompletionLogprobs | None]:
        text, parts = out.text, []
        if self._echo_text is not None:
            text = self._echo_text + text
            self._echo_text = None
            if self._builder is not None:
                entries = out.prompt_logprobs or [None] * len(self._prompt_ids)
                parts.append(self._builder.build(self._prompt_ids, entries))
        if self._builder is None:
            return text, None
        if out.logprobs:
            parts.append(self._builder.build([e.token_id for e in out.logprobs], out.logprobs))
        return text, merge_completion_logprobs(parts)


@dataclasses.dataclass
class _Completion:
    """One validated completion request, ready to submit."""

    req: CompletionRequest
    request_id: str
    created: int
    model: str
    fingerprint: str
    choices: list[_ChoiceText] = dataclasses.field(default_factory=list)

    @property
    def include_usage(self) -> bool:
        return bool(self.req.stream_options and self.req.stream_options.include_usage)

    def response(self, choices: list[CompletionChoice], usage: UsageInfo | None) -> CompletionResponse:
        return CompletionResponse(
            id=self.request_id,
            created=self.created,
            model=self.model,
            choices=choices,
            system_fingerprint=self.fingerprint,
            usage=usage,
        )

    def chunk(self, choices: list[CompletionChoice], usage: UsageInfo | None = None) -> bytes:
        # Unlike chat chunks, text_completion ones have no null usage: it appears in the last one only.
        return sse_frame(self.response(choices, usage), exclude=None if usage is not None else {"usage"})


def _prepare(state: ServerState, engine: Engine, req: CompletionRequest) -> tuple[_Completion, Generation]:
    state.check_model(req.model)
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    prompts, prompt_texts = encode_prompts(engine, req)
    for prompt in prompts:
        context_check(engine, len(prompt), max_tokens, "your prompt", "prompt")
    echo_logprobs = req.logprobs if req.echo else None
    base = sampling_params(req, engine, max_tokens=max_tokens, logprobs=req.logprobs, prompt_logprobs=echo_logprobs)
    params = choice_params(base, req.n or 1, state.config.max_n)
    completion = _Completion(req, f"cmpl-{uuid.uuid4().hex}", now(), state.model_name, engine.system_fingerprint)
    for prompt, text in zip(prompts, prompt_texts, strict=True):
        for _ in params:
            echo = text if req.echo else None
            completion.choices.append(_ChoiceText(prompt, echo, state.token_texts, req.logprobs is not None))
    gen = Generation(engine, state.metrics, completion.request_id)
    gen.submit(prompts, params, "prompt")
    log.debug("%s: %d prompts, n=%d, user=%s", completion.request_id, len(prompts), len(params), req.user)
    return completion, gen


async def create_completion(request: Request, state: ServerState, req: CompletionRequest) -> Response:
    engine = state.ready_engine()
    completion, gen = _prepare(state, engine, req)
    if req.stream:
        return StreamingResponse(_stream(completion, gen), media_type="text/event-stream", headers=SSE_HEADERS)
    try:
        results = await until_disconnect(request, _collect(completion, gen))
    finally:
        await gen.close()
    response = completion.response(results, gen.usage())
    return JSONResponse(response.model_dump(mode="json"))


async def _collect(completion: _Completion, gen: Generation) -> list[CompletionChoice]:
    texts: list[list[str]] = [[] for _ in completion.choices]
    logprobs: list[list[CompletionLogprobs]] = [[] for _ in completion.choices]
    finish: list[str | None] = [None] * len(completion.choices)
    async for index, out in gen.deltas():
        if (error := finish_error(out.finish_reason, out.error)) is not None:
            raise error
        text, lp = completion.choices[index].step(out)
        texts[index].append(text)
        if lp is not None:
            logprobs[index].append(lp)
        finish[index] = out.finish_reason
    return [
        CompletionChoice(
            index=i,
            text="".join(texts[i]),
            logprobs=merge_completion_logprobs(logprobs[i]) if completion.req.logprobs is not None else None,
            finish_reason=finish[i],
        )
        for i in range(len(completion.choices))
    ]


def _stream(completion: _Completion, gen: Generation) -> AsyncIterator[bytes]:
    """A chunk per delta (the first one of a choice starts with the echoed prompt), usage, [DONE]."""

    def frames(index: int, out: RequestOutput) -> Iterator[bytes]:
        text, logprobs = completion.choices[index].step(out)
        if text or (logprobs is not None and logprobs.tokens) or out.finish_reason is not None:
            yield completion.chunk(
                [CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=out.finish_reason)]
            )

    usage = lambda: [completion.chunk([], usage=gen.usage())] if completion.include_usage else []
    return sse_stream(gen, completion.request_id, frames, tail=usage)
