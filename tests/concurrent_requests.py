"""Sixteen SmolLM2 requests submitted at once, finishing every way a request can (end token, stop
string, max_tokens of 1 and of more, n > 1 greedy and seeded), and the check that two engines
stream the same thing for them: what tests of engine options that must not change outputs
(pipelining, speculative decoding) hold one engine to against another."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from graph.api import RequestOutput, SamplingParams
from graph.offline import LLM

QUESTIONS = [
    "What is the capital of France? Answer in one word.",
    "Say hello.",
    "Name a color.",
    "Write a long story about a dragon who learns to bake bread.",
    "List the planets of the solar system.",
    "Explain what a compiler does, in detail.",
]


def mixed_requests(tokenizer) -> list[tuple[list[int], SamplingParams]]:
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


def run_at_once(llm: LLM, requests) -> list[list[RequestOutput]]:
    async def collect(stream) -> list[RequestOutput]:
        return [out async for out in stream]

    async def all_at_once():
        streams = [llm.engine.submit(ids, params) for ids, params in requests]
        return await asyncio.gather(*(collect(s) for s in streams))

    return list(asyncio.run(all_at_once()))


def assert_same_streams(requests, got: list[list[RequestOutput]], reference: list[list[RequestOutput]], eos) -> None:
    """Each request streamed the same tokens, text, finish reason (and logprobs, to 1e-3) as in
    `reference`; no delta follows a finish, and the token counts add up."""
    for (_, params), deltas, ref in zip(requests, got, reference, strict=True):
        assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1), "a delta after a finish"
        tokens = [t for d in deltas for t in d.token_ids]
        assert tokens == [t for d in ref for t in d.token_ids]
        text = "".join(d.text for d in deltas)
        assert text == "".join(d.text for d in ref)
        assert deltas[-1].finish_reason == ref[-1].finish_reason
        assert deltas[-1].completion_tokens == len(tokens) <= params.max_tokens
        if not params.ignore_eos:  # an end token is the last token (not shown as text)
            assert not eos & set(tokens[:-1])
        if params.stop:
            assert deltas[-1].finish_reason == "stop" and params.stop[0] not in text, text
        if params.logprobs is not None:
            entries, want = [e for d in deltas for e in d.logprobs], [e for d in ref for e in d.logprobs]
            assert [e.token_id for e in entries] == tokens and len(entries) == len(want)
            for e, w in zip(entries, want, strict=True):
                assert e.logprob == pytest.approx(w.logprob, abs=1e-3)
                assert [i for i, _ in e.top] == [i for i, _ in w.top]
