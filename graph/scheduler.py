"""The continuous-batching policy: admission by free pages (after reusing cached prefix pages),
mixed steps that carry the running batch's decode tokens and a chunk of a prompt together,
preemption of the youngest request when pages run out. Pure Python, no JAX: the engine turns a
`Prefill`, `Decode` or `Mixed` decision into a call of a compiled executable.

Order and fairness: requests are admitted first come, first served, and the oldest sequence that
still has prompt to prefill gets a chunk in every step, so a long prompt is never starved; while
it is prefilled, every running sequence still gets a token per step (in mixed steps, sized by
`mixed_tokens`), except the first of a burst (below). Without mixed steps (`mixed_tokens == 0`),
prefill chunks and decode steps alternate while both have work.

Bursts: prompts that arrive together (before the first of them is scheduled to decode) are prefilled
together, in full chunks without decode rows, as long as the rest takes at most BURST_STEPS
steps. Each is prefilled but its last token ("parked"), and one decode step then feeds every last
token: the burst's first tokens come out together (as where a server prefills a whole batch in one
step) and the burst decodes in step, with no stall after a first token and no mixed steps in its
inter-token gaps. The burst's first prompt, when prefilled alone before the rest came, has its
first token then, and waits for the others' before its second (`_decode`): the burst finishes in
one step. A prompt that arrives later is prefilled beside the decode rows as above.

Packing: what the oldest prompt leaves of a step's chunk budget goes to the next prompts in
arrival order (up to `packed_rows` prompts in one chunk, the last one possibly cut), so several
short prompts that arrive together are prefilled in one step. Their pages sit one after another
in the chunk's page-table row, which must stay within `packed_pages` (more context makes every
token's attention longer).

Prefix caching: when a sequence is admitted, the leading full pages of its tokens that the
allocator has cached (by a hash chained over the tokens, `graph/kv_cache.py`) are taken as they
are and only the rest is prefilled; at least the last token is always fed, since its logits give
the first output token. Every page a sequence fills is offered to the cache as soon as it is
full. A request that wants prompt logprobs is prefilled in full (the cached pages hold K/V, not
logits), but its pages still go into the cache.

A sequence's tokens are its prompt followed by its output. `computed` counts the tokens whose K/V
are in the cache; the tokens after it are "pending". A step feeds pending tokens and samples the
token that follows the last one: a prefill feeds a chunk of many, a decode feeds exactly one, and
a speculative decode (`speculative_tokens` K, no step in flight, no prompt waiting for a chunk, a
batch of at most `speculative_max_batch`) feeds it followed by up to K draft tokens looked up in
the sequence's own tokens (graph/speculative.py), with pages for their positions if free pages
allow; the engine keeps what the samples confirm.
A preempted sequence loses its pages and its cache (`computed = 0`) but keeps its output: when it
is admitted again, prompt + output so far are prefilled and it continues where it was.

Look-ahead (the engine dispatches step n+1 before it reads step n): when a step is dispatched, its
tokens count as computed and each sampled row's token joins the output as an unresolved
placeholder, which the next step feeds from the device; the engine fills it in when it reads the
step. While a step is in flight, `schedule(look_ahead=True)` never preempts (a sequence with an
unresolved token cannot be prefilled again): where a preemption is due it returns None, and the
engine reads the step in flight and schedules again; it skips sequences whose unresolved token is
their last (max_tokens). Pages are offered to the prefix cache once every token in them is known.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Any

from graph import speculative
from graph.api import SamplingParams
from graph.buckets import pick
from graph.kv_cache import PageAllocator, extend_hashes

_arrivals = itertools.count()


# A burst: prompts that arrive together (a client's batch, a closed loop's next round). Once the
# first of them are parked (prefilled but their last token), the rest are still prefilled in full
# chunks before any of them decodes, if that takes at most this many steps: the burst then decodes
# together, and no later token of it waits behind a mixed step's chunk (on the 2-core CPU, SmolLM2
# int8: a mixed step with 32 prompt tokens is 1.85x a decode step of 8). Their first tokens come
# out together after the burst's prefill: the first of them had come out one step in, then waited
# for the rest of the burst (SmolLM2 int8, concurrency 8, a closed loop: 0.1-1.3 s), which made
# the longest inter-token gaps of such a load.
BURST_STEPS = 4

# A step's fixed cost, in prompt tokens: dispatching the executables, sampling, reading back. A
# step's prefill cost grows with its padded chunk length; this is what a second step adds on top.
STEP_COST = 32


@dataclasses.dataclass(eq=False)
class Sequence:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    seed: int
    output: list[int] = dataclasses.field(default_factory=list)
    pages: list[int] = dataclasses.field(default_factory=list)
    computed: int = 0
    arrival: int = dataclasses.field(default_factory=lambda: next(_arrivals))
    preemptions: int = 0
    cached: int = 0  # prompt tokens taken from the prefix cache at first admission
    hashes: list[bytes] = dataclasses.field(default_factory=list)  # of its full pages, chained
    state: Any = None  # the output processor's per-request state (detokenizer, stop matcher)
    grammar: Any = None  # a constrained request's matcher (graph/structured.py), kept across preemption
    unresolved: int = 0  # trailing output tokens sampled by steps in flight, not read yet (placeholders)
    carried: int = -1  # where the last dispatched step keeps the newest of them on the device
    offered: int = 0  # leading pages offered to the prefix cache
    draft_misses: int = 0  # speculative steps in a row that kept none of its drafts
    draft_pause: int = 0  # steps to go before it drafts again (after misses)
    burst: int = -1  # arrival count when first scheduled to decode: the prompts that came before are its burst

    PLACEHOLDER = -1

    def expect(self, carried: int) -> None:
        """A dispatched step samples this sequence's next token (kept on the device at `carried`)."""
        self.output.append(self.PLACEHOLDER)
        self.unresolved += 1
        self.carried = carried

    def resolve(self, token: int) -> int:
        """The oldest unresolved token is `token`. -> how many output tokens are known now."""
        at = len(self.output) - self.unresolved
        self.output[at] = token
        self.unresolved -= 1
        return at + 1

    @property
    def closing(self) -> bool:
        """Its unresolved token is its last (max_tokens): it ends once that is read."""
        return self.unresolved > 0 and len(self.output) >= self.params.max_tokens

    def drafted(self, kept: int) -> None:
        """A speculative step kept `kept` of its drafts: after m misses in a row it drafts again
        only in 2**m - 1 steps (at most 15), so a text that does not repeat itself costs little."""
        self.draft_misses = 0 if kept else self.draft_misses + 1
        self.draft_pause = min(2**self.draft_misses - 1, 15)

    def forget_unresolved(self) -> None:
        """Drop the placeholders of steps whose results will not be read (finished, preempted)."""
        del self.output[len(self.output) - self.unresolved :]
        self.unresolved = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def pending(self) -> int:
        return self.length - self.computed


