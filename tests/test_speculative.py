"""Speculative decoding by prompt lookup (graph/speculative.py): drafts are looked up where the
last tokens occurred before, and a speculative step's kept tokens are exactly the tokens the
sequence would have drawn one step at a time. On the bundled SmolLM2: the same tokens, text,
finish reasons and logprobs with speculation on as off, greedy and seeded, through end tokens,
stop strings, max_tokens and n > 1; with drafts really kept, in fewer steps.
"""

from __future__ import annotations

import dataclasses

import pytest

from graph.api import EngineConfig, SamplingParams
from graph.buckets import Buckets
from graph.kv_cache import PageAllocator
from graph.offline import LLM
from graph.scheduler import Decode, Prefill, Scheduler, Sequence
from graph.speculative import accepted, propose
from tests.concurrent_requests import assert_same_streams, mixed_requests, run_at_once
from tests.server_fixtures import SMALL


def test_a_draft_copies_what_followed_the_latest_occurrence_of_the_longest_ngram():
    assert propose([5, 6, 7, 8, 9, 5, 6, 7], 3, 1, 4) == [8, 9, 5]
    # the 2-gram (1, 2) occurred at 0 and 4; the latest wins
    assert propose([1, 2, 3, 0, 1, 2, 4, 0, 1, 2], 2, 1, 2) == [4, 0]
    # a loop goes on through the draft itself, past its own period
    assert propose([1, 2, 3, 1, 2, 3], 5, 1, 4) == [1, 2, 3, 1, 2]
    assert propose([7, 2, 2, 2, 2], 4, 1, 4) == [2, 2, 2, 2]
    assert propose([1, 2, 3, 4], 3, 1, 4) == []  # nothing repeats
    assert propose([1, 2, 3, 9, 3], 3, 2, 4) == []  # only a 1-gram repeats: under the minimum


def test_drafts_stand_while_each_matches_the_sample_before_it():
    assert accepted([8, 9, 1, 4], [8, 9, 5]) == 2
    assert accepted([3, 9, 5, 4], [8, 9, 5]) == 0
    assert accepted([8, 9, 5, 4], [8, 9, 5]) == 3


def _scheduler(num_pages: int, **kw) -> Scheduler:
    defaults = dict(page_size=4, max_batch=4, max_prefill_tokens=64, speculative_tokens=4, speculative_max_batch=2)
    return Scheduler(PageAllocator(num_pages, caching=False), **{**defaults, **kw})


def _decoding(s: Scheduler, prompt: list[int], n: int = 1, **params) -> Sequence:
    """`n` sequences of `prompt`, prefilled, each with one output token (prompt[-3]): decoding."""
    seqs = [Sequence(f"r{i}", prompt, SamplingParams(temperature=0, **params), seed=0) for i in range(n)]
    for seq in seqs:
        s.add(seq)
    while any(seq.pending > 1 for seq in seqs):
        step = s.schedule()
        assert isinstance(step, Prefill)
        for c in step.chunks:
            s.advance(c.seq, c.length)
    for seq in seqs:
        seq.output.append(prompt[-3])
    return seqs[0]


def test_the_scheduler_drafts_within_max_tokens_and_free_pages_and_never_for_what_needs_each_token():
    s = _scheduler(num_pages=64)
    seq = _decoding(s, [1, 2, 3, 1, 2, 3, 1, 2], max_tokens=20)  # pages: 3 (9 tokens)
    step = s.schedule()
    assert isinstance(step, Decode) and step.drafts == ((1, 2, 3, 1),)  # tokens 1 2 3 1 2 3 1 2 | 3
    assert len(seq.pages) == s.pages_for(seq.computed + 1 + 4)  # pages for the drafts' positions
    seq.params = dataclasses.replace(seq.params, max_tokens=3)  # 1 out + s0 + 1 draft's sample
    assert s.schedule().drafts == ((1,),)
    seq.params = dataclasses.replace(seq.params, max_tokens=20, min_tokens=4)  # samples 1-2 end-suppressed, not 3
    assert s.schedule().drafts == ((1, 2),)
    for rule in (dict(presence_penalty=0.5), dict(min_tokens=2), dict(max_tokens=2)):
        seq.params = dataclasses.replace(SamplingParams(temperature=0), **rule)
        assert s.schedule().drafts == (), rule
    # a batch over speculative_max_batch is not speculated
    s = _scheduler(num_pages=64, speculative_max_batch=1)
    _decoding(s, [1, 2, 3, 1, 2, 3, 1, 2], n=2, max_tokens=20)
    assert s.schedule().drafts == ()
    # drafts take free pages only, and are cut to the pages they got
    s = _scheduler(num_pages=4)  # 3 usable pages (page 0 is scratch)
    seq = _decoding(s, [1, 2, 3, 1, 2, 3, 1, 2, 3, 1], max_tokens=20)  # 10 + 1 (a 2) tokens: all 3 pages
    assert s.allocator.num_free == 0
    assert s.schedule().drafts == ((3,),) and not s.preemptions  # position 11 is the last of page 3


