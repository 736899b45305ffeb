"""The scheduler and the page allocator against a fake model whose outputs can be worked out by
hand: the next token is (last token + 1) % 100, so a request with prompt [..., 7] and max_tokens 3
answers [8, 9, 10] however it was batched, chunked or preempted.

The fake model also stands in for the paged KV cache: every fed token is written into a pool of
pages through the sequence's page list, and the whole context is read back through it, so a page
written while another sequence holds it, a cached page whose contents are not the prefix it is
reused for, or a cache that survives a preemption it should not, fails loudly.
"""

from __future__ import annotations

import random

import pytest

from graph import scheduler
from graph.api import SamplingParams
from graph.kv_cache import PageAllocator
from graph.scheduler import Chunk, Decode, Mixed, Prefill, Scheduler, Sequence


def expected(prompt: list[int], max_tokens: int) -> list[int]:
    return [(prompt[-1] + i) % 100 for i in range(1, max_tokens + 1)]


class FakeModel:
    def __init__(self, allocator: PageAllocator, page_size: int):
        self.allocator = allocator
        self.page_size = page_size
        self.pool: list[list[int | None]] = [[None] * page_size for _ in range(allocator.num_pages)]

    def _slot(self, seq: Sequence, pos: int) -> tuple[int, int]:
        page = seq.pages[pos // self.page_size]  # IndexError: the scheduler gave too few pages
        assert page != 0, "page 0 is scratch"
        return page, pos % self.page_size

    def feed(self, seq: Sequence, start: int, n: int) -> int:
        """Write tokens [start, start + n) into the cache and return the token after them."""
        assert start == seq.computed and 0 < n <= seq.pending
        for pos in range(start, start + n):
            page, slot = self._slot(seq, pos)
            assert self.allocator.refs(page) == 1, f"{seq.request_id} writes into page {page}, which is shared"
            self.pool[page][slot] = seq.tokens[pos]
        context = [self.pool[p][s] for p, s in (self._slot(seq, pos) for pos in range(start + n))]
        assert context == seq.tokens[: start + n], seq.request_id
        return (context[-1] + 1) % 100


class Driver:
    """The engine's step loop (graph/engine.py) with the fake model in place of the executables."""

    def __init__(
        self,
        usable_pages: int,
        *,
        page_size: int,
        max_batch: int,
        max_prefill_tokens: int,
        mixed_tokens: int = 0,
        caching: bool = False,
        packed_rows: int = 1,
        chunk_sizes: tuple[int, ...] = (),
    ):
        self.allocator = PageAllocator(usable_pages + 1, caching=caching)
        self.scheduler = Scheduler(
            self.allocator,
            page_size=page_size,
            max_batch=max_batch,
            max_prefill_tokens=max_prefill_tokens,
            mixed_tokens=mixed_tokens,
            packed_rows=packed_rows,
            max_pages=usable_pages,
            chunk_sizes=chunk_sizes,
        )
        self.model = FakeModel(self.allocator, page_size)
        self.trace: list[tuple] = []
        self.finished: dict[str, list[int]] = {}

    def add(self, request_id: str, prompt: list[int], max_tokens: int, **params) -> Sequence:
        seq = Sequence(request_id, list(prompt), SamplingParams(max_tokens=max_tokens, **params), seed=0)
        self.scheduler.add(seq)
        return seq

    def step(self) -> Prefill | Decode | Mixed | None:
        d = self.scheduler.schedule()
        if isinstance(d, Mixed):  # the engine's order: the decode rows, then the chunk
            chunks = (c.seq.request_id for c in d.prefill.chunks)
            self.trace.append(("M", *(s.request_id for s in d.decode.seqs), "+", *chunks))
            self._decode(d.decode)
            self._prefill(d.prefill)
        elif isinstance(d, Prefill):
            self.trace.append(("P", *(x for c in d.chunks for x in (c.seq.request_id, c.start, c.length))))
            self._prefill(d)
        elif isinstance(d, Decode):
            self.trace.append(("D", *(s.request_id for s in d.seqs)))
            self._decode(d)
        self.check_pages()
        return d

    def _prefill(self, d: Prefill) -> None:
        assert len({id(c.seq) for c in d.chunks}) == len(d.chunks) <= self.scheduler.packed_rows
        pages = sum(self.scheduler.pages_for(c.start + c.length) for c in d.chunks)
        assert len(d.chunks) == 1 or pages <= self.scheduler.packed_pages(self.scheduler.max_prefill_tokens)
        for c in d.chunks:
            seq = c.seq
            assert c.length > 0 and c.start == seq.computed
            token = self.model.feed(seq, c.start, c.length)
            self.scheduler.advance(seq, c.length)
            if c.final:  # the last chunk samples the next token
                self._accept(seq, token)

    def _decode(self, d: Decode) -> None:
        assert all(s.pending == 1 for s in d.seqs)
        tokens = [self.model.feed(s, s.computed, 1) for s in d.seqs]  # one batched step
        for seq, token in zip(d.seqs, tokens, strict=True):
            self.scheduler.advance(seq, 1)
            self._accept(seq, token)

    def _accept(self, seq: Sequence, token: int) -> None:
        seq.output.append(token)
        if len(seq.output) >= seq.params.max_tokens:
            self.scheduler.remove(seq)
            self.finished[seq.request_id] = list(seq.output)

    def run(self, max_steps: int = 1000) -> list[tuple]:
        for _ in range(max_steps):
            if not self.scheduler.num_unfinished:
                return self.trace
            assert self.step() is not None, "unfinished requests but nothing scheduled"
        raise AssertionError("did not finish")

    def check_pages(self) -> None:
        live = list(self.scheduler.running) + list(self.scheduler.waiting)
        self.allocator.check([s.pages for s in live])  # exact reference counts, each page in one state
        if not self.allocator.caching:
            owned = [p for s in live for p in s.pages]
            assert len(owned) == len(set(owned)), "a page is owned by two live sequences"
            assert self.allocator.num_used == len(owned)
        assert all(not s.pages for s in self.scheduler.waiting)
        assert len(self.scheduler.running) <= self.scheduler.max_batch


# ---- the page allocator ----


def test_allocator_hands_out_low_pages_first_and_never_the_scratch_page():
    a = PageAllocator(5)
    assert (a.num_free, a.num_used) == (4, 0)
    assert a.allocate(3) == [1, 2, 3]
    assert (a.num_free, a.num_used) == (1, 3)
    assert a.allocate(1) == [4]
    assert a.allocate(0) == []
    with pytest.raises(MemoryError, match="1 pages requested, 0 free"):
        a.allocate(1)


def test_allocator_refuses_more_pages_than_are_free_without_taking_any():
    a = PageAllocator(4)
    with pytest.raises(MemoryError):
        a.allocate(4)
    assert a.num_free == 3
    assert a.allocate(3) == [1, 2, 3]


def test_allocator_free_returns_pages_for_reuse():
    a = PageAllocator(4)
    pages = a.allocate(2)
    a.free(pages)
    assert (a.num_free, a.num_used) == (3, 0)
    assert sorted(a.allocate(3)) == [1, 2, 3]


def test_shared_pages_return_to_the_pool_with_their_last_reference():
    a = PageAllocator(4)
    pages = a.allocate(2)
    a.share(pages)
    a.share(pages[:1])
    a.free(pages)
    assert a.num_free == 1  # both still referenced
    a.free(pages)
    assert a.num_free == 2  # pages[1] is back, pages[0] has one more reference
    a.free(pages[:1])
    assert a.num_free == 3
    with pytest.raises(RuntimeError, match="freed twice"):
        a.free(pages[:1])


def test_double_free_and_freeing_a_never_allocated_page_are_errors():
    a = PageAllocator(4)
    (page,) = a.allocate(1)
    a.free([page])
    with pytest.raises(RuntimeError, match=f"page {page} freed twice"):
        a.free([page])
    with pytest.raises(RuntimeError, match="page 3 freed twice"):
        a.free([3])
    assert a.num_free == 3


def test_allocator_needs_a_page_besides_scratch():
    with pytest.raises(ValueError):
        PageAllocator(1)


# ---- scheduling decisions, worked out by hand ----


def test_admission_waits_for_free_pages():
    d = Driver(4, page_size=4, max_batch=4, max_prefill_tokens=16)
    a = d.add("a", [1, 2, 3, 4, 5, 6, 7, 8], max_tokens=3)  # 2 pages
    b = d.add("b", list(range(20, 32)), max_tokens=1)  # 3 pages: only 2 are left
    d.step()
    assert d.scheduler.running == [a] and list(d.scheduler.waiting) == [b]
    assert a.pages == [1, 2] and b.pages == [] and d.allocator.num_free == 2
    d.step()  # a's 9th token needs a third page: 1 left, still not enough for b
    assert list(d.scheduler.waiting) == [b] and d.allocator.num_free == 1 and a.pages == [1, 2, 3]
    assert d.run() == [("P", "a", 0, 8), ("D", "a"), ("D", "a"), ("P", "b", 0, 12)]
    assert d.finished == {"a": [9, 10, 11], "b": [32]}
    assert d.allocator.num_free == 4


def test_max_batch_bounds_the_running_set_and_the_decode_batch():
    d = Driver(16, page_size=4, max_batch=2, max_prefill_tokens=16)
    for name, last in (("a", 10), ("b", 20), ("c", 30)):
        d.add(name, [last - 1, last], max_tokens=3)
    assert d.run() == [
        ("P", "a", 0, 2),
        ("D", "a"),
        ("P", "b", 0, 2),
        ("D", "a", "b"),  # a is done: c is admitted
        ("P", "c", 0, 2),
        ("D", "b", "c"),
        ("D", "c"),
    ]
    assert d.finished == {"a": [11, 12, 13], "b": [21, 22, 23], "c": [31, 32, 33]}


def test_a_one_token_prompt_needs_no_prefill():
    d = Driver(4, page_size=4, max_batch=4, max_prefill_tokens=16)
    d.add("a", [41], max_tokens=3)
    assert d.run() == [("D", "a"), ("D", "a"), ("D", "a")]
    assert d.finished == {"a": [42, 43, 44]}


def test_long_prompts_are_prefilled_in_chunks_of_max_prefill_tokens():
    d = Driver(8, page_size=4, max_batch=4, max_prefill_tokens=4)
    d.add("a", list(range(11)), max_tokens=2)
    assert d.run() == [("P", "a", 0, 4), ("P", "a", 4, 4), ("P", "a", 8, 3), ("D", "a")]
    assert d.finished == {"a": [11, 12]}


def test_prefill_chunks_and_decode_steps_alternate_while_both_have_work():
    d = Driver(16, page_size=4, max_batch=4, max_prefill_tokens=4)
    d.add("a", [1, 2], max_tokens=8)
    d.add("b", list(range(11)), max_tokens=1)
    assert d.run() == [
        ("P", "a", 0, 2),
        ("D", "a"),
        ("P", "b", 0, 4),
        ("D", "a"),
        ("P", "b", 4, 4),
        ("D", "a"),
        ("P", "b", 8, 3),  # b's only token: done
        ("D", "a"),
        ("D", "a"),
        ("D", "a"),
        ("D", "a"),
    ]
    assert d.finished == {"a": [3, 4, 5, 6, 7, 8, 9, 10], "b": [11]}


def test_the_youngest_is_preempted_and_resumes_where_it_was():
    d = Driver(3, page_size=2, max_batch=4, max_prefill_tokens=8)
    a = d.add("a", [10, 11, 12], max_tokens=3)  # 2 pages
    b = d.add("b", [50], max_tokens=3)  # 1 page: the pool is full
    for _ in range(3):
        d.step()
    # b's one prompt token is its first decode row: a, which has its first token, waits for it
    assert d.trace == [("P", "a", 0, 3), ("D", "b"), ("D", "a", "b")]
    d.step()  # a's 5th token needs a page: b, the youngest, gives its page up
    assert d.trace[-1] == ("D", "a") and "a" in d.finished
    assert b.preemptions == 1 and a.preemptions == 0 and b.output == [51, 52]
    assert d.run() == [
        ("P", "a", 0, 3),
        ("D", "b"),
        ("D", "a", "b"),
        ("D", "a"),
        ("P", "b", 0, 3),  # prompt and output so far are prefilled again: its last token follows
    ]
    assert d.finished == {"a": [13, 14, 15], "b": [51, 52, 53]}
    assert d.allocator.num_free == 3


def test_the_youngest_is_preempted_even_when_it_is_the_one_that_needs_a_page():
    """When the youngest running sequence needs a page and none is free, it must give up its own
    pages (vLLM's policy; "preemption of the youngest request" in graph/scheduler.py), not take
    them from an older sequence whose cache is then thrown away."""
    d = Driver(2, page_size=4, max_batch=4, max_prefill_tokens=8)
    a = d.add("a", [10, 11], max_tokens=6)  # 1 page
    b = d.add("b", [20, 21, 22, 23], max_tokens=4)  # 1 page: the pool is full
    for _ in range(3):
        d.step()
    assert d.trace == [("P", "a", 0, 2), ("D", "a"), ("P", "b", 0, 4)]
    d.step()  # b's 5th token needs a second page; a (4 tokens) still fits its own
    assert (a.preemptions, b.preemptions) == (0, 1)
    assert d.trace[-1] == ("D", "a")
    assert d.run() == [
        ("P", "a", 0, 2),
        ("D", "a"),
        ("P", "b", 0, 4),
        ("D", "a"),  # b gave its page up: it waits, at the head of the queue
        ("D", "a"),
        ("D", "a"),
        ("D", "a"),  # a is done
        ("P", "b", 0, 5),
        ("D", "b"),
        ("D", "b"),
    ]
    assert d.finished == {"a": expected([11], 6), "b": expected([23], 4)}


def test_preempted_sequences_end_with_the_output_they_would_have_had_alone():
    d = Driver(6, page_size=2, max_batch=4, max_prefill_tokens=4)
    prompts = {"a": [1, 2, 3], "b": [40, 41], "c": [70, 71, 72, 73, 74], "d": [90]}
    seqs = [d.add(name, prompt, max_tokens=6) for name, prompt in prompts.items()]
    d.run()
    assert sum(s.preemptions for s in seqs) > 0
    assert d.finished == {name: expected(prompt, 6) for name, prompt in prompts.items()}
    assert d.allocator.num_free == 6


def test_removing_a_sequence_frees_its_pages_at_once_and_admits_the_next():
    d = Driver(3, page_size=4, max_batch=4, max_prefill_tokens=16)
    a = d.add("a", list(range(8)), max_tokens=50)
    b = d.add("b", list(range(8)), max_tokens=1)
    d.step()
    assert d.scheduler.running == [a] and list(d.scheduler.waiting) == [b]
    d.scheduler.remove(a)  # aborted
    assert a.pages == [] and d.allocator.num_free == 3
    d.scheduler.remove(a)  # a second removal is harmless
    assert d.run() == [("P", "a", 0, 8), ("P", "b", 0, 8)]
    assert d.finished == {"b": [8]}


def test_removing_a_waiting_sequence_takes_it_off_the_queue():
    d = Driver(3, page_size=4, max_batch=4, max_prefill_tokens=16)
    d.add("a", list(range(8)), max_tokens=2)
    b = d.add("b", list(range(8)), max_tokens=2)
    d.step()
    assert list(d.scheduler.waiting) == [b]
    d.scheduler.remove(b)
    assert not d.scheduler.waiting
    assert d.run() == [("P", "a", 0, 8), ("D", "a")]
    assert d.finished == {"a": [8, 9]}
    assert d.allocator.num_free == 3


# ---- a random workload ----


@pytest.mark.parametrize(("packed_rows", "chunk_sizes"), [(1, ()), (3, ()), (3, (2, 4, 8))])
def test_random_workload_with_aborts_frees_every_page_and_answers_correctly(packed_rows, chunk_sizes, monkeypatch):
    monkeypatch.setattr(scheduler, "STEP_COST", 0)  # with chunk sizes: cut chunks wherever padding costs
    rng = random.Random(20240611)
    usable = 24
    d = Driver(usable, page_size=4, max_batch=6, max_prefill_tokens=8, packed_rows=packed_rows, chunk_sizes=chunk_sizes)
    seqs: dict[str, Sequence] = {}
    aborted: set[str] = set()
    preempted = 0
    for step in range(100_000):
        if len(seqs) < 200 and rng.random() < 0.4:
            name = f"r{len(seqs)}"
            prompt = [rng.randrange(100) for _ in range(rng.randint(1, 40))]
            seqs[name] = d.add(name, prompt, max_tokens=rng.randint(1, 40))  # at most 80 tokens = 20 pages
        live = [n for n, s in seqs.items() if n not in d.finished and n not in aborted]
        if live and rng.random() < 0.02:
            name = rng.choice(live)
            d.scheduler.remove(seqs[name])
            aborted.add(name)
        if not d.scheduler.num_unfinished:
            if len(seqs) == 200:
                break
            continue
        decision = d.step()
        assert decision is not None, f"step {step}: unfinished requests but nothing scheduled"
        preempted = sum(s.preemptions for s in seqs.values())
    else:
        raise AssertionError("the workload did not finish")
    assert len(seqs) == 200 and 10 < len(aborted) < 100
    assert preempted > 10, "the workload should exercise preemption"
    assert set(d.finished) | aborted == set(seqs) and not set(d.finished) & aborted
    for name, out in d.finished.items():
        assert out == expected(seqs[name].prompt, seqs[name].params.max_tokens), name
    assert d.allocator.num_free == usable and d.allocator.num_used == 0
    assert all(s.pages == [] for s in seqs.values())


# ---- mixed steps ----


def test_running_sequences_get_a_token_in_every_step_while_a_long_prompt_is_prefilled():
    d = Driver(32, page_size=4, max_batch=4, max_prefill_tokens=16, mixed_tokens=4)
    d.add("a", [1, 2], max_tokens=8)
    d.add("b", [3], max_tokens=8)
    d.step()
    d.add("c", list(range(30)), max_tokens=2)  # 30 tokens: chunks of 4 beside the decode rows
    assert d.run() == [
        ("P", "a", 0, 1),  # a and b came together: a's prompt but its last token, then they decode together
        *[("M", "a", "b", "+", "c")] * 8,  # c: chunks of 4, 4, ..., 2, and a token for a and b in each step
        ("D", "c"),
    ]
    assert d.finished == {"a": expected([2], 8), "b": expected([3], 8), "c": expected([29], 2)}


def test_a_burst_is_prefilled_first_and_its_first_tokens_come_out_together():
    d = Driver(64, page_size=4, max_batch=8, max_prefill_tokens=16, mixed_tokens=4, packed_rows=2)
    for name in "abcd":
        d.add(name, list(range(8)), max_tokens=3)
    d.step()
    d.add("e", list(range(8)), max_tokens=3)  # while the first step ran: still the burst
    assert d.run() == [
        ("P", "a", 0, 7, "b", 0, 7),  # each prompt but its last token: nobody's first token yet
        ("P", "c", 0, 7, "d", 0, 7),  # a and b wait: the rest of their burst fits in BURST_STEPS chunks
        ("P", "e", 0, 7),
        ("D", "a", "b", "c", "d", "e"),  # every last prompt token: the burst's first tokens, together
        ("D", "a", "b", "c", "d", "e"),
        ("D", "a", "b", "c", "d", "e"),
    ]
    assert d.finished == {x: expected(list(range(8)), 3) for x in "abcde"}


def test_a_burst_after_a_lone_first_prompt_stays_in_step():
    """The first prompt, prefilled alone, has its first token before its companions: it sits out
    their first decode, so all of them finish in the same step (in a closed loop, their clients'
    next prompts then come back together, as a burst again, not one alone a step early)."""
    d = Driver(64, page_size=4, max_batch=8, max_prefill_tokens=16, mixed_tokens=4, packed_rows=2)
    d.add("a", list(range(8)), max_tokens=3)
    d.step()  # a alone: its whole prompt, and its first token
    d.add("b", list(range(8)), max_tokens=3)
    d.add("c", list(range(8)), max_tokens=3)
    assert d.run() == [
        ("P", "a", 0, 8),
        ("P", "b", 0, 7, "c", 0, 7),  # before a decodes: a's burst
        ("D", "b", "c"),  # their first tokens; a waits
        ("D", "a", "b", "c"),
        ("D", "a", "b", "c"),  # the last token of all three
    ]
    assert d.finished == {x: expected(list(range(8)), 3) for x in "abc"}


@pytest.mark.parametrize("late", [True, False], ids=["arrived-after-a-decode", "more-than-burst-steps"])
def test_other_prompts_are_prefilled_beside_the_decode_rows(late):
    d = Driver(64, page_size=4, max_batch=8, max_prefill_tokens=8, mixed_tokens=4, packed_rows=2)
    a = d.add("a", list(range(8)), max_tokens=3)
    if not late:  # more than BURST_STEPS chunks of 8 after the first step: a would wait too long
        b = d.add("b", list(range(8 * scheduler.BURST_STEPS + 2)), max_tokens=1)
    d.step()  # a parked beside b's first token, or (late) a alone
    if late:  # a has decoded once
        assert d.step() == Decode([a])
        b = d.add("b", list(range(8)), max_tokens=1)
    assert d.step() == Mixed(Decode([a]), Prefill((Chunk(b, 0 if late else 1, 4),)))


def test_the_oldest_prompt_gets_the_chunk_of_every_mixed_step():
    d = Driver(32, page_size=4, max_batch=4, max_prefill_tokens=16, mixed_tokens=4)
    d.add("a", [1], max_tokens=6)
    d.step()
    d.add("b", list(range(10)), max_tokens=1)
    d.add("c", list(range(6)), max_tokens=1)
    d.run()
    chunks = [t[-1] for t in d.trace if t[0] == "M"]
    assert chunks == ["b", "b", "b", "c", "c"]  # b to the end first (10 = 4 + 4 + 2), then c (4 + 2)
    assert d.finished == {"a": expected([1], 6), "b": [10], "c": [6]}


# ---- packed prefill chunks ----


def test_short_prompts_that_arrive_together_are_prefilled_in_one_step():
    d = Driver(32, page_size=4, max_batch=8, max_prefill_tokens=16, packed_rows=3)
    for name, n in [("a", 5), ("b", 3), ("c", 6), ("d", 2)]:
        d.add(name, list(range(n)), max_tokens=2)
    d.step()
    # a, b and c fill 14 of the 16 tokens; d waits: three prompts at most in a chunk
    assert d.trace == [("P", "a", 0, 5, "b", 0, 3, "c", 0, 6)]
    d.run()
    assert d.trace[1] == ("D", "a", "b", "c") and d.trace[2] == ("P", "d", 0, 2)
    assert d.finished == {x: expected(list(range(n)), 2) for x, n in [("a", 5), ("b", 3), ("c", 6), ("d", 2)]}


def test_the_budget_left_by_the_oldest_prompt_goes_to_the_next_one_cut_to_fit():
    d = Driver(32, page_size=4, max_batch=8, max_prefill_tokens=16, packed_rows=4)
    d.add("a", list(range(10)), max_tokens=1)
    d.add("b", list(range(20)), max_tokens=1)
    d.run()
    assert d.trace[:2] == [("P", "a", 0, 10, "b", 0, 6), ("P", "b", 6, 14)]
    assert d.finished == {"a": [10], "b": [20]}


POWERS = (16, 64, 128, 256, 512)
STEPPED = (16, 32, 48, 64, 80, 96, 112, 128, 256, 512)  # the default bucket set (graph/buckets.py)


@pytest.mark.parametrize(
    ("lengths", "chunk_sizes", "first_chunks"),
    [
        ([134], POWERS, [("a", 0, 128)]),  # 128 + 6 costs less than padding 134 up to 256
        ([200], POWERS, [("a", 0, 200)]),  # 128 + 72 would cost as much as 256, and one step more
        ([100, 34], POWERS, [("a", 0, 100), ("b", 0, 28)]),  # the cut falls in the last prompt packed
        ([120], POWERS, [("a", 0, 120)]),  # within a compiled length: nothing to cut
        ([68], POWERS, [("a", 0, 64)]),  # 64 + 4 costs less than padding 68 up to 128
        ([68], STEPPED, [("a", 0, 68)]),  # with a bucket of 80: one step
        ([200], STEPPED, [("a", 0, 128)]),  # 128 + 72 (in 80) costs less than 256
    ],
)
def test_a_chunk_just_past_a_compiled_length_is_cut_there_instead_of_padded(lengths, chunk_sizes, first_chunks):
    d = Driver(64, page_size=16, max_batch=4, max_prefill_tokens=512, packed_rows=4, chunk_sizes=chunk_sizes)
    for name, n in zip("ab", lengths, strict=False):
        d.add(name, list(range(n)), max_tokens=2)
    d.step()
    assert d.trace[0] == ("P", *(x for chunk in first_chunks for x in chunk))
    d.run()
    assert d.finished == {x: expected(list(range(n)), 2) for x, n in zip("ab", lengths, strict=False)}


def test_mixed_steps_pack_prompts_beside_the_decode_rows():
    d = Driver(32, page_size=4, max_batch=8, max_prefill_tokens=16, mixed_tokens=8, packed_rows=4)
    d.add("a", [1], max_tokens=4)
    d.step()
    d.add("b", [1, 2, 3], max_tokens=1)
    d.add("c", [4, 5, 6], max_tokens=1)
    d.step()
    assert d.trace[-1] == ("M", "a", "+", "b", "c")
    assert d.run()[-1] == ("D", "a")


def test_a_prompt_with_a_long_context_is_not_packed_with_others():
    """A packed chunk's row holds every prompt's pages: a long context (here a cached prefix)
    would make every token's attention longer, so that prompt goes alone."""
    d = Driver(32, page_size=4, max_batch=8, max_prefill_tokens=8, packed_rows=4, caching=True)
    d.add("warm", list(range(40)), max_tokens=1)
    d.run()
    d.trace.clear()
    d.add("long", [*range(40), 98, 99], max_tokens=1)  # 40 cached tokens: 11 pages of context for 2 new ones
    d.add("short", [7, 8], max_tokens=1)
    d.run()
    assert d.trace[:2] == [("P", "long", 40, 2), ("P", "short", 0, 2)]


# ---- prefix caching ----


def test_a_cached_prefix_is_reused_and_only_the_rest_is_prefilled():
    d = Driver(16, page_size=4, max_batch=4, max_prefill_tokens=16, caching=True)
    system = list(range(40, 50))  # 10 tokens: 2 full pages
    d.add("a", [*system, 1], max_tokens=2)
    d.run()
    assert d.allocator.num_cached == 3  # a's 3 full pages (11 prompt + 1 fed output token = 12)
    b = d.add("b", [*system, 2, 3], max_tokens=2)
    d.run()
    assert d.trace[-2:] == [("P", "b", 8, 4), ("D", "b")]  # 2 pages reused, 4 tokens fed
    assert b.cached == 8 and d.scheduler.cached_tokens == 8 and d.scheduler.prompt_tokens == 11 + 12
    assert d.finished["b"] == expected([3], 2)
    d.allocator.check([])
    assert d.allocator.num_free == 16  # cached pages count as free


def test_an_identical_prompt_feeds_only_its_last_token():
    d = Driver(16, page_size=4, max_batch=4, max_prefill_tokens=16, caching=True)
    d.add("a", list(range(8)), max_tokens=1)
    d.add("b", list(range(8)), max_tokens=3)
    d.run()
    assert d.trace == [("P", "a", 0, 8), ("P", "b", 0, 8), ("D", "b"), ("D", "b")]  # admitted together
    c = d.add("c", list(range(8)), max_tokens=1)
    d.run()
    assert c.cached == 4 and d.trace[-1] == ("P", "c", 4, 4)  # the second page holds the token to feed
    assert d.finished["c"] == [8]


def test_prompt_logprobs_requests_are_prefilled_in_full_but_still_fill_the_cache():
    d = Driver(16, page_size=4, max_batch=4, max_prefill_tokens=16, caching=True)
    d.add("a", list(range(9)), max_tokens=1)
    d.run()
    d.add("b", list(range(9)), max_tokens=1, prompt_logprobs=1)
    d.run()
    assert d.trace[-1] == ("P", "b", 0, 9)
    d.add("c", list(range(9)), max_tokens=1)
    d.run()
    assert d.trace[-1] == ("D", "c")  # 8 tokens cached: its last token goes straight into a decode step


def test_cached_pages_are_evicted_least_recently_used_first_only_when_pages_run_out():
    d = Driver(4, page_size=4, max_batch=4, max_prefill_tokens=16, caching=True)
    d.add("a", list(range(10, 15)), max_tokens=1)  # 1 full page cached
    d.run()
    d.add("b", list(range(20, 25)), max_tokens=1)  # 1 more
    d.run()
    assert d.allocator.num_cached == 2
    d.add("a2", list(range(10, 15)), max_tokens=1)  # uses a's page again: b's is now the oldest
    d.run()
    assert d.trace[-1] == ("D", "a2")
    d.add("big", list(range(50, 61)), max_tokens=1)  # 3 pages of 4 free: evicts exactly one (b's)
    d.run()
    d.add("a3", list(range(10, 15)), max_tokens=1)
    d.run()
    d.add("b2", list(range(20, 25)), max_tokens=1)
    d.run()
    assert d.trace[-3:] == [
        ("P", "big", 0, 11),
        ("D", "a3"),  # a's page survived
        ("P", "b2", 0, 5),  # b's was evicted
    ]


def test_a_preempted_sequence_finds_its_filled_pages_in_the_cache():
    d = Driver(5, page_size=2, max_batch=4, max_prefill_tokens=8, caching=True)
    a = d.add("a", [10, 11, 12], max_tokens=5)  # 8 tokens: 4 pages
    b = d.add("b", [50, 51, 52], max_tokens=3)
    assert d.run() == [
        ("P", "a", 0, 3),
        ("D", "a"),
        ("P", "b", 0, 3),
        ("D", "a", "b"),
        ("D", "a"),  # b needed a third page: preempted, its 2 full pages went to the cache
        ("D", "a"),  # a's fourth page evicted b's tail page (freed last-page-first), not its head
        ("P", "b", 2, 3),  # b comes back with its first page from the cache
    ]
    assert (a.preemptions, b.preemptions) == (0, 1)
    assert d.finished == {"a": expected([12], 5), "b": expected([52], 3)}


@pytest.mark.parametrize(("mixed_tokens", "packed_rows"), [(0, 1), (4, 1), (0, 3), (4, 3)])
def test_random_shared_prefix_workload_keeps_exact_reference_counts(mixed_tokens, packed_rows):
    """300 requests sharing prefixes, random aborts, preemptions: the allocator's invariants hold
    after every step (`check_pages`), every answer is right, and at the end every page is free or
    held by the cache alone."""
    rng = random.Random(7 + mixed_tokens)
    usable = 30
    d = Driver(
        usable, page_size=4, max_batch=6, max_prefill_tokens=8, mixed_tokens=mixed_tokens, caching=True,
        packed_rows=packed_rows,
    )  # fmt: skip
    prefixes = [[rng.randrange(100) for _ in range(rng.randint(4, 24))] for _ in range(5)]
    seqs: dict[str, Sequence] = {}
    aborted: set[str] = set()
    while len(seqs) < 300 or d.scheduler.num_unfinished:
        if len(seqs) < 300 and rng.random() < 0.4:
            name = f"r{len(seqs)}"
            prompt = rng.choice(prefixes) + [rng.randrange(100) for _ in range(rng.randint(0, 12))]
            seqs[name] = d.add(name, prompt, max_tokens=rng.randint(1, 30))
        live = [n for n, s in seqs.items() if n not in d.finished and n not in aborted]
        if live and rng.random() < 0.02:
            name = rng.choice(live)
            d.scheduler.remove(seqs[name])
            aborted.add(name)
        if d.scheduler.num_unfinished:
            assert d.step() is not None
    assert sum(s.preemptions for s in seqs.values()) > 5, "the workload should exercise preemption"
    assert d.scheduler.cached_tokens > 0.2 * d.scheduler.prompt_tokens, "and prefix reuse"
    assert set(d.finished) | aborted == set(seqs)
    for name, out in d.finished.items():
        assert out == expected(seqs[name].prompt, seqs[name].params.max_tokens), name
    d.allocator.check([])
    assert d.allocator.num_used == 0 and d.allocator.num_free == usable and d.allocator.num_cached > 0
    assert d.allocator.reset_cache() == usable and d.allocator.num_cached == 0
