"""The engine: a step loop on its own thread driving the executable table, and an async front.

Threads and queues:
- Callers (the HTTP server's event loop, or the offline API) call `submit()`: it validates the
  request, compiles its grammar if it has one (graph/structured.py), puts it in the inbox (a
  lock-protected list) and returns a `RequestStream`, an async iterator over an `asyncio.Queue`
  that belongs to the caller's event loop.
- The step thread drains the inbox and the abort list, asks the `Scheduler` for the next step
  (a prefill chunk, a decode batch, or both in one mixed step), pads it to its bucket (with each
  constrained row's token mask; the sampled rows' parameters are sent only when the rows change),
  dispatches the compiled executable with the KV pool donated, and
  turns the sampled tokens into `RequestOutput` deltas (`graph/outputs.py`) which it hands to each
  request's queue with `loop.call_soon_threadsafe`.
- Look-ahead (`pipeline`; auto: on except on CPU): the step thread dispatches step n+1 before it reads
  step n, so the device never waits for the host's reading, detokenizing and scheduling. The
  tokens step n samples stay on the device (`State.sampled`) and step n+1 feeds them from there.
  A sequence that step n finishes (end token, stop string, max_tokens) is still in step n+1; its
  extra token is never read or shown, and it is not in step n+2. Steps whose rows need the host
  to see every token first (a grammar's mask, penalties over the history) are not looked past.
- Speculative decoding (`num_speculative_tokens`, graph/speculative.py): a decode step may feed
  each sequence's pending token followed by draft tokens looked up in its own prompt and output;
  reading the step keeps the samples while each draft matches the sample before it, and hands out
  the kept tokens in one delta. Such a step is never looked past.
- Closing a stream early (client gone) aborts its request: the step thread removes it and frees
  its pages before it schedules its next step, so a request aborted while it waits never runs.

Overload: `submit` refuses (QueueFullError, with a Retry-After estimate) a request beyond
`max_queue` waiting ones, or one whose expected wait for its first step exceeds `max_queue_wait`
seconds (the estimate, from measured step times and the queue, is in `graph/shedding.py`).

A failed step: a step that raises (a bug, a device error, out of memory) ends the requests in it
with finish_reason "error". The KV pool was donated to the failed call, so it is rebuilt; every
cached prefix goes with the old pool, and the other running requests are preempted: they queue
again at the front, and once readmitted prefill their prompt and the tokens they already streamed,
then continue (nothing streamed is repeated or changed). A failure before the step was decided
ends every request the scheduler holds. If the pool cannot be rebuilt, every request ends with
"error" and the engine is broken: `broken` says why and `submit` raises EngineBrokenError.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import dataclasses
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import jax

from graph import compile_cache, multihost, speculative
from graph.api import (
    MAX_SEED,
    EngineBrokenError,
    EngineConfig,
    EngineStoppedError,
    InvalidRequestError,
    QueueFullError,
    RequestOutput,
    RequestTooLargeError,
    SamplingParams,
)
from graph.batching import RowReuse, build_step, padding_step
from graph.buckets import Buckets
from graph.checkpoint import check_weights, load_weights
from graph.executables import ExecutableTable
from graph.kv_cache import PageAllocator, kv_bytes_per_page, plan_num_pages
from graph.layout import check_mesh, kv_dtype, pipelined
from graph.outputs import OutputProcessor, merged
from graph.sampling import MAX_LOGIT_BIAS, MAX_SUPPRESS
from graph.scheduler import Decode, Mixed, Prefill, Scheduler, Sequence, parts, uses_penalties
from graph.shedding import Queue, WaitEstimator
from graph.step import PACKED_ROWS, Key, State, StepInputs, StepOutputs, carry_offset
from graph.structured import Grammars
from models.loader import LoadedModel
from models.tokenizer import Tokenizer

log = logging.getLogger("graph.engine")


@dataclasses.dataclass(frozen=True)
class _Flight:
    """A dispatched step: its decision and its outputs (device arrays, not read yet)."""

    decision: Prefill | Decode | Mixed
    outs: Any
    started: float
    kind: str  # prefill | decode | speculative | mixed


class _StepFailed(Exception):
    def __init__(self, seqs: list[Sequence], error: Exception):
        super().__init__(str(error))
        self.seqs, self.error = list(seqs), error


class RequestStream:
    """Async iterator of one request's deltas; closing it early aborts the request."""

    def __init__(self, engine: Engine, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self._engine = engine
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._finished = False

    def push(self, out: RequestOutput) -> None:  # step thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, out)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
            pass

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._finished:
            raise StopAsyncIteration
        try:
            out = await self._queue.get()
        except asyncio.CancelledError:  # the consumer is gone: so is the request
            await self.aclose()
            raise
        self._finished = out.finish_reason is not None
        return out

    async def aclose(self) -> None:
        if not self._finished:
            self._finished = True
            self._engine.abort(self.request_id)


class ModelFacts:
    """What the server reads of the model behind an engine (or its replicas, graph/replicas.py)."""

    model: LoadedModel
    config: EngineConfig

    @property
    def model_name(self) -> str:
        return self.model.name

    @property
    def system_fingerprint(self) -> str:
        """The model's weights, dtype and config, as responses report them."""
        return f"fp_{self.model.fingerprint[:10]}"

    @property
    def tokenizer(self) -> Tokenizer:
        return self.model.tokenizer

    @property
    def vocab_size(self) -> int:
        """Token ids run from 0 to vocab_size - 1 (the model's logits, added tokens included)."""
        return self.model.cfg.vocab_size

    @property
    def max_seq_len(self) -> int:
        """Context length of one request: prompt plus max_tokens."""
        return self.config.max_seq_len


class Engine(ModelFacts):
    def __init__(self, model: LoadedModel, config: EngineConfig, table: ExecutableTable):
        # several processes: the followers run every device call this one makes (graph/multihost.py)
        self.channel = multihost.StepChannel() if multihost.is_multiprocess() else None
        if self.channel is not None:
            self.channel.publish("setup", num_pages=table.num_pages)
        self.model = model
        self.config = config
        self.table = table
        self.buckets = table.buckets
        self.allocator = PageAllocator(table.num_pages, caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.allocator,
            page_size=config.page_size,
            max_batch=config.max_batch,
            max_prefill_tokens=self.buckets.prefill_tokens[-1],
            mixed_tokens=self.buckets.mixed_tokens,
            # what makes a page's KV: the model, its dtype, the quantization, the KV values' dtype
            salt=f"{model.fingerprint}/{model.dtype}/{config.quantize}/{kv_dtype(config, model.dtype)}".encode(),
            packed_rows=PACKED_ROWS,
            max_pages=self.buckets.max_pages,
            chunk_sizes=self.buckets.prefill_tokens,
            speculative_tokens=config.num_speculative_tokens,
            speculative_max_batch=config.speculative_max_batch,
            prompt_lookup=(config.prompt_lookup_min, config.prompt_lookup_max),
            max_seq_len=config.max_seq_len,
        )
        self.outputs = OutputProcessor(model.tokenizer, model.cfg, config.max_seq_len)
        self.grammars = Grammars(model.tokenizer, model.cfg.vocab_size, self.outputs.eos_ids)
        self.mask_seconds = 0.0  # host time spent computing grammar masks (all steps)
        self.pipelined = pipelined(config)
        self.params = load_weights(model, config)
        self.state = self._init_state()  # the KV pool and the last step's samples (graph/step.py State)
        self._inflight: _Flight | None = None  # a step dispatched and not read yet
        self._lock = threading.Condition()
        self._inbox: list[tuple[Sequence, RequestStream]] = []
        self._aborts: list[str] = []
        self._streams: dict[str, RequestStream] = {}
        self._seqs: dict[str, Sequence] = {}
        self._accepting = True
        self._stop = False
        self._reset_cache = False
        self._broken: str | None = None
        self._queued_at: dict[str, float] = {}  # submit time, until the request's first step
        self._queue_waits: dict[str, float] = {}  # until its first delta carries it
        self._queue = Queue()  # what a new request finds ahead of it: the step thread's last view
        self.estimator = WaitEstimator(config.max_batch, self.buckets.prefill_tokens[-1], self.buckets.mixed_tokens)
        self.row_reuse = RowReuse()  # sampled-row arrays kept from step to step (graph/batching.py)
        self.steps = 0
        self.looked_ahead = 0  # steps dispatched while the one before was still in flight
        self.draft_tokens = 0  # speculative decoding: draft tokens verified
        self.accepted_tokens = 0  # of which were kept
        self.host_seconds = 0.0  # the step thread's own work: scheduling aside, building, dispatching, reading
        self.wait_seconds = 0.0  # the step thread waiting for the device's results
        self.step_kinds: collections.Counter[str] = collections.Counter()  # steps by _Flight.kind
        self.step_kind_seconds: collections.Counter[str] = collections.Counter()  # dispatch to read, by kind
        if config.warmup:
            self._warm_up()
        self._thread = threading.Thread(target=self._loop, name="engine-step", daemon=True)
        self._thread.start()
        # stop the step thread before the interpreter tears down the runtime under it
        atexit.register(self.shutdown, 0.0)
        log.info(
            "KV cache: %d pages of %d tokens = %d tokens of context (%.0f MiB of %s)",
            table.num_pages - 1,
            config.page_size,
            (table.num_pages - 1) * config.page_size,
            table.num_pages * kv_bytes_per_page(model.cfg, config.page_size, kv_dtype(config, model.dtype)) / 2**20,
            kv_dtype(config, model.dtype),
        )

    # ---- construction ----

    @classmethod
    def create(cls, model: LoadedModel, config: EngineConfig) -> Engine:
        compile_cache.configure(config.compile_cache)
        check_mesh(model.cfg, config)
        if config.dtype != model.dtype:
            config = dataclasses.replace(config, dtype=model.dtype)
        check_weights(model, config)  # a converted model's weights fit this engine: before compiling
        buckets = Buckets.from_config(config)
        if config.aot_dir:
            table = ExecutableTable.load(config.aot_dir, model.cfg, model.dtype, config, buckets, model.fingerprint)
        else:
            table = ExecutableTable.compile(
                model.cfg, model.dtype, config, buckets, plan_num_pages(model, config, buckets)
            )
        return cls(model, config, table)

    # ---- the async front ----

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """Requests submitted inside reach the step thread at once, as one burst (an offline batch
        is admitted and packed as a whole, not from whichever request the thread woke up to). The
        steps wait meanwhile, so a structured request's grammar is compiled with them held."""
        with self._lock:  # reentrant: `submit` takes it again
            yield

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> RequestStream:
        """Queue a request; raises before anything is queued if it cannot be served."""
        self._validate(prompt_ids, params)
        # compiled here, on the caller's thread: a grammar can take a while, and the steps go on
        grammar = self.grammars.compile(params.structured) if params.structured is not None else None
        request_id = request_id or uuid.uuid4().hex
        stream = RequestStream(self, request_id, asyncio.get_running_loop())
        seed = params.seed if params.seed is not None else secrets.randbits(32)
        seq = Sequence(request_id, list(prompt_ids), params, seed, grammar=grammar)
        with self._lock:
            if not self._accepting:
                raise EngineStoppedError("the server is shutting down")
            if (reason := self.broken) is not None:
                raise EngineBrokenError(reason)
            self._check_queue()
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
            self._queued_at[request_id] = time.monotonic()
            self._inbox.append((seq, stream))
            self._lock.notify()
        return stream

    def _check_queue(self) -> None:
        """Raise QueueFullError if the queue is at its bound, or if a new request's expected wait
        for its first step is over `max_queue_wait` (with the lock held)."""
        q = self._queue
        ahead = dataclasses.replace(
            q,
            prefill_tokens=q.prefill_tokens + sum(s.length for s, _ in self._inbox),
            waiting=q.waiting + len(self._inbox),
        )
        wait = self.estimator.wait(ahead)
        if ahead.waiting >= self.config.max_queue:
            retry = wait / ahead.waiting  # about when one place in the queue frees
            raise QueueFullError(f"too many queued requests ({self.config.max_queue})", max(1.0, retry))
        limit = self.config.max_queue_wait
        if limit and wait > limit:
            raise QueueFullError(
                f"the expected wait for this request is {wait:.0f} s, over this server's limit of {limit:g} s",
                max(1.0, wait - limit),  # by then the queue ahead has shrunk to fit, if nothing else arrives
            )

    def _validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Every rule a request must meet that needs the model or the engine's limits: serving
        maps these errors to HTTP 400s and checks none of them itself."""
        if not prompt_ids:
            raise InvalidRequestError("The prompt is empty: it must contain at least one token")
        vocab = self.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise InvalidRequestError(f"The prompt holds a token id outside the vocabulary (0..{vocab - 1})")
        if len(params.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidRequestError(
                f"'logit_bias' has {len(params.logit_bias)} entries; this server takes at most {MAX_LOGIT_BIAS}",
                "logit_bias",
            )
        for token_id, _ in params.logit_bias:
            if not 0 <= token_id < vocab:
                raise InvalidRequestError(
                    f"'logit_bias' names token {token_id}, outside the vocabulary (0..{vocab - 1})", "logit_bias"
                )
        if len(set(params.stop_token_ids) | self.outputs.eos_ids) > MAX_SUPPRESS:  # all suppressed before min_tokens
            raise InvalidRequestError(
                f"'stop_token_ids' has too many entries; this server takes at most "
                f"{MAX_SUPPRESS - len(self.outputs.eos_ids)}",
                "stop_token_ids",
            )
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            raise InvalidRequestError(
                f"'stop_token_ids' holds a token id outside the vocabulary (0..{vocab - 1})", "stop_token_ids"
            )
        if params.min_tokens > params.max_tokens:
            raise InvalidRequestError(
                f"'min_tokens' ({params.min_tokens}) is larger than max_tokens ({params.max_tokens})", "min_tokens"
            )
        # A seed is used whole or refused: the sampler's keys take 32 bits, and folding a larger
        # seed into them would give two different seeds the same stream.
        if params.seed is not None and not 0 <= params.seed <= MAX_SEED:
            raise InvalidRequestError(f"'seed' must be between 0 and {MAX_SEED} (32 bits), not {params.seed}", "seed")
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_seq_len:
            raise RequestTooLargeError(
                f"This model's maximum context length is {self.max_seq_len} tokens. However, you requested "
                f"{total} tokens ({len(prompt_ids)} in the prompt, {params.max_tokens} in the completion). "
                "Please reduce the length of the prompt or completion."
            )

    @property
    def broken(self) -> str | None:
        """Why the engine cannot serve any more; None while it can (also once it was shut down)."""
        if self._broken is None and not self._thread.is_alive() and not self._stop:
            return "the engine's step thread stopped"
        return self._broken

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
            self._lock.notify()

    def stats(self) -> dict[str, float]:
        return {
            "steps": self.steps,
            "steps_looked_ahead": self.looked_ahead,
            "preemptions": self.scheduler.preemptions,
            "spec_draft_tokens": self.draft_tokens,
            "spec_accepted_tokens": self.accepted_tokens,
            "step_host_seconds": self.host_seconds,
            "step_wait_seconds": self.wait_seconds,
            "grammar_mask_seconds": self.mask_seconds,
            "waiting": len(self.scheduler.waiting) + len(self._inbox),
            "running": len(self.scheduler.running),
            "pages_used": self.allocator.num_used,
            "pages_free": self.allocator.num_free,
            "pages_total": self.allocator.num_pages - 1,
            "pages_cached": self.allocator.num_cached,
            "prompt_tokens": self.scheduler.prompt_tokens,
            "prefix_cached_tokens": self.scheduler.cached_tokens,
            "steps_by_kind": dict(self.step_kinds),
            "step_seconds_by_kind": dict(self.step_kind_seconds),
        }

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (benchmarks, tests); requests running keep their pages."""
        with self._lock:
            self._reset_cache = True
            self._lock.notify_all()
            self._lock.wait_for(lambda: not self._reset_cache or not self._thread.is_alive(), timeout=60)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop taking requests, let the running ones finish for up to `timeout` seconds, end
        the rest with an "abort" finish, and stop the thread."""
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (self._streams or self._inbox):
            time.sleep(0.02)
        with self._lock:
            self._stop = True
            self._lock.notify()
        self._thread.join()
        if self.channel is not None and self._broken is None:
            self.channel.publish("stop")
            self.channel = None
        atexit.unregister(self.shutdown)
        self.state = None  # the pool's memory goes back now, not when the engine is collected

    # ---- the step thread ----

    def _loop(self) -> None:
        while True:
            decision = None
            try:
                with self._lock:
                    while not (
                        self._stop
                        or self._inbox
                        or self._aborts
                        or self._reset_cache
                        or self.scheduler.num_unfinished
                        or self._inflight
                    ):
                        self._lock.wait()
                    if self._stop:
                        break
                    self._intake()
                    if self._inflight is None or self._may_look_ahead(self._inflight):
                        # with the lock: no abort slips in before it
                        decision = self.scheduler.schedule(look_ahead=self._inflight is not None)
                    self._queue = self._ahead()
                self._run(decision)
                self._queue = self._ahead()
            except _StepFailed as e:
                if not self._recover(e.seqs, e.error):
                    break
            except Exception as e:
                if not self._recover(list(self._seqs.values()), e, scheduling=True):
                    break
        self._end_all()

    def _may_look_ahead(self, flight: _Flight) -> bool:
        """Whether the next step may be dispatched before `flight` is read: not if a row's next
        input needs its token on the host first (a grammar's mask, penalties over the history), nor
        a speculative step (which of its tokens stand is decided on the host)."""
        return (
            self.pipelined
            and not (isinstance(flight.decision, Decode) and flight.decision.drafts)
            and not any(seq.grammar is not None or uses_penalties(seq) for seq in flight.decision.seqs)
        )

    def _run(self, decision: Prefill | Decode | Mixed | None) -> None:
        """Dispatch `decision` (if any), then read the step that was in flight before it (if any)."""
        previous, self._inflight = self._inflight, None
        failed = None
        if decision is not None:
            self.looked_ahead += previous is not None
            try:
                self._inflight = self._dispatch(decision)
            except Exception as e:  # the step in flight ran on the pool before it: its tokens stand
                failed = _StepFailed(decision.seqs, e)
        if previous is not None:
            try:
                self._resolve(previous)
            except Exception as e:  # the device failed under it: what was dispatched after fails too
                after = [] if self._inflight is None else self._inflight.decision.seqs
                self._inflight = None
                raise _StepFailed([*previous.decision.seqs, *after], e) from e
        if failed is not None:
            raise failed

    def _intake(self) -> None:
        """Take over new requests, aborts and a prefix-cache reset from the callers (lock held)."""
        if self._reset_cache:
            self.allocator.reset_cache()
            self._reset_cache = False
            self._lock.notify_all()
        for seq, _ in self._inbox:
            self._seqs[seq.request_id] = seq
            self.scheduler.add(seq)
        self._inbox = []
        for request_id in self._aborts:
            self._finish(request_id, "abort", emit=False)
        self._aborts = []

    def _dispatch(self, decision: Prefill | Decode | Mixed) -> _Flight:
        """Start a step on the device; its tokens count as computed at once, and each sampled
        row's token joins its sequence's output unresolved, to be read by `_resolve`."""
        started = time.monotonic()
        self.steps += 1
        for seq in decision.seqs:
            if (queued_at := self._queued_at.pop(seq.request_id, None)) is not None:
                self._queue_waits[seq.request_id] = started - queued_at
        if self.config.debug_step_delay:
            time.sleep(self.config.debug_step_delay)
        key, inputs = build_step(
            decision, self.buckets, self.max_seq_len, self.outputs.suppressed, self._masks, self.row_reuse
        )
        kind = "speculative" if key[0] == "decode" and key[2] > 1 else key[0]
        self.step_kinds[kind] += 1
        state, outs = self._call(key, inputs)
        if self.steps == self.config.debug_fail_step:  # after the pool was donated, as a device error
            raise RuntimeError(f"step {self.steps} failed on purpose (debug_fail_step)")
        self.state = state
        size = self.state.sampled.shape[0]
        decode, prefill = parts(decision)
        for row, seq in enumerate(decode.seqs if decode else ()):
            self.scheduler.advance(seq, 1)
            seq.expect(carry_offset("decode", size) + row)
        for row, chunk in enumerate(prefill.chunks if prefill else ()):
            self.scheduler.advance(chunk.seq, chunk.length)
            if chunk.final and chunk.seq.params.max_tokens:
                chunk.seq.expect(carry_offset("prefill", size) + row)
        self.host_seconds += time.monotonic() - started
        return _Flight(decision, outs, started, kind)

    def _resolve(self, flight: _Flight) -> None:
        """Read a dispatched step's tokens and hand out its deltas."""
        waiting = time.monotonic()
        outs = list(multihost.fetch(flight.outs))
        read = time.monotonic()
        self.wait_seconds += read - waiting
        decode, prefill = parts(flight.decision)
        if decode is not None:
            self._after_decode(decode, outs.pop(0))
        if prefill is not None:
            self._after_prefill(prefill, outs.pop(0))
        done = time.monotonic()
        self.host_seconds += done - read
        self.step_kind_seconds[flight.kind] += done - flight.started
        self.estimator.step(type(flight.decision).__name__.lower(), done - flight.started)

    def _warm_up(self) -> None:
        """Run every step shape once on padding (writes go to scratch page 0, no row is read): a
        shape's first run builds per-executable state (XLA:CPU: 60-110 ms a SmolLM2 step), which
        would otherwise stall every running stream the first time traffic needs that shape."""
        started = time.monotonic()
        keys = self.buckets.all_keys()
        for key in keys:
            self.state, outs = self._call(key, padding_step(key, self.config.page_size, self.max_seq_len, self._masks))
            jax.block_until_ready(outs)
        log.info("ran each of %d step shapes once in %.1fs", len(keys), time.monotonic() - started)

    def _call(self, key: Key, inputs: tuple[StepInputs, ...]) -> tuple[State, tuple[StepOutputs, ...]]:
        """Run step `key` on the pool (donated) -> (the new state, each segment's outputs); the
        followers of a multi-process mesh run it too (graph/multihost.py)."""
        if self.channel is not None:
            self.channel.publish("step", list(key), inputs)
        return self.table.get(key)(self.params, self.state, inputs)

    def _init_state(self):
        if self.channel is not None:
            self.channel.publish("init_kv")
        return self.table.init_kv()

    def _masks(self, rows):
        started = time.perf_counter()
        try:
            return self.grammars.masks(rows)
        finally:
            self.mask_seconds += time.perf_counter() - started

    def _recover(self, failed: list[Sequence], error: Exception, scheduling: bool = False) -> bool:
        """After a failed step: end its requests with an error, requeue the running ones, drop
        the prefix cache and rebuild the pool. -> False if that failed too (the engine is broken)."""
        self._inflight = None
        others = [s for s in self.scheduler.running if s not in failed]
        what = "scheduling a step" if scheduling else f"step {self.steps}"
        log.error(
            "%s failed: %d requests end with an error, %d running ones start over on a new KV pool",
            what,
            len(failed),
            len(others),
            exc_info=error,
        )
        try:  # the new pool first: a client that sees its error sees the engine's state after it
            if self.channel is not None:  # a process may be gone: the processes cannot agree on a new pool
                raise RuntimeError("a step failed on a mesh of several processes")
            self.state = None  # the old pool's memory goes back before the new one is made
            self.state = self._init_state()
        except Exception as e:
            log.exception("the engine could not recover from a failed step")
            self._broken = f"the engine could not recover from a failed step ({type(e).__name__}: {e})"
            return False
        finally:
            for seq in failed:
                self._finish(seq.request_id, "error", error=f"internal error: {type(error).__name__}: {error}")
        self.scheduler.preempt_all()
        self.allocator.reset_cache()
        return True

    def _ahead(self) -> Queue:
        """What a request submitted now finds ahead of it, besides the inbox."""
        running, waiting = self.scheduler.running, self.scheduler.waiting
        return Queue(
            prefill_tokens=sum(s.pending for s in running if s.pending > 1) + sum(s.length for s in waiting),
            running=len(running),
            waiting=len(waiting),
            decoding=any(s.pending == 1 for s in running),
        )

    def _end_all(self) -> None:
        """The step thread's last act: end every request still here (shutdown, or broken)."""
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for seq, _ in inbox:
            self._seqs[seq.request_id] = seq
        reason, error = ("abort", "the server shut down before the request finished")
        if self._broken is not None:
            reason, error = "error", self._broken
        for request_id in list(self._seqs):
            self._finish(request_id, reason, error=error)

    def _live(self, seq: Sequence) -> bool:
        """Still running: not finished or aborted while its step was in flight."""
        return self._seqs.get(seq.request_id) is seq

    def _after_prefill(self, step: Prefill, out) -> None:
        at = 0
        for row, chunk in enumerate(step.chunks):
            if self._live(chunk.seq):
                self.outputs.prompt_logprobs(chunk.seq, chunk, out.prompt, at)
                if chunk.final:  # else more chunks to go
                    self._emit(chunk.seq, self.outputs.accept(chunk.seq, out.sample, row))
            at += chunk.length

    def _after_decode(self, step: Decode, out) -> None:
        if step.drafts:
            return self._after_speculative(step, out)
        for row, seq in enumerate(step.seqs):
            if self._live(seq):
                self._emit(seq, self.outputs.accept(seq, out.sample, row))

    def _after_speculative(self, step: Decode, out) -> None:
        """Keep each row's samples while its drafts match them (graph/speculative.py): the K/V of
        a matched draft stands, and the sample after it is the sequence's next token. One delta
        per sequence carries all its new tokens."""
        T = self.buckets.verify_tokens
        for b, (seq, draft) in enumerate(zip(step.seqs, step.drafts, strict=True)):
            if not self._live(seq):
                continue
            row = b * T
            deltas = [self.outputs.accept(seq, out.sample, row)]
            self.draft_tokens += len(draft)
            kept = speculative.accepted(out.sample.token[row : row + len(draft)], draft)
            if draft:
                seq.drafted(kept)
            for i in range(kept):
                if deltas[-1].finish_reason is not None:
                    break
                self.accepted_tokens += 1
                self.scheduler.advance(seq, 1)  # draft i's K/V stands
                seq.expect(-1)
                deltas.append(self.outputs.accept(seq, out.sample, row + i + 1))
            self._emit(seq, merged(deltas))

    def _emit(self, seq: Sequence, delta: RequestOutput) -> None:
        self.scheduler.offer(seq)  # its newly known token may complete a page
        stream = self._streams.get(seq.request_id)
        delta.queue_wait = self._queue_waits.pop(seq.request_id, None)
        if delta.finish_reason is not None:
            self.estimator.finished(len(seq.output))
            self.scheduler.remove(seq)
            self._seqs.pop(seq.request_id, None)
            self._streams.pop(seq.request_id, None)
        if stream is not None:
            stream.push(delta)

    def _finish(self, request_id: str, reason: str, *, emit: bool = True, error: str | None = None) -> None:
        seq = self._seqs.pop(request_id, None)
        stream = self._streams.pop(request_id, None)
        self._queued_at.pop(request_id, None)
        queue_wait = self._queue_waits.pop(request_id, None)
        if seq is not None:
            self.scheduler.remove(seq)
        if emit and stream is not None and seq is not None:
            out = self.outputs.final(seq, reason, error)
            out.queue_wait = queue_wait
            stream.push(out)
