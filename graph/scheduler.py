"""The continuous-batching policy: admission by free pages, prefill chunks vs decode steps,
preemption of the youngest request when pages run out. Pure Python, no JAX: the engine turns a
`Prefill` or `Decode` decision into a call of a compiled executable.

A sequence's tokens are its prompt followed by its output. `computed` counts the tokens whose K/V
are in the cache; the tokens after it are "pending". A step feeds pending tokens and samples the
token that follows the last one: a prefill feeds a chunk of many, a decode feeds exactly one.
A preempted sequence loses its pages and its cache (`computed = 0`) but keeps its output: when it
is admitted again, prompt + output so far are prefilled and it continues where it was.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Any

from graph.api import SamplingParams
from graph.kv_cache import PageAllocator

_arrivals = itertools.count()


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
    state: Any = None  # the output processor's per-request state (detokenizer, stop matcher)

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
class Prefill:
    seq: Sequence
    start: int  # first position fed
    length: int  # tokens fed; the chunk is final when start + length == seq.length


@dataclasses.dataclass(frozen=True)
class Decode:
    seqs: list[Sequence]


class Scheduler:
    def __init__(self, allocator: PageAllocator, *, page_size: int, max_batch: int, max_prefill_tokens: int):
        self.allocator = allocator
        self.page_size = page_size
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self._last_was_prefill = False
        self.preemptions = 0  # total, for metrics and tests

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
        self.allocator.free(seq.pages)
        seq.pages = []

    def _admit(self) -> None:
        """Move waiting sequences to running while their whole pending prefill fits in free pages."""
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            need = self.pages_for(seq.length) - len(seq.pages)
            if need > self.allocator.num_free:
                return
            seq.pages += self.allocator.allocate(need)
            self.running.append(self.waiting.popleft())

    def _preempt_youngest(self) -> bool:
        """Preempt the youngest running sequence (possibly the one asking for a page)."""
        if len(self.running) <= 1:
            return False
        victim = max(self.running, key=lambda s: s.arrival)
        self.running.remove(victim)
        self._free(victim)
        victim.computed = 0
        victim.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(victim)
        return True

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

    def schedule(self) -> Prefill | Decode | None:
        """The next step, alternating prefill chunks and decode steps while both have work."""
        self._admit()
        prefilling = [s for s in self.running if s.pending > 1]
        decoding = [s for s in self.running if s.pending == 1]
        if prefilling and not (decoding and self._last_was_prefill):
            self._last_was_prefill = True
            seq = min(prefilling, key=lambda s: s.arrival)
            return Prefill(seq, seq.computed, min(seq.pending, self.max_prefill_tokens))
        self._last_was_prefill = False
        ready = self._grow(decoding)
        return Decode(ready) if ready else None

    def advance(self, seq: Sequence, fed: int) -> None:
        """`fed` more tokens of `seq` now have K/V in the cache."""
        seq.computed += fed

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)
