"""The one handler shape of both generation routes (/v1/chat/completions and /v1/completions).

A route is a `Reply` subclass that says only what differs between them: how its request becomes
prompt ids and a default max_tokens, how one delta of a choice becomes response text and logprobs
(a `Part`), and how parts become its stream chunks, choices and response. `handle` does the rest
for both: check the model, submit every choice (`Generation`), then stream the parts as SSE chunks
(`stream`) or collect them into one response (`collect`).

No rule about the request's content is checked here: the protocol checks what needs no model
(serving/protocol.py), the engine what does (`Engine.submit`: context length, vocabulary, seed,
min_tokens), and serving/errors.py turns the engine's errors into HTTP answers.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from graph.api import MAX_SEED, RequestOutput, SamplingParams
from serving.errors import bad_request
from serving.generation import SSE_HEADERS, ClientDisconnected, Generation, finish_error, sse_stream, until_disconnect
from serving.protocol import ChatCompletionRequest, CompletionRequest, UsageInfo, now
from serving.state import ServerState
from serving.tools import CallDelta

if TYPE_CHECKING:
    from graph.engine import Engine

log = logging.getLogger("serving.handler")
CLIENT_CLOSED = 499  # as nginx logs it: the client left before the answer


@dataclasses.dataclass
class Part:
    """What one delta adds to a choice: text, logprobs in the route's format, the finish reason."""

    text: str
    logprobs: Any = None
    finish_reason: str | None = None
    tool_calls: list[CallDelta] | None = None  # a stream with tools: the pieces of calls this delta adds


class Reply(abc.ABC):
    """One validated request of a route, and how its answer is written."""

    id_prefix: ClassVar[str]  # of the response id: chatcmpl | cmpl
    prompt_param: ClassVar[str]  # the parameter an error about the prompt names
    req: ChatCompletionRequest | CompletionRequest
    structured_param: str | None = None  # the parameter that constrains the output, if any

    def __init__(self, req: Any, state: ServerState, engine: Engine) -> None:
        self.req = req
        self.engine = engine
        self.token_texts = state.token_texts
        self.request_id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = now()
        self.model = state.model_name

    def envelope(self) -> dict[str, Any]:
        """The fields every response and chunk of the request carries besides its choices."""
        return {
            "id": self.request_id,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.engine.system_fingerprint,
        }

    @property
    def include_usage(self) -> bool:
        return bool(self.req.stream_options and self.req.stream_options.include_usage)

    @abc.abstractmethod
    def prompts(self) -> list[list[int]]:
        """The request's prompts as token ids."""

    @abc.abstractmethod
    def max_tokens(self, prompts: list[list[int]]) -> int: ...

    @abc.abstractmethod
    def logprobs(self) -> tuple[int | None, int | None]:
        """-> (logprobs, prompt_logprobs) as `SamplingParams` takes them."""

    @abc.abstractmethod
    def part(self, index: int, out: RequestOutput) -> Part:
        """What choice `index`'s delta `out` adds to the answer (called once per delta, in order)."""

    @abc.abstractmethod
    def frames(self, index: int, part: Part) -> Iterator[bytes]:
        """The stream chunks of one part."""

    @abc.abstractmethod
    def choice(self, index: int, parts: list[Part]) -> BaseModel:
        """A whole choice of the non-streaming response."""

    @abc.abstractmethod
    def response(self, choices: list[Any], usage: UsageInfo) -> BaseModel: ...

    @abc.abstractmethod
    def chunk(self, choices: list[Any], usage: UsageInfo | None = None) -> bytes: ...

    def head(self, n_choices: int) -> list[bytes]:
        """Stream chunks before the first delta."""
        return []

    @property
    def user(self) -> str | None:
        return self.req.user

    def sampling_params(self, prompts: list[list[int]]) -> SamplingParams:
        req = self.req
        logprobs, prompt_logprobs = self.logprobs()
        structured, self.structured_param = req.structured()
        return SamplingParams(
            max_tokens=self.max_tokens(prompts),
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            min_p=req.min_p or 0.0,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            logit_bias=tuple((int(k), float(v)) for k, v in (req.logit_bias or {}).items()),
            seed=req.seed,
            stop=req.stops(),
            stop_token_ids=tuple(req.stop_token_ids or ()),
            skip_special_tokens=req.skip_special_tokens is not False,
            ignore_eos=bool(req.ignore_eos),
            min_tokens=req.min_tokens or 0,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            structured=structured,
        )

    def param_names(self) -> dict[str, str]:
        """`SamplingParams` fields -> the request parameter that set them, where the names differ
        (for the engine's errors; call after `sampling_params`)."""
        return {"structured": self.structured_param} if self.structured_param else {}


def choice_params(base: SamplingParams, n: int, max_n: int) -> list[SamplingParams]:
    """The parameters of each of `n` choices (`--max-n` is the one bound on `n`). A seeded
    request's choice i samples with seed + i, modulo 2^32; choice 0 carries the seed as given,
    and the engine refuses it (and so the request) if it is out of range."""
    if n > max_n:
        raise bad_request(f"'n' is {n}; this server allows at most {max_n}", "n")
    if base.seed is None:
        return [base] * n
    return [dataclasses.replace(base, seed=base.seed if i == 0 else (base.seed + i) % (MAX_SEED + 1)) for i in range(n)]


async def handle(
    request: Request, state: ServerState, reply_type: type[Reply], req: ChatCompletionRequest | CompletionRequest
) -> Response:
    engine = state.ready_engine()
    state.check_model(req.model)
    reply = reply_type(req, state, engine)
    prompts = reply.prompts()
    params = choice_params(reply.sampling_params(prompts), req.n or 1, state.config.max_n)
    gen = Generation(engine, state.metrics, reply.request_id)
    gen.submit(prompts, params, reply.prompt_param, reply.param_names())
    log.debug("%s: %d prompts, n=%d, user=%s", reply.request_id, len(prompts), len(params), reply.user)
    if req.stream:
        return StreamingResponse(stream(reply, gen), media_type="text/event-stream", headers=SSE_HEADERS)
    try:
        choices = await until_disconnect(request, collect(reply, gen))
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED)
    finally:
        await gen.close()
    return JSONResponse(reply.response(choices, gen.usage()).model_dump(mode="json"))


async def collect(reply: Reply, gen: Generation) -> list[BaseModel]:
    """Every choice whole; a choice that ended without an answer raises its error."""
    parts: list[list[Part]] = [[] for _ in range(gen.n_choices)]
    async for index, out in gen.deltas():
        if (error := finish_error(out.finish_reason, out.error)) is not None:
            raise error
        parts[index].append(reply.part(index, out))
    return [reply.choice(index, p) for index, p in enumerate(parts)]


def stream(reply: Reply, gen: Generation) -> AsyncIterator[bytes]:
    """`head`, the chunks of every part as it comes, the usage chunk if asked for, [DONE]."""

    def frames(index: int, out: RequestOutput) -> Iterator[bytes]:
        return reply.frames(index, reply.part(index, out))

    usage = lambda: [reply.chunk([], usage=gen.usage())] if reply.include_usage else []
    return sse_stream(gen, reply.request_id, frames, head=reply.head(gen.n_choices), tail=usage)