def test_a_sequence_whose_drafts_keep_failing_drafts_less_often():
    s = _scheduler(num_pages=64)
    seq = _decoding(s, [1, 2, 3, 1, 2, 3, 1, 2], max_tokens=100)
    pattern = []
    for kept in (0, 0, 0, 2):
        while not s.schedule().drafts:
            pattern.append(0)
        pattern.append(1)
        seq.drafted(kept)
    # misses pause it 1, 3, then 7 steps; a kept draft ends the pause at once
    assert pattern == [1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1]
    assert s.schedule().drafts


@pytest.fixture(scope="module")
def speculating(smol_model):
    llm = LLM(smol_model, dataclasses.replace(SMALL, num_speculative_tokens=4, speculative_max_batch=SMALL.max_batch))
    yield llm
    llm.shutdown()


def test_speculative_steps_stream_what_one_token_steps_stream(smol_llm, speculating):
    base = mixed_requests(speculating.tokenizer)
    loop = speculating.tokenizer.encode(" game" * 40)  # greedy output goes on looping: drafts stand
    extra = [
        (base[3][0], SamplingParams(max_tokens=24, temperature=0, logprobs=2)),
        (base[3][0], SamplingParams(max_tokens=24, temperature=0.7, seed=5, logprobs=1)),
        (loop, SamplingParams(max_tokens=24, temperature=0, logprobs=1)),
        (loop, SamplingParams(max_tokens=24, temperature=0.5, seed=3)),
    ]
    text = smol_llm.generate([loop], SamplingParams(max_tokens=24, temperature=0))[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]  # a stop string the greedy text reaches mid-way
    extra.append((loop, SamplingParams(max_tokens=24, temperature=0, stop=[stop])))
    # at once: which steps speculate depends on how the batch forms; each alone: every decode step does
    on = run_at_once(speculating, base)
    off = run_at_once(smol_llm, base)
    assert_same_streams(base, on, off, smol_llm.engine.outputs.eos_ids)
    before = speculating.engine.stats()
    on = [run_at_once(speculating, [r])[0] for r in extra]
    off = [run_at_once(smol_llm, [r])[0] for r in extra]
    assert_same_streams(extra, on, off, smol_llm.engine.outputs.eos_ids)
    stats = speculating.engine.stats()
    kept = stats["spec_accepted_tokens"] - before["spec_accepted_tokens"]
    drafted = stats["spec_draft_tokens"] - before["spec_draft_tokens"]
    assert 0 < kept < drafted, "drafts should be both kept (the loop) and rejected (the story)"
    for counter in ("steps_by_kind", "step_seconds_by_kind"):  # the steps that kept drafts were counted as such
        assert stats[counter]["speculative"] > before[counter].get("speculative", 0), counter
    # several tokens came in one delta: fewer deltas than tokens
    assert sum(len(d) for d in on) < sum(len(d) for d in off)


def test_speculative_buckets_and_their_identity():
    config = EngineConfig(max_batch=16, num_speculative_tokens=3, speculative_max_batch=3)
    b = Buckets.from_config(config)
    assert (b.verify_tokens, b.verify_batch) == (4, (1, 2, 4))
    assert b.verify_keys() == [("decode", n, 4, p) for n in (1, 2, 4) for p in b.context_pages]
    assert set(b.verify_keys()) <= set(b.all_keys())
    assert Buckets.from_config(EngineConfig()).verify_keys() == []
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineConfig(num_speculative_tokens=99)