@dataclasses.dataclass(frozen=True)
class Chunk:
    seq: Sequence
    start: int  # first position fed
    length: int  # tokens fed
    # the last of the sequence's pending tokens (its logits give the next token); fixed when the
    # chunk is made, as the sequence grows once its step is dispatched
    final: bool = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "final", self.start + self.length == self.seq.length)


@dataclasses.dataclass(frozen=True)
class Prefill:
    """Prompt chunks fed in one step, one after another in one row (oldest first)."""

    chunks: tuple[Chunk, ...]

    @property
    def tokens(self) -> int:
        return sum(c.length for c in self.chunks)

    @property
    def seqs(self) -> list[Sequence]:
        return [c.seq for c in self.chunks]


@dataclasses.dataclass(frozen=True)
class Decode:
    seqs: list[Sequence]
    drafts: tuple[tuple[int, ...], ...] = ()  # a speculative step: each sequence's draft tokens (graph/speculative.py)

    @property
    def row_drafts(self) -> tuple[tuple[int, ...], ...]:
        """Each sequence's drafts, () for every one of a one-token step."""
        return self.drafts or ((),) * len(self.seqs)


@dataclasses.dataclass(frozen=True)
class Mixed:
    """One step that decodes `decode`'s batch and feeds `prefill`'s chunk."""

    decode: Decode
    prefill: Prefill

    @property
    def seqs(self) -> list[Sequence]:
        return self.decode.seqs + self.prefill.seqs


