"""Structured outputs in the engine: the grammar's token mask as a step input.

Mechanics on the tiny random model (whatever it would say, the mask makes it follow the grammar):
the mask on hand-made logits, choices and regexes that always match, logprobs reported after the
mask, a complete grammar that ends its request, constrained and unconstrained requests in one
batch without a compilation and without changing the unconstrained ones' tokens, preemption, and
specs that do not compile refused at submit. The bundled SmolLM2 then answers 20+ JSON schemas.
"""

from __future__ import annotations

import asyncio
import json
import math
import re

import jax
import numpy as np
import pytest

from graph.api import EngineConfig, InvalidRequestError, SamplingParams, StructuredSpec
from graph.offline import LLM
from graph.sampling import host_arrays, sample
from tests.test_engine import CompileCounter

# As tests/test_preemption.py (the same executables): a 16-page pool that a long prompt overflows.
CONFIG = EngineConfig(max_batch=4, max_seq_len=208, max_prefill_tokens=16, min_context_tokens=208, kv_pages=16)
SHORT = [[5, 17, 99, 3, 42, 7, 8, 21, 13, 2], [11, 12, 14, 19, 23, 29, 31, 37, 41, 43]]
LONG = [(i * 7919) % 997 + 1 for i in range(200)]
CHOICES = ("yes", "no", "maybe later")
PHONE = r"[0-9]{3}-[0-9]{4}"


def spec(kind: str, text: str | tuple[str, ...] = "") -> StructuredSpec:
    return StructuredSpec(kind, text)


def constrained(structured: StructuredSpec, seed: int = 0, **kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 24, "temperature": 0.8, "seed": seed, "structured": structured, **kw})


@pytest.fixture(scope="module")
def tiny(tiny_model):
    llm = LLM(tiny_model, CONFIG)
    yield llm
    llm.shutdown()


def test_the_mask_keeps_only_allowed_tokens_in_sampling_and_logprobs():
    V = 70  # three words, the last one partly used
    allowed = [3, 31, 32, 64, 69]
    mask = np.zeros((2, 3), np.uint32)
    for t in allowed:
        mask[0, t // 32] |= np.uint32(1 << (t % 32))
    mask[1] = 0xFFFFFFFF
    logits = np.tile(np.linspace(5, -5, V, dtype=np.float32), (2, 1))  # token 0 is the favourite
    params = SamplingParams(temperature=1.0, logprobs=20)
    s = host_arrays([(params, 1, ()), (params, 1, ())], 2)
    out = jax.jit(sample)(logits, s, np.zeros(2, np.int32), np.full((2, 4), -1, np.int32), np.zeros(2, np.int32), mask)
    assert int(out.token[0]) in allowed
    top = [int(t) for t, lp in zip(out.top_ids[0], out.top_logprobs[0], strict=True) if lp > -1e9]
    assert sorted(top) == allowed  # the masked tokens have no probability left
    assert math.isclose(sum(math.exp(lp) for lp in out.top_logprobs[0][: len(allowed)]), 1.0, rel_tol=1e-5)
    unmasked = jax.jit(sample)(logits, s, np.zeros(2, np.int32), np.full((2, 4), -1, np.int32), np.zeros(2, np.int32))
    assert int(out.token[1]) == int(unmasked.token[1])  # all ones: as without a mask
    np.testing.assert_array_equal(out.top_logprobs[1], unmasked.top_logprobs[1])


def test_choices_and_regexes_always_match_and_end_the_request(tiny):
    prompts = [SHORT[0]] * 8
    params = [constrained(spec("choice", CHOICES), seed, max_tokens=16) for seed in range(4)]
    params += [constrained(spec("regex", PHONE), seed, max_tokens=16) for seed in range(4)]
    out = tiny.generate(prompts, params)
    for c in out[:4]:
        assert c.text in CHOICES and c.finish_reason == "stop", c
    for c in out[4:]:
        assert re.fullmatch(PHONE, c.text) and c.finish_reason == "stop", c
    for c in out:  # no end or special token inside the answer (the grammar allows none)
        assert not set(c.token_ids) & tiny.tokenizer.special_ids, c
    assert len({c.text for c in out[4:]}) > 1  # sampled, not forced to one answer


def test_logprobs_are_reported_after_the_mask(tiny):
    c = tiny.generate([SHORT[1]], constrained(spec("choice", CHOICES), logprobs=20))[0]
    first = c.logprobs[0]
    allowed = [(t, lp) for t, lp in first.top if lp > -1e9]
    assert math.isclose(sum(math.exp(lp) for _, lp in allowed), 1.0, rel_tol=1e-4)
    texts = [tiny.tokenizer.decode([t]) for t, _ in allowed]
    assert all(any(ch.startswith(t) for ch in CHOICES) for t in texts), texts


def test_constrained_rows_leave_their_neighbours_alone_and_compile_nothing(tiny):
    free = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)] * 2
    free += [SamplingParams(max_tokens=12, temperature=0.9, seed=7, ignore_eos=True)]
    prompts = [SHORT[0], SHORT[1], SHORT[0]]
    alone = [tiny.generate([p], q)[0].token_ids for p, q in zip(prompts, free, strict=True)]
    compiles = CompileCounter()
    compiles.active = True
    try:
        mixed = tiny.generate(
            [*prompts, SHORT[1], SHORT[0], LONG[:40]],
            [*free, constrained(spec("regex", PHONE)), constrained(spec("choice", CHOICES), 3),
             constrained(spec("json_object"), 5, max_tokens=8)],
        )  # fmt: skip
    finally:
        compiles.active = False
    assert compiles.count == 0
    assert [c.token_ids for c in mixed[:3]] == alone
    assert re.fullmatch(PHONE, mixed[3].text) and mixed[4].text in CHOICES
    assert mixed[5].text.startswith("{")  # cut by max_tokens: "length", the JSON unfinished
    assert mixed[5].finish_reason in ("stop", "length")


