"""Pipelined steps (the engine dispatches step n+1 before it reads step n) change nothing a client
sees: on the bundled SmolLM2, 16 requests at once, finishing by end token, stop string, stop token
id, max_tokens of 1 and of more, with n > 1 choices (the same prompt several times), stream the same
tokens and text with pipelining on and off; no delta follows a finish, and the token counts add up.
"""

from __future__ import annotations

import dataclasses

import pytest

from graph.api import SamplingParams
from graph.offline import LLM
from tests.concurrent_requests import assert_same_streams, mixed_requests, run_at_once
from tests.server_fixtures import SMALL, TINY


@pytest.fixture(scope="module")
def pipelined(smol_model):
    llm = LLM(smol_model, dataclasses.replace(SMALL, pipeline="on"))  # auto is off on CPU
    yield llm
    llm.shutdown()


def test_pipelined_steps_stream_what_unpipelined_steps_stream(smol_llm, pipelined):
    requests = mixed_requests(pipelined.tokenizer)
    assert len(requests) == 16
    on = run_at_once(pipelined, requests)
    assert pipelined.engine.looked_ahead > 0, "no step was dispatched while another was in flight"
    assert not smol_llm.engine.pipelined
    ahead = smol_llm.engine.looked_ahead
    off = run_at_once(smol_llm, requests)
    assert smol_llm.engine.looked_ahead == ahead
    assert_same_streams(requests, on, off, smol_llm.engine.outputs.eos_ids)
    reasons = [deltas[-1].finish_reason for deltas in on]
    assert reasons[:3] == ["stop"] * 3, "the short answers should end with the end token"
    assert reasons[6:9] == ["length"] * 3 and all(len(on[i][-1].token_ids) <= 1 for i in range(6, 9))
    assert [t for d in on[11] for t in d.token_ids] == [t for d in on[12] for t in d.token_ids]  # n = 2, greedy


@pytest.mark.parametrize("pipeline", ["on", "off"])
def test_a_scoring_request_whose_prompt_is_cached_still_finishes(tiny_model, pipeline):
    """max_tokens 0 (echo-only scoring) on a prompt whose every page but the last token's is in
    the prefix cache: its one pending token is fed (a decode row) and it ends with no token."""
    llm = LLM(tiny_model, dataclasses.replace(TINY, pipeline=pipeline))
    try:
        prompt = list(range(10, 43))  # 2 full pages and 1 token
        first = llm.generate([prompt], SamplingParams(max_tokens=3, temperature=0))[0]
        scored = llm.generate([prompt], SamplingParams(max_tokens=0))[0]
        again = llm.generate([prompt], SamplingParams(max_tokens=3, temperature=0))[0]
        assert (scored.token_ids, scored.finish_reason) == ([], "length")
        assert again.token_ids == first.token_ids and llm.engine.stats()["prefix_cached_tokens"] >= 64
    finally:
        llm.shutdown()
