"""Mixed steps, packed prefill and prefix caching through the real engine: a request's tokens do
not depend on whether it ran alone, in mixed steps beside other prompts' chunks, packed in one
chunk with other prompts, or with its prefix taken from the prefix cache; on the bundled SmolLM2
and on a tiny random Gemma 3, whose sliding-window layers must find valid keys in cached pages
too."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

import pytest

from graph.api import EngineConfig, SamplingParams
from graph.offline import LLM
from models.config import ModelConfig
from models.params import init_params

pytestmark = pytest.mark.slow  # the real models through the engine

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=99, ignore_eos=True)
SYSTEM = list(range(1000, 1070))  # a 70-token shared prefix: 4 full pages of 16
SUFFIXES = [[5, 6, 7], [8], list(range(2000, 2020)), [9, 10]]
PROMPTS = [SYSTEM + s for s in SUFFIXES]


@pytest.fixture(scope="module")
def gemma_llm(smol_model):
    hf = {
        "model_type": "gemma3_text",
        "vocab_size": smol_model.cfg.vocab_size,  # the borrowed tokenizer's ids
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "sliding_window": 24,  # windows end mid-page
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        "max_position_embeddings": 512,
    }
    cfg = ModelConfig.from_hf(hf)
    model = dataclasses.replace(
        smol_model, name="tiny-gemma3", cfg=cfg, params=init_params(cfg, seed=3, scale=0.5), fingerprint="tinygemma3"
    )
    # one prefill bucket: fewer executables to compile
    config = EngineConfig(
        max_batch=4, max_seq_len=256, min_prefill_tokens=64, max_prefill_tokens=64, min_context_tokens=256
    )
    llm = LLM(model, config)
    yield llm
    llm.shutdown()


@pytest.fixture(params=["smollm2", "gemma3-tiny"])
def llm(request, smol_llm, gemma_llm):
    return smol_llm if request.param == "smollm2" else gemma_llm


@pytest.fixture(scope="module")
def alone() -> Callable[[LLM, SamplingParams], list[list[int]]]:
    """Each prompt by itself on an empty prefix cache: no sharing, no mixed step. Computed once per
    engine and sampling parameters, and shared by the tests below that compare with it."""
    done: dict[tuple[int, SamplingParams], list[list[int]]] = {}

    def tokens(llm: LLM, params: SamplingParams) -> list[list[int]]:
        if (id(llm), params) not in done:
            out = []
            for prompt in PROMPTS:
                llm.engine.reset_prefix_cache()
                out.append(llm.generate([prompt], params)[0].token_ids)
            done[id(llm), params] = out
        return done[id(llm), params]

    return tokens


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_prefix_from_the_cache_gives_the_same_tokens(llm, params, alone):
    expected = alone(llm, params)
    engine = llm.engine
    engine.reset_prefix_cache()
    llm.generate([PROMPTS[0]], params)
    before = engine.stats()["prefix_cached_tokens"]
    got = [llm.generate([p], params)[0].token_ids for p in PROMPTS]
    # every request found the 4 full pages of the shared prefix (the first, its whole prompt but
    # the last token's page)
    assert engine.stats()["prefix_cached_tokens"] - before >= len(PROMPTS) * 64
    assert got == expected


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_prompts_prefilled_in_mixed_steps_give_the_same_tokens(llm, params, alone):
    expected = alone(llm, params)
    engine, long = llm.engine, dataclasses.replace(params, max_tokens=48)
    engine.reset_prefix_cache()
    mixed_before = engine.step_kinds["mixed"]

    async def run():
        runner = engine.submit(list(range(3000, 3010)), long)
        first = await runner.__anext__()
        while len(first.token_ids) < 2:  # it has decoded: every prompt below is prefilled beside it (not its burst)
            first.token_ids += (await runner.__anext__()).token_ids
        streams = [engine.submit(p, params) for p in PROMPTS]
        got = []
        for s in streams:
            tokens = []
            async for out in s:
                tokens += out.token_ids
            got.append(tokens)
        async for out in runner:
            first.token_ids += out.token_ids
        return got, len(first.token_ids)

    got, runner_tokens = asyncio.run(run())
    assert runner_tokens == 48
    assert engine.step_kinds["mixed"] - mixed_before >= 2  # the 73+-token prompts take 3 chunks of 32
    assert got == expected


SHORT = [list(range(100 + 20 * i, 110 + 21 * i)) for i in range(4)]  # 10 to 13 tokens, nothing shared


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_short_prompts_that_arrive_together_are_packed_into_one_prefill_with_the_same_tokens(llm, params):
    engine = llm.engine
    expected = []
    for prompt in SHORT:
        engine.reset_prefix_cache()
        expected.append(llm.generate([prompt], params)[0].token_ids)
    engine.reset_prefix_cache()
    prefills = engine.step_kinds["prefill"]
    got = [out.token_ids for out in llm.generate(SHORT, params)]
    assert engine.step_kinds["prefill"] - prefills == 1  # all four in one packed chunk
    assert got == expected
