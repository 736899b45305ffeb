"""Pipelined steps (the engine dispatches step n+1 before it reads step n) change nothing a client
sees: on the bundled SmolLM2, 16 requests at once, finishing by end token, stop string, stop token
id, max_tokens of 1 and of more, with n > 1 choices (the same prompt several times), stream the same
tokens and text with pipelining on and off; no delta follows a finish, and the token counts add up.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from graph.api import EngineConfig, RequestOutput, SamplingParams
from graph.offline import LLM
from tests.server_fixtures import SMALL

QUESTIONS = [
    "What is the capital of France? Answer in one word.",
    "Say hello.",
    "Name a color.",
    "Write a long story about a dragon who learns to bake bread.",
    "List the planets of the solar system.",
    "Explain what a compiler does, in detail.",
]


def _requests(tokenizer) -> list[tuple[list[int], SamplingParams]]:
    chat = [tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    greedy = SamplingParams(max_tokens=48, temperature=0)
    return [
        *((ids, greedy) for ids in chat[:3]),  # short answers: the end token finishes them
        (chat[3], dataclasses.replace(greedy, stop=["."])),  # a stop string, mid-text
        (chat[4], dataclasses.replace(greedy, stop=["\n"])),
        (chat[5], dataclasses.replace(greedy, stop=[" a "])),
        *((ids, dataclasses.replace(greedy, max_tokens=1)) for ids in chat[:3]),
        (chat[3], dataclasses.replace(greedy, ignore_eos=True)),  # max_tokens
        (chat[5], dataclasses.replace(greedy, max_tokens=7, ignore_eos=True)),
        *((chat[4], greedy) for _ in range(2)),  # n = 2, greedy
        # n = 3, sampled: one seed per choice, as serving gives them
        *((chat[3], SamplingParams(max_tokens=24, temperature=0.8, seed=s)) for s in (11, 12, 13)),
    ]


def _run(llm: LLM, requests) -> list[list[RequestOutput]]:
    async def collect(stream) -> list[RequestOutput]:
        return [out async for out in stream]

    async def all_at_once():
        streams = [llm.engine.submit(ids, params) for ids, params in requests]
        return await asyncio.gather(*(collect(s) for s in streams))

    return list(asyncio.run(all_at_once()))


@pytest.fixture(scope="module")
def pipelined(smol_model):
    llm = LLM(smol_model, dataclasses.replace(SMALL, pipeline="on"))  # auto is off on CPU
    yield llm
    llm.shutdown()


def test_pipelined_steps_stream_what_unpipelined_steps_stream(smol_llm, pipelined):
    requests = _requests(pipelined.tokenizer)
    assert len(requests) == 16
    on = _run(pipelined, requests)
    assert pipelined.engine.looked_ahead > 0, "no step was dispatched while another was in flight"
    assert not smol_llm.engine.pipelined
    ahead = smol_llm.engine.looked_ahead
    off = _run(smol_llm, requests)
    assert smol_llm.engine.looked_ahead == ahead
    eos = smol_llm.engine.outputs.eos_ids
    for (_, params), deltas, reference in zip(requests, on, off, strict=True):
        assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1), "a delta after a finish"
        tokens = [t for d in deltas for t in d.token_ids]
        assert tokens == [t for d in reference for t in d.token_ids]
        assert "".join(d.text for d in deltas) == "".join(d.text for d in reference)
        assert deltas[-1].finish_reason == reference[-1].finish_reason
        assert deltas[-1].completion_tokens == len(tokens) <= params.max_tokens
        if not params.ignore_eos:  # an end token is the last token (not shown as text)
            assert not eos & set(tokens[:-1])
        text = "".join(d.text for d in deltas)
        if params.stop:
            assert deltas[-1].finish_reason == "stop" and params.stop[0] not in text, text
    reasons = [deltas[-1].finish_reason for deltas in on]
    assert reasons[:3] == ["stop"] * 3, "the short answers should end with the end token"
    assert reasons[6:9] == ["length"] * 3 and all(len(on[i][-1].token_ids) <= 1 for i in range(6, 9))
    assert [t for d in on[11] for t in d.token_ids] == [t for d in on[12] for t in d.token_ids]  # n = 2, greedy


@pytest.mark.parametrize("pipeline", ["on", "off"])
def test_a_scoring_request_whose_prompt_is_cached_still_finishes(tiny_model, pipeline):
    """max_tokens 0 (echo-only scoring) on a prompt whose every page but the last token's is in
    the prefix cache: its one pending token is fed (a decode row) and it ends with no token."""
    config = EngineConfig(max_batch=4, max_seq_len=128, max_prefill_tokens=32, pipeline=pipeline)
    llm = LLM(tiny_model, config)
    try:
        prompt = list(range(10, 43))  # 2 full pages and 1 token
        first = llm.generate([prompt], SamplingParams(max_tokens=3, temperature=0))[0]
        scored = llm.generate([prompt], SamplingParams(max_tokens=0))[0]
        again = llm.generate([prompt], SamplingParams(max_tokens=3, temperature=0))[0]
        assert (scored.token_ids, scored.finish_reason) == ([], "length")
        assert again.token_ids == first.token_ids and llm.engine.stats()["prefix_cached_tokens"] >= 64
    finally:
        llm.shutdown()
