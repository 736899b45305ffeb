"""The engine side of both generation routes: their choices as engine requests, and SSE framing
(serving/handler.py is the handler both routes share, over these).

One HTTP request becomes one engine request per choice (`n` per prompt). `Generation` submits
them together (all or none), reads their deltas as one stream tagged with the choice index,
records latency metrics on the way, and aborts whatever is unfinished when it is closed: a
client that goes away closes it, so its pages are freed at the engine's next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from pydantic import BaseModel
from starlette.requests import Request

from graph.api import EngineError, QueueFullError, RequestOutput, SamplingParams
from serving.errors import APIError, from_engine_error
from serving.metrics import Metrics
from serving.protocol import PromptTokensDetails, UsageInfo

if TYPE_CHECKING:
    from graph.engine import Engine

log = logging.getLogger("serving.generation")
T = TypeVar("T")

DONE_FRAME = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_frame(payload: BaseModel, exclude: set[str] | None = None) -> bytes:
    return b"data: " + payload.model_dump_json(exclude=exclude).encode() + b"\n\n"


def error_frame(error: APIError) -> bytes:
    return b"data: " + json.dumps(error.body()).encode() + b"\n\n"


def finish_error(finish_reason: str | None, detail: str | None = None) -> APIError | None:
    """A choice that ended without an answer (shutdown or engine error) -> the error to send."""
    if finish_reason == "abort":
        return APIError(503, "The server shut down before the request finished.", code="shutting_down")
    if finish_reason == "error":
        return APIError(500, f"The engine failed on this request: {detail or 'unknown error'}", code="engine_error")
    return None


async def sse_stream(
    gen: Generation,
    request_id: str,
    frames: Callable[[int, RequestOutput], Iterable[bytes]],
    head: Iterable[bytes] = (),
    tail: Callable[[], Iterable[bytes]] = lambda: (),
) -> AsyncIterator[bytes]:
    """The SSE body of a streamed response: `head`, then `frames(choice index, delta)` for each
    delta, `tail()` once every choice finished; a choice that ended without an answer, or any
    failure, becomes an error frame. Always ends with [DONE] and closes `gen` (aborting what is
    unfinished, e.g. when the client went away)."""
    try:
        for frame in head:
            yield frame
        async for index, out in gen.deltas():
            if (error := finish_error(out.finish_reason, out.error)) is not None:
                yield error_frame(error)
                break
            for frame in frames(index, out):
                yield frame
        else:
            for frame in tail():
                yield frame
    except APIError as e:
        yield error_frame(e)
    except Exception as e:
        log.exception("%s: stream failed", request_id)
        yield error_frame(APIError(500, f"Internal error: {type(e).__name__}: {e}"))
    finally:
        await gen.close()
    yield DONE_FRAME


class Generation:
    """The engine requests of one HTTP request."""

    def __init__(self, engine: Engine, metrics: Metrics, request_id: str) -> None:
        self._engine = engine
        self._metrics = metrics
        self._request_id = request_id
        self._arrival = time.monotonic()
        self._streams: list[Any] = []
        self._finished: set[int] = set()
        self._prompt_counted: set[int] = set()
        self._last_token_at: list[float | None] = []
        self.prompt_tokens = 0
        self.completion_tokens: list[int] = []
        self.cached_tokens: list[int] = []  # per choice
        self._choices_per_prompt = 1
        self._ended_early = False  # counted as failed or aborted (once per HTTP request)

    def submit(
        self,
        prompts: Sequence[list[int]],
        params: Sequence[SamplingParams],
        param: str,
        param_names: dict[str, str] | None = None,
    ) -> None:
        """Submit `len(params)` choices per prompt (choice index: prompt index * n + sample index);
        if the engine refuses one, abort those already submitted. An error about the prompt names
        `param`; one about a `SamplingParams` field, its request parameter (`param_names`)."""
        try:
            for prompt in prompts:
                for p in params:
                    request_id = f"{self._request_id}-{len(self._streams)}"
                    self._streams.append(self._engine.submit(prompt, p, request_id=request_id))
        except Exception as e:
            for stream in self._streams:
                self._engine.abort(stream.request_id)
            if isinstance(e, QueueFullError):
                self._metrics.shed.inc()
            if isinstance(e, EngineError):
                raise from_engine_error(e, param, param_names) from e
            raise
        self._last_token_at = [None] * len(self._streams)
        self.completion_tokens = [0] * len(self._streams)
        self.cached_tokens = [0] * len(self._streams)
        self._choices_per_prompt = len(params)
        self.prompt_tokens = sum(len(p) for p in prompts)

    def usage(self) -> UsageInfo:
        completion = sum(self.completion_tokens)
        n = self._choices_per_prompt  # a prompt counts once; its cached part is its best choice's
        cached = sum(max(self.cached_tokens[i : i + n]) for i in range(0, len(self.cached_tokens), n))
        return UsageInfo(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )

    @property
    def n_choices(self) -> int:
        return len(self._streams)

    def _record(self, index: int, out: RequestOutput) -> None:
        now = time.monotonic()
        if out.queue_wait is not None:
            self._metrics.queue_wait.observe(out.queue_wait)
        if out.prompt_tokens and index not in self._prompt_counted:
            self._prompt_counted.add(index)
            self.cached_tokens[index] = out.cached_tokens
            self._metrics.prompt_tokens.inc(out.prompt_tokens)
        if out.token_ids:
            last = self._last_token_at[index]
            if last is None:
                self._metrics.ttft.observe(now - self._arrival)
            else:
                per_token = (now - last) / len(out.token_ids)
                for _ in out.token_ids:
                    self._metrics.itl.observe(per_token)
            self._last_token_at[index] = now
        self._metrics.generation_tokens.inc(max(0, out.completion_tokens - self.completion_tokens[index]))
        self.completion_tokens[index] = out.completion_tokens
        if out.finish_reason is not None:
            self._finished.add(index)
        if out.finish_reason in ("error", "abort"):
            self._end_early(self._metrics.failed if out.finish_reason == "error" else self._metrics.aborted)

    def _end_early(self, counter: Any) -> None:
        if not self._ended_early:
            self._ended_early = True
            counter.inc()

    async def deltas(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """All choices' deltas as they come, each with its choice index."""
        if len(self._streams) == 1:
            async for out in self._streams[0]:
                self._record(0, out)
                yield 0, out
            return
        queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

        async def pump(index: int, stream: Any) -> None:
            try:
                async for out in stream:
                    queue.put_nowait((index, out))
                queue.put_nowait((index, None))
            except Exception as e:
                queue.put_nowait((index, e))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self._streams)]
        try:
            for _ in range(len(tasks)):
                while True:
                    index, item = await queue.get()
                    if item is None:
                        break
                    if isinstance(item, BaseException):
                        raise item
                    self._record(index, item)
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()

    async def close(self) -> None:
        """Abort every choice that has not finished (a no-op when all have)."""
        if len(self._finished) < len(self._streams):
            self._end_early(self._metrics.aborted)
        with anyio.CancelScope(shield=True):
            for index, stream in enumerate(self._streams):
                if index not in self._finished:
                    self._finished.add(index)
                    await stream.aclose()


class ClientDisconnected(Exception):
    """The client closed the connection before its (non-streaming) response was ready."""


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, or cancel it and raise ClientDisconnected if the client leaves first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    log.info("client disconnected: request aborted")
    raise ClientDisconnected
