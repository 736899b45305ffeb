"""The compiled engine on the real bundled model: parity with transformers through the whole
engine, batch independence, zero compilations while serving, page accounting (preemption:
tests/test_preemption.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time

import jax
import numpy as np
import pytest

from graph.api import SamplingParams
from graph.offline import LLM
from tests.hf_reference import one_torch_thread
from tests.server_fixtures import SMALL, TINY

torch = pytest.importorskip("torch")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "1, 2, 3, 5, 8, 13,",
    "Photosynthesis is the process by which",
    "The best way to learn a language is",
    "Q: What is 12 times 12?\nA:",
    "In 1969, astronauts",
]
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)


class CompileCounter:
    """Counts XLA compilations (jax.monitoring's backend-compile events) while active."""

    def __init__(self):
        self.count = 0
        self.active = False
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if self.active and "backend_compile" in event:
            self.count += 1


@pytest.fixture(scope="module")
def compiles():
    return CompileCounter()


def test_greedy_matches_transformers_64_tokens(smol_llm, smol_hf):
    prompts = PROMPTS[:3]
    # min_tokens, like transformers' min_new_tokens, keeps end tokens from being chosen
    ours = smol_llm.generate(prompts, SamplingParams(max_tokens=64, temperature=0, min_tokens=64))
    for prompt, c in zip(prompts, ours, strict=True):
        ids = torch.tensor([c.prompt_token_ids])
        with one_torch_thread():
            ref = smol_hf.generate(ids, do_sample=False, max_new_tokens=64, min_new_tokens=64)[0, ids.shape[1] :]
        assert c.token_ids == ref.tolist(), prompt


@pytest.fixture(scope="module")
def smol_int8(smol_model):
    llm = LLM(smol_model, dataclasses.replace(SMALL, quantize="int8"))
    yield llm
    llm.shutdown()


@pytest.mark.parametrize(
    "path, params", [("float32", GREEDY), ("float32", SEEDED), ("int8", GREEDY)], ids=["greedy", "seeded", "int8"]
)
def test_output_does_not_depend_on_the_batch(request, path, params):
    """int8 too: its activations' rounding turns a 1-ulp difference anywhere into other text."""
    llm = request.getfixturevalue("smol_llm" if path == "float32" else "smol_int8")
    alone = [llm.generate([p], params)[0].token_ids for p in PROMPTS]
    together = [c.token_ids for c in llm.generate(PROMPTS, params)]
    assert together == alone

    async def join_mid_flight():
        engine, tok = llm.engine, llm.tokenizer
        got: dict[int, list[int]] = {i: [] for i in range(len(PROMPTS))}

        async def collect(i, stream):
            async for out in stream:
                got[i] += out.token_ids

        first = [engine.submit(tok.encode(p), params) for p in PROMPTS[:4]]
        tasks = [asyncio.create_task(collect(i, s)) for i, s in enumerate(first)]
        while not all(len(got[i]) >= 3 for i in range(4)):  # the first four are decoding
            await asyncio.sleep(0.01)
        late = [engine.submit(tok.encode(p), params) for p in PROMPTS[4:]]
        tasks += [asyncio.create_task(collect(4 + i, s)) for i, s in enumerate(late)]
        await asyncio.gather(*tasks)
        return [got[i] for i in range(len(PROMPTS))]

    assert asyncio.run(join_mid_flight()) == alone


def test_mixed_workload_compiles_nothing(smol_llm, compiles):
    smol_llm.generate(["warm up"], GREEDY)
    compiles.active = True
    try:
        rng = random.Random(0)
        prompts = [" ".join(["word"] * rng.randint(1, 200)) for _ in range(10)]
        params = [
            SamplingParams(
                max_tokens=rng.randint(1, 40),
                temperature=rng.choice([0.0, 0.7, 1.3]),
                top_k=rng.choice([0, 5]),
                top_p=rng.choice([1.0, 0.9]),
                min_p=rng.choice([0.0, 0.05]),
                presence_penalty=rng.choice([0.0, 0.5]),
                frequency_penalty=rng.choice([0.0, 0.3]),
                repetition_penalty=rng.choice([1.0, 1.2]),
                logit_bias=((rng.randrange(1000), 5.0),),
                logprobs=rng.choice([None, 0, 5]),
                prompt_logprobs=rng.choice([None, 2]),
                min_tokens=rng.choice([0, 3]),
                seed=rng.choice([None, 7]),
            )
            for _ in prompts
        ]
        out = smol_llm.generate(prompts, params)
        assert all(c.finish_reason in ("stop", "length") for c in out)
    finally:
        compiles.active = False
    assert compiles.count == 0


def test_start_up_runs_every_step_shape_on_the_scratch_page_only(tiny_model):
    """The start-up warm-up (one run of each step shape, so that no stream stalls behind a shape's
    first run later) writes padding to scratch page 0 only: every page a request can get is as
    new. (Its requests' tokens: the default-flags and multi-host servers, which run it.)"""
    llm = LLM(tiny_model, dataclasses.replace(TINY, warmup=True))  # the session's TINY skips it
    try:
        k, v = (np.asarray(x) for x in llm.engine.state.kv)
        assert k[:, :, 0].any() and v[:, :, 0].any()  # it ran: padding went to the scratch page
        assert not k[:, :, 1:].any() and not v[:, :, 1:].any()
        out = llm.generate(["a b c d e f"], SamplingParams(max_tokens=4, temperature=0))
        assert len(out[0].token_ids) == 4
    finally:
        llm.shutdown()


@pytest.mark.slow  # 120 requests: 20 s on 2 cores, most of it compiling TINY (the session's first use of it)
def test_every_page_is_free_after_random_requests_and_aborts(tiny_model):
    llm = LLM(tiny_model, TINY)
    engine, rng = llm.engine, random.Random(1)

    async def one(i):
        prompt = [rng.randrange(1, 1000) for _ in range(rng.randint(1, 100))]
        stream = engine.submit(prompt, SamplingParams(max_tokens=rng.randint(1, 28), temperature=1.0, seed=i))
        stop_after = rng.choice([None, 1, 3])
        n = 0
        async for _ in stream:
            n += 1
            if stop_after is not None and n >= stop_after:
                await stream.aclose()
                break

    async def run():
        await asyncio.gather(*(one(i) for i in range(120)))
        deadline = time.monotonic() + 60  # aborts are applied by the step thread
        while engine.stats()["running"] or engine.stats()["waiting"]:
            assert time.monotonic() < deadline, engine.stats()
            await asyncio.sleep(0.02)

    asyncio.run(run())
    stats = engine.stats()
    llm.shutdown()
    assert stats["pages_used"] == 0 and stats["pages_free"] == stats["pages_total"], stats
