"""A step's sampled-row inputs (sampling parameters, token masks, penalty history, prompt lengths)
are built and sent to the device only when they change: when a row joins or leaves, when a row's
suppressed end tokens change, and every step for rows that need them (penalties, grammars).
Outputs stay exactly those of requests run alone."""

from __future__ import annotations

import numpy as np
import pytest

from graph.api import SamplingParams
from graph.batching import RowReuse
from graph.scheduler import Sequence

EOS = (2,)
H = 16


def _suppressed(seq: Sequence) -> tuple[int, ...]:
    return EOS if len(seq.output) < seq.params.min_tokens else ()


def _masks(rows):
    return np.stack([np.full(2, 0xFFFFFFFF if row is None else len(row[1]), np.uint32) for row in rows])


RULES = (_suppressed, _masks)


def _seq(name: str, **params) -> Sequence:
    return Sequence(name, [5, 6, 7], SamplingParams(**params), seed=len(name), output=[9])


def test_the_same_rows_in_the_same_state_get_the_very_arrays_of_the_last_step():
    reuse = RowReuse()
    a, b = _seq("a", temperature=0.7), _seq("bb", temperature=0)
    first = reuse.rows("decode", [a, b], 4, H, RULES, [True, True])
    a.output.append(10)  # one more decoded token changes none of them
    again = reuse.rows("decode", [a, b], 4, H, RULES, [True, True])
    assert all(x is y for x, y in zip(first, again, strict=True))
    history, prompt_len, sampling, mask = again
    assert prompt_len.tolist() == [3, 3, 0, 0] and sampling.seed.tolist() == [1, 2, 0, 0]
    assert (history == -1).all() and (mask == 0xFFFFFFFF).all()
    # another row shape (a prefill chunk's rows) is kept apart
    assert reuse.rows("prefill", [a, b], 4, H, RULES, [True, True])[2] is not sampling
    # a row that joins: rebuilt, with its parameters
    c = _seq("ccc", temperature=1.3)
    joined = reuse.rows("decode", [a, b, c], 4, H, RULES, [True, True, True])
    assert joined[2] is not sampling and joined[2].temperature.tolist() == pytest.approx([0.7, 0, 1.3, 0])
    # and one that leaves
    left = reuse.rows("decode", [a, c], 4, H, RULES, [True, True])
    assert left[2].temperature.tolist() == pytest.approx([0.7, 1.3, 0, 0])


def test_rows_whose_suppressed_end_tokens_change_are_rebuilt():
    reuse = RowReuse()
    a = _seq("a", min_tokens=3)
    early = reuse.rows("decode", [a], 2, H, RULES, [True])[2]
    assert early.suppress_ids[0, :1].tolist() == [2]
    a.output.append(11)
    assert reuse.rows("decode", [a], 2, H, RULES, [True])[2] is early  # still before min_tokens
    a.output.append(12)  # three tokens: end tokens are allowed now
    late = reuse.rows("decode", [a], 2, H, RULES, [True])[2]
    assert late is not early and (late.suppress_ids == -1).all()


def test_a_penalized_row_gets_its_history_and_a_constrained_row_its_mask_every_step():
    reuse = RowReuse()
    plain, penalized = _seq("a"), _seq("bb", presence_penalty=0.5)
    constrained = _seq("ccc")
    constrained.grammar = object()
    seqs = [plain, penalized, constrained]
    history, _, sampling, mask = reuse.rows("decode", seqs, 4, H, RULES, [True] * 3)
    assert history[1, :4].tolist() == [5, 6, 7, 9] and (history[0] == -1).all()
    assert mask[2].tolist() == [1, 1]  # the grammar's mask for one output token
    penalized.output.append(13)
    constrained.output.append(14)
    history2, _, sampling2, mask2 = reuse.rows("decode", seqs, 4, H, RULES, [True] * 3)
    assert sampling2 is sampling  # the parameters did not change
    assert history2[1, :5].tolist() == [5, 6, 7, 9, 13]
    assert mask2[2].tolist() == [2, 2]


@pytest.mark.slow  # the session's SmolLM2 engine
def test_a_steady_batch_sends_its_row_parameters_once_and_outputs_equal_runs_alone(smol_llm):
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "In 1969, astronauts"]
    params = [
        SamplingParams(max_tokens=24, temperature=0, min_tokens=12),  # its end tokens come back at 12
        SamplingParams(max_tokens=24, temperature=0.9, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=0.7, top_k=20, seed=4, ignore_eos=True, logprobs=2),
        SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logit_bias=((13, -5.0),)),
    ]
    alone = [smol_llm.generate([p], q)[0] for p, q in zip(prompts, params, strict=True)]
    programs = smol_llm.engine.table._programs
    before = {k: (p.calls, p.row_sends) for k, p in programs.items() if k[0] == "decode"}
    together = smol_llm.generate(prompts, params)
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [c.text for c in together] == [c.text for c in alone]
    calls = sends = 0
    for key, p in programs.items():
        if key[0] == "decode":
            calls += p.calls - before.get(key, (0, 0))[0]
            sends += p.row_sends - before.get(key, (0, 0))[1]
    # 4 rows decoding about 22 steps: sent when the batch forms, when the first row's end tokens
    # come back, and when a row leaves (one that hits an end token early)
    assert calls >= 15 and sends <= 4, (calls, sends)
    # with a penalized row the history goes every step, and outputs still equal runs alone
    penalized = SamplingParams(max_tokens=16, temperature=0, presence_penalty=0.8, frequency_penalty=0.3)
    alone = [smol_llm.generate([p], penalized)[0].token_ids for p in prompts[:2]]
    assert [c.token_ids for c in smol_llm.generate(prompts[:2], penalized)] == alone