def uses_penalties(seq: Sequence) -> bool:
    p = seq.params
    return p.presence_penalty != 0 or p.frequency_penalty != 0 or p.repetition_penalty != 1


def parts(step: Prefill | Decode | Mixed) -> tuple[Decode | None, Prefill | None]:
    """A step's decode batch and prefill chunk, in the order of its segments (either may be None)."""
    if isinstance(step, Mixed):
        return step.decode, step.prefill
    return (step, None) if isinstance(step, Decode) else (None, step)


class Scheduler:
    def __init__(
        self,
        allocator: PageAllocator,
        *,
        page_size: int,
        max_batch: int,
        max_prefill_tokens: int,
        mixed_tokens: int = 0,
        salt: bytes = b"",
        packed_rows: int = 1,
        max_pages: int | None = None,
        chunk_sizes: tuple[int, ...] = (),
        speculative_tokens: int = 0,
        speculative_max_batch: int = 0,
        prompt_lookup: tuple[int, int] = (1, 4),
        max_seq_len: int = 1 << 30,
    ):
        self.allocator = allocator
        self.page_size = page_size
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens  # chunk of a step without decode rows
        self.mixed_tokens = mixed_tokens  # chunk of a step with decode rows (0: no mixed steps)
        self.salt = salt  # what else the K/V depend on (model, dtype, quantization): roots the hash chain
        self.packed_rows = packed_rows  # prompts one chunk may carry
        self.max_pages = max_pages  # of a chunk's row (the largest context bucket); None: unbounded
        self.chunk_sizes = chunk_sizes  # compiled lengths of a chunk without decode rows, ascending
        self.speculative_tokens = speculative_tokens  # drafts per sequence of a speculative step (0: none)
        self.speculative_max_batch = speculative_max_batch  # larger decode batches are not speculated
        self.prompt_lookup = prompt_lookup  # (shortest, longest) n-gram a draft is looked up by
        self.max_seq_len = max_seq_len
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self._last_was_prefill = False
        self.preemptions = 0  # total, for metrics and tests
        self.prompt_tokens = 0  # of admitted requests (first admission), for the prefix-cache hit rate
        self.cached_tokens = 0  # of which were taken from the prefix cache

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """A finished or aborted sequence leaves and frees its pages at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free(seq)

    def _free(self, seq: Sequence) -> None:
        # last page first: the cache evicts the oldest first, so a prefix outlives its tail
        self.allocator.free(seq.pages[::-1])
        seq.pages = []
        seq.offered = 0

    def _hashes(self, seq: Sequence, n: int) -> list[bytes]:
        extend_hashes(seq.hashes, seq.tokens, self.page_size, self.salt, n)
        return seq.hashes[:n]

    def _admit(self) -> None:
        """Move waiting sequences to running while what they still have to prefill fits in free
        pages, taking their cached prefix pages first."""
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            if self.allocator.caching and not seq.pages and seq.params.prompt_logprobs is None:
                seq.pages = self.allocator.lookup(self._hashes(seq, (seq.length - 1) // self.page_size))
                seq.computed = len(seq.pages) * self.page_size
                seq.offered = len(seq.pages)
            need = self.pages_for(seq.length) - len(seq.pages)
            if need > self.allocator.num_free:
                self._free(seq)  # the cached pages stay cached
                seq.computed = 0
                return
            seq.pages += self.allocator.allocate(need)
            if not seq.preemptions:
                seq.cached = min(seq.computed, len(seq.prompt))
                self.prompt_tokens += len(seq.prompt)
                self.cached_tokens += seq.cached
            self.running.append(self.waiting.popleft())

    def _preempt_youngest(self) -> bool:
        """Preempt the youngest running sequence (possibly the one asking for a page). Its pages'
        references go; the pages it filled stay in the prefix cache for its return."""
        if len(self.running) <= 1:
            return False
        self._preempt(max(self.running, key=lambda s: s.arrival))
        return True

    def preempt_all(self) -> None:
        """Preempt every running sequence, youngest first, so they queue again in arrival order
        (the engine's recovery from a failed step: the pool's contents are gone)."""
        for seq in sorted(self.running, key=lambda s: s.arrival, reverse=True):
            self._preempt(seq)

    def _preempt(self, victim: Sequence) -> None:
        victim.forget_unresolved()
        self.running.remove(victim)
        self._free(victim)
        victim.computed = 0
        victim.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(victim)

    def _grow(self, seqs: list[Sequence]) -> list[Sequence]:
        """Give every decoding sequence a page for its next token, preempting the youngest when
        the pool is empty. Returns the sequences that can decode this step (oldest first)."""
        ready = []
        for seq in sorted(seqs, key=lambda s: s.arrival):
            while seq in self.running and self.pages_for(seq.computed + 1) > len(seq.pages):
                if self.allocator.num_free:
                    seq.pages += self.allocator.allocate(1)
                elif not self._preempt_youngest():
                    raise RuntimeError("KV pool cannot hold a single sequence")  # excluded at start-up
            if seq in self.running:
                ready.append(seq)
        return ready

    def schedule(self, look_ahead: bool = False) -> Prefill | Decode | Mixed | None:
        """The next step: the running batch's decode tokens together with a chunk of the oldest
        prompt still being prefilled (or, without mixed steps, the two in turn). `look_ahead`: a
        step is still in flight (see the module's docstring): None where the step would preempt."""
        self._admit()
        prefilling = [s for s in self.running if s.pending > 1]
        decoding = [s for s in self.running if s.pending == 1 and not s.closing]
        for seq in decoding:
            if seq.burst < 0:  # every prompt that arrived by now arrived before its first decode
                seq.burst = next(_arrivals)
        short = sum(self.pages_for(s.computed + 1) > len(s.pages) for s in decoding)
        if look_ahead and short > self.allocator.num_free:
            return None  # a preemption is due: decided once the step in flight is read
        if not self.mixed_tokens:
            if prefilling and not (decoding and self._last_was_prefill):
                self._last_was_prefill = True
                return self._fit(self._chunk(prefilling, self.max_prefill_tokens))
            self._last_was_prefill = False
            return self._decode(self._grow(decoding), look_ahead)
        ready = self._grow(decoding) if decoding else []
        prefilling = [s for s in prefilling if s in self.running]  # a page for a decode may preempt one
        if not prefilling:
            return self._decode(ready, look_ahead)
        if not ready or self._burst_first(ready, prefilling):
            park = len(prefilling) + len(ready) > 1  # a burst: its first tokens come out in one step
            return self._fit(self._chunk(prefilling, self.max_prefill_tokens, park))
        return Mixed(Decode(ready), self._chunk(prefilling, self.mixed_tokens))

    def _burst_first(self, ready: list[Sequence], prefilling: list[Sequence]) -> bool:
        """Whether the rest of a burst is prefilled before its first prompts decode: every decoding
        sequence is parked (its prompt but the last token computed) or has only its first token,
        every prompt still being prefilled arrived before those were first scheduled to decode, and
        what is left fits in BURST_STEPS full chunks."""
        if any(len(s.output) > 1 or s.burst < 0 for s in ready):
            return False
        start = min(s.burst for s in ready)
        left = sum(s.pending for s in prefilling)
        return all(s.arrival < start for s in prefilling) and left <= BURST_STEPS * self.max_prefill_tokens

    def _decode(self, ready: list[Sequence], look_ahead: bool) -> Decode | None:
        """A decode step of `ready`, speculative where drafts are found (never while a step is in
        flight: a draft is looked up from the tokens before it).

        A step that gives some sequences their first token (a burst's parked prompts, a one-token
        or fully cached prompt) gives none its second: one that has only its first token (from
        its own prefill: the burst's first prompt, prefilled alone before the rest came) sits the
        step out, so the burst's streams have as many tokens after it and finish in one step.
        Otherwise that one would finish a step before the rest; in a closed loop its client's next
        prompt would arrive alone, go in a mixed step beside the others' last tokens, have its
        first token a step early again, and keep the burst out of step for good."""
        if any(not s.output for s in ready):
            ready = [s for s in ready if len(s.output) != 1]
        if not ready:
            return None
        if look_ahead or not self.speculative_tokens or len(ready) > self.speculative_max_batch:
            return Decode(ready)
        drafts = tuple(self._draft(seq) for seq in ready)
        return Decode(ready, drafts) if any(drafts) else Decode(ready)

    def _draft(self, seq: Sequence) -> tuple[int, ...]:
        """Draft tokens for `seq` (graph/speculative.py), with pages for their positions taken from
        free pages only (a draft never preempts); () where its next inputs need each token first."""
        p = seq.params
        if seq.grammar is not None or uses_penalties(seq) or seq.unresolved:
            return ()
        if seq.draft_pause:
            seq.draft_pause -= 1
            return ()
        # every kept sample is an output token, within max_tokens, and every draft a position in the context
        k = min(self.speculative_tokens, p.max_tokens - len(seq.output) - 1, self.max_seq_len - 1 - seq.computed)
        if len(seq.output) < p.min_tokens:  # end tokens are suppressed for every sample of the step, or for none
            k = min(k, p.min_tokens - len(seq.output) - 1)
        if k <= 0:
            return ()
        draft = speculative.propose(seq.tokens, k, *self.prompt_lookup)
        need = self.pages_for(seq.computed + 1 + len(draft)) - len(seq.pages)
        if need > 0:
            seq.pages += self.allocator.allocate(min(need, self.allocator.num_free))
            draft = draft[: len(seq.pages) * self.page_size - seq.computed - 1]
        return tuple(draft)

    def _chunk(self, prefilling: list[Sequence], limit: int, park: bool = False) -> Prefill:
        """The oldest prompt's next chunk, and what it leaves of `limit` packed with the next ones.
        `park`: each prompt stops before its last token, which a decode step feeds later (a burst's
        first tokens then come out together, not a whole burst's prefill before each one's second);
        not a prompt that wants prompt logprobs, which are read from its prefill."""

        def left(seq: Sequence) -> int:
            return seq.pending - 1 if park and seq.params.prompt_logprobs is None else seq.pending

        first, *rest = sorted(prefilling, key=lambda s: s.arrival)
        chunks = [Chunk(first, first.computed, min(left(first), limit))]
        budget = limit - chunks[0].length
        pages = self.pages_for(first.computed + chunks[0].length)
        bound = max(pages, self.packed_pages(limit))
        for seq in rest:
            if budget <= 0 or len(chunks) == self.packed_rows:
                break
            n = min(left(seq), budget)
            more = self.pages_for(seq.computed + n)
            if pages + more <= bound:
                chunks.append(Chunk(seq, seq.computed, n))
                budget -= n
                pages += more
        return Prefill(tuple(chunks))

    def _fit(self, step: Prefill) -> Prefill:
        """Cut a chunk at the compiled length below it when padding it up to the one above costs
        more than a second, short step for the rest (a step's cost taken as its padded length plus
        STEP_COST tokens): 134 tokens go as 128 + 6, not padded to 256; 200 go whole."""
        n, sizes = step.tokens, self.chunk_sizes
        below = [s for s in sizes if s < n]
        if not below or n > sizes[-1]:
            return step
        cut = below[-1]
        if cut + pick(sizes, n - cut) + STEP_COST >= pick(sizes, n):
            return step
        chunks, left = [], cut
        for c in step.chunks:
            if left == 0:
                break
            chunks.append(dataclasses.replace(c, length=min(c.length, left)))
            left -= chunks[-1].length
        return Prefill(tuple(chunks))

    def packed_pages(self, limit: int) -> int:
        """Row pages a packed chunk of `limit` tokens may use: its tokens' pages, each prompt's
        last one partly filled."""
        pages = self.pages_for(limit) + self.packed_rows - 1
        return pages if self.max_pages is None else min(pages, self.max_pages)

    def advance(self, seq: Sequence, fed: int) -> None:
        """`fed` more tokens of `seq` now have K/V in the cache (or will, once the step in flight
        has run); pages that this fills are offered to the prefix cache."""
        seq.computed += fed
        self.offer(seq)

    def offer(self, seq: Sequence) -> None:
        """Offer the prefix cache every page of `seq` that is full of computed, known tokens."""
        full = min(seq.computed, seq.length - seq.unresolved) // self.page_size
        if full > seq.offered and self.allocator.caching:
            hashes = self._hashes(seq, full)
            for i in range(seq.offered, full):
                self.allocator.register(seq.pages[i], hashes[i])
        seq.offered = max(seq.offered, full)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)
