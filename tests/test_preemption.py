"""Preemption on the tiny random model: a request preempted while its prompt is being prefilled,
or while it decodes, is prefilled again from the start (its output so far included), and its
tokens and prompt logprobs (what `echo` with `logprobs` returns) are those of a run without
preemption; every page is free afterwards."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from graph.api import EngineConfig, RequestOutput, SamplingParams
from graph.offline import LLM
from graph.scheduler import Scheduler

# 16 pages of 16 tokens, page 0 is scratch: 15 usable, and the longest request (208 tokens) fits.
CONFIG = EngineConfig(max_batch=4, max_seq_len=208, max_prefill_tokens=16, min_context_tokens=208, kv_pages=16)
SHORT = [[5, 17, 99, 3, 42, 7, 8, 21, 13, 2], [11, 12, 14, 19, 23, 29, 31, 37, 41, 43]]
LONG = [(i * 7919) % 997 + 1 for i in range(200)]


@pytest.fixture(scope="module")
def alone(tiny_model) -> Iterator[LLM]:
    """An engine that serves one request at a time: the reference, never preempted."""
    llm = LLM(tiny_model, CONFIG)
    yield llm
    llm.shutdown()


def _one_by_one(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> list:
    out = [llm.generate([p], q)[0] for p, q in zip(prompts, params, strict=True)]
    assert llm.engine.scheduler.preemptions == 0
    return out


def _together(model, prompts, params, monkeypatch) -> tuple[list, list[tuple[int, int]], dict]:
    """All at once on a fresh engine: (outputs, (tokens computed, prompt length) of every
    preempted sequence, the engine's stats afterwards)."""
    victims: list[tuple[int, int]] = []
    preempt = Scheduler._preempt

    def spy(self, victim):
        victims.append((victim.computed, len(victim.prompt)))
        preempt(self, victim)

    monkeypatch.setattr(Scheduler, "_preempt", spy)
    llm = LLM(model, CONFIG)
    try:
        return llm.generate(prompts, params), victims, llm.engine.stats()
    finally:
        llm.shutdown()


def _assert_same(got: RequestOutput, want: RequestOutput) -> None:
    assert got.token_ids == want.token_ids
    if want.prompt_logprobs is None:
        return
    assert got.prompt_logprobs is not None and got.prompt_logprobs[0] is None
    assert len(got.prompt_logprobs) == len(want.prompt_logprobs)
    for ours, theirs in zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:], strict=True):
        assert ours.token_id == theirs.token_id
        assert [t for t, _ in ours.top] == [t for t, _ in theirs.top]
        np.testing.assert_allclose(ours.logprob, theirs.logprob, atol=1e-5)


def test_a_prompt_preempted_during_its_prefill_gets_the_same_tokens_and_prompt_logprobs(tiny_model, alone, monkeypatch):
    # Two short prompts that decode past their first page, and a long one prefilled 16 tokens a
    # step: 1 + 1 + 13 pages fill the 15 usable pages, so the first new page a decode needs
    # preempts the youngest request, the long prompt, while it is still being prefilled.
    prompts = [*SHORT, LONG]
    params = [
        SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=0.8, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=8, temperature=0.8, seed=5, ignore_eos=True, prompt_logprobs=2),
    ]
    reference = _one_by_one(alone, prompts, params)
    got, victims, stats = _together(tiny_model, prompts, params, monkeypatch)
    assert any(0 < done < length for done, length in victims), f"no preemption during a prefill: {victims}"
    for ours, theirs in zip(got, reference, strict=True):
        _assert_same(ours, theirs)
    assert stats["pages_used"] == 0 and stats["preemptions"] == len(victims), stats


def test_requests_preempted_while_decoding_get_the_same_tokens_and_prompt_logprobs(tiny_model, alone, monkeypatch):
    # Six requests of 10-12 + 56 tokens need 5 pages each: the first four admitted need 20, the
    # pool holds 15
    prompts = [*SHORT, SHORT[0][::-1], SHORT[1][::-1], [3] * 12, [7, 8] * 6]
    params = [
        SamplingParams(max_tokens=56, temperature=0.0 if i % 2 else 0.9, seed=i, ignore_eos=True, prompt_logprobs=1)
        for i in range(len(prompts))
    ]
    reference = _one_by_one(alone, prompts, params)
    got, victims, stats = _together(tiny_model, prompts, params, monkeypatch)
    assert any(done >= length for done, length in victims), f"no preemption while decoding: {victims}"
    for ours, theirs in zip(got, reference, strict=True):
        _assert_same(ours, theirs)
    assert stats["pages_used"] == 0 and stats["preemptions"] == len(victims), stats
