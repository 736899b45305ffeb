"""Preemption in the middle of a prompt's prefill, on the tiny random model: the preempted request
is prefilled again from the start, and its tokens and prompt logprobs (what `echo` with `logprobs`
returns) are those of a run without preemption."""

from __future__ import annotations

import numpy as np

from graph.api import EngineConfig, SamplingParams
from graph.offline import LLM
from graph.scheduler import Scheduler

# Two short prompts that decode past their first page, and a long one prefilled 16 tokens a step:
# 1 + 1 + 13 pages fill the 15 usable pages, so the first new page a decode needs preempts the
# youngest request, the long prompt, while it is still being prefilled.
SHORT = [[5, 17, 99, 3, 42, 7, 8, 21, 13, 2], [11, 12, 14, 19, 23, 29, 31, 37, 41, 43]]
LONG = [(i * 7919) % 997 + 1 for i in range(200)]
CONFIG = EngineConfig(max_batch=4, max_seq_len=208, max_prefill_tokens=16, min_context_tokens=208, kv_pages=16)
PARAMS = [
    SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
    SamplingParams(max_tokens=24, temperature=0.8, seed=3, ignore_eos=True),
    SamplingParams(max_tokens=8, temperature=0.8, seed=5, ignore_eos=True, prompt_logprobs=2),
]


def test_a_prompt_preempted_during_its_prefill_gets_the_same_tokens_and_prompt_logprobs(tiny_model, monkeypatch):
    alone = LLM(tiny_model, CONFIG)
    try:
        reference = alone.generate([LONG], PARAMS[2])[0]
        assert alone.engine.scheduler.preemptions == 0
    finally:
        alone.shutdown()

    victims: list[tuple[int, int]] = []  # (prompt tokens already prefilled, prompt length) per preemption
    preempt = Scheduler._preempt

    def spy(self, victim):
        victims.append((victim.computed, len(victim.prompt)))
        preempt(self, victim)

    monkeypatch.setattr(Scheduler, "_preempt", spy)
    llm = LLM(tiny_model, CONFIG)
    try:
        out = llm.generate([*SHORT, LONG], PARAMS)
        stats = llm.engine.stats()
    finally:
        llm.shutdown()
    assert any(0 < done < length for done, length in victims), f"no preemption during a prefill: {victims}"

    got = out[2]
    assert got.token_ids == reference.token_ids
    assert got.prompt_logprobs is not None and got.prompt_logprobs[0] is None
    assert len(got.prompt_logprobs) == len(LONG)
    for ours, theirs in zip(got.prompt_logprobs[1:], reference.prompt_logprobs[1:], strict=True):
        assert ours.token_id == theirs.token_id
        assert [t for t, _ in ours.top] == [t for t, _ in theirs.top]
        np.testing.assert_allclose(ours.logprob, theirs.logprob, atol=1e-5)
    assert stats["pages_used"] == 0, stats