def test_a_preempted_constrained_request_continues_its_grammar(tiny_model, tiny):
    params = constrained(spec("regex", r"[a-z]+( [a-z]+)*\."), 3, max_tokens=8)
    reference = tiny.generate([LONG], params)[0]
    llm = LLM(tiny_model, CONFIG)
    try:
        free = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
        out = llm.generate([*SHORT, LONG], [free, free, params])
        assert llm.engine.scheduler.preemptions > 0
    finally:
        llm.shutdown()
    assert out[2].token_ids == reference.token_ids and out[2].text == reference.text


def test_a_matcher_behind_its_output_is_rebuilt_from_it(tiny):
    grammars = tiny.engine.grammars
    g = grammars.compile(spec("choice", CHOICES))
    start = grammars.masks([(g, [])])
    ids = tiny.tokenizer.encode("maybe later", add_special_tokens=False)
    # tokens the matcher never saw (a step that failed after sampling): its mask follows the output
    assert not (grammars.masks([(g, ids[:-1])]) == start).all()
    assert g.accept(ids) == ("stop", None)


@pytest.mark.parametrize(
    ("structured", "message"),
    [
        (spec("json_schema", "{not json"), "not valid JSON"),
        (spec("json_schema", json.dumps({"type": "objectx"})), "objectx"),
        (spec("regex", "(("), "regex"),
        (spec("grammar", "start: foo"), "foo"),
        (spec("choice", ()), "at least one"),
    ],
    ids=["schema-json", "schema-type", "regex", "grammar", "choice"],
)
def test_a_spec_that_does_not_compile_is_refused_at_submit(tiny, structured, message):
    async def submit():
        with pytest.raises(InvalidRequestError, match=message) as e:
            tiny.engine.submit(SHORT[0], constrained(structured))
        return e.value

    error = asyncio.run(submit())
    assert error.param == "structured"
    assert tiny.engine.stats()["waiting"] == 0
    assert tiny.generate([SHORT[0]], constrained(spec("choice", CHOICES)))[0].text in CHOICES
