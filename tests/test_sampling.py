"""On-device sampling (`graph.sampling.sample`) under `jax.jit` on hand-made logits.

Two batch shapes only, each compiled once: SMALL rows for exact checks, BIG rows (one seed per
row) for the checks that need many draws.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from graph.api import MAX_TOP_LOGPROBS, SamplingParams
from graph.sampling import first_argmax, host_arrays, sample

V = 32  # vocabulary
H = 16  # history length
SMALL = 8
BIG = 4096
_sample = jax.jit(sample)

Row = tuple[SamplingParams, int, tuple[int, ...]]  # (params, seed, suppressed ids)


@dataclasses.dataclass
class Out:
    token: np.ndarray
    logprob: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray


def run(
    rows: list[Row],
    logits: np.ndarray,  # [len(rows), V] or [V] for every row
    positions: np.ndarray | int = 0,
    histories: list[tuple[list[int], list[int]]] | None = None,  # (prompt, output) per row
) -> Out:
    n = len(rows)
    B = SMALL if n <= SMALL else BIG
    assert n <= B
    x = np.zeros((B, V), np.float32)
    x[:n] = logits
    pos = np.zeros(B, np.int32)
    pos[:n] = positions
    history = np.full((B, H), -1, np.int32)
    prompt_len = np.zeros(B, np.int32)
    for b, (prompt, output) in enumerate(histories or []):
        history[b, : len(prompt) + len(output)] = prompt + output
        prompt_len[b] = len(prompt)
    out = jax.device_get(_sample(x, host_arrays([*rows, *[None] * (B - n)], B), pos, history, prompt_len))
    return Out(out.token[:n], out.logprob[:n], out.top_ids[:n], out.top_logprobs[:n])


def draws(params: SamplingParams, logits: np.ndarray, position: int = 0, suppress: tuple[int, ...] = ()) -> np.ndarray:
    """Tokens of BIG rows that differ only in their seed."""
    return run([(params, seed, suppress) for seed in range(BIG)], logits, position).token


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(SMALL, V)).astype(np.float32) * 2  # distinct values in every row
# A known distribution over 5 tokens plus a tail: 0.35 0.25 0.2 0.1 0.05, and 0.05 over the other 27,
# placed at shuffled ids so that sorting matters.
ORDER = RNG.permutation(V)
PROBS = np.full(V, 0.05 / 27)
PROBS[ORDER[:5]] = [0.35, 0.25, 0.2, 0.1, 0.05]
KNOWN = np.log(PROBS).astype(np.float32)


def describe(params: SamplingParams) -> str:
    """The fields that differ from the defaults, for test ids: "top_k=3,top_p=0.4"."""
    fields = [f.name for f in dataclasses.fields(params)]
    changed = [f"{f}={getattr(params, f)}" for f in fields if getattr(params, f) != getattr(SamplingParams(), f)]
    return ",".join(changed) or "defaults"


def best(k: int) -> set[int]:
    """The k most likely ids of KNOWN."""
    return {int(i) for i in ORDER[:k]}


def test_temperature_zero_is_argmax_whatever_the_other_parameters():
    rows = [
        (SamplingParams(temperature=0), 1, ()),
        (SamplingParams(temperature=0, top_k=3), 2, ()),
        (SamplingParams(temperature=0, top_p=0.1), 3, ()),
        (SamplingParams(temperature=0, min_p=0.9), 4, ()),
        (SamplingParams(temperature=0, seed=99), 5, ()),
        (SamplingParams(temperature=0, logprobs=5), 6, ()),
        (SamplingParams(temperature=0), 7, ()),
        (SamplingParams(temperature=0), 8, ()),
    ]
    for position in (0, 17):
        out = run(rows, LOGITS, position)
        np.testing.assert_array_equal(out.token, LOGITS.argmax(axis=-1))


def test_first_argmax_is_numpys_argmax_with_ties_masked_rows_and_nan():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 1000)).astype(np.float32)
    x[1, [10, 500, 999]] = 50.0  # a tie: the first
    x[2, :] = -1e30  # every token masked: the first
    x[3, [40, 7]] = np.nan  # NaN wins, as in numpy and jnp.argmax: the first NaN
    x[4, 999] = np.inf
    np.testing.assert_array_equal(jax.jit(first_argmax)(x), x.argmax(axis=-1))


def test_a_seeded_draw_is_jax_random_categorical_of_the_scaled_logits():
    """The Gumbel-max draw with `first_argmax` gives jax's own categorical draw, token for token."""
    temperatures = (0.5, 1.0, 1.5, 2.0) * 2
    rows = [(SamplingParams(temperature=t), seed, ()) for seed, t in enumerate(temperatures)]
    for position in (0, 5, 17):
        out = run(rows, LOGITS, position)
        for i, (params, seed, _) in enumerate(rows):
            key = jax.random.fold_in(jax.random.key(seed), position)
            assert out.token[i] == jax.random.categorical(key, LOGITS[i] / params.temperature)


def test_logit_bias_plus_100_forces_a_token_and_minus_100_forbids_it():
    worst = int(KNOWN.argmin())
    forced = draws(SamplingParams(temperature=1.0, logit_bias=((worst, 100.0),)), KNOWN)
    assert set(forced.tolist()) == {worst}
    top = int(KNOWN.argmax())
    banned = draws(SamplingParams(temperature=1.0, logit_bias=((top, -100.0),)), KNOWN)
    assert top not in banned.tolist()
    assert len(set(banned.tolist())) > 5  # still a draw from the rest
    greedy = run([(SamplingParams(temperature=0, logit_bias=((top, -100.0), (worst, 1.0))), 0, ())], KNOWN).token
    assert greedy[0] == ORDER[1]  # the second best (worst + 1 is still far below it)


def test_suppressed_ids_are_never_chosen():
    suppress = tuple(int(i) for i in ORDER[:2])
    tokens = draws(SamplingParams(temperature=1.0), KNOWN, suppress=suppress)
    assert not set(tokens.tolist()) & set(suppress)
    assert best(3) - set(suppress) <= set(tokens.tolist())
    greedy = run([(SamplingParams(temperature=0), 0, suppress)], KNOWN).token
    assert greedy[0] == ORDER[2]


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=5.0, top_k=1), SamplingParams(temperature=5.0, top_p=1e-6)],
    ids=describe,
)
def test_top_k_1_and_a_tiny_top_p_are_greedy_even_at_high_temperature(params):
    assert set(draws(params, KNOWN).tolist()) == {int(KNOWN.argmax())}


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        (SamplingParams(top_k=2), best(2)),
        (SamplingParams(top_k=4), best(4)),
        (SamplingParams(top_k=4, temperature=3.0), best(4)),
        # top-p keeps the smallest prefix whose mass reaches p: 0.35, 0.6, 0.8, 0.9, ...
        (SamplingParams(top_p=0.3), best(1)),
        (SamplingParams(top_p=0.5), best(2)),
        (SamplingParams(top_p=0.7), best(3)),
        (SamplingParams(top_p=0.88), best(4)),
        # top-k first, then top-p on the renormalized top k: 0.35/0.8 = 0.44 >= 0.4
        (SamplingParams(top_k=3, top_p=0.4), best(1)),
        (SamplingParams(top_k=3, top_p=0.5), best(2)),
        # min-p keeps p >= min_p * 0.35
        (SamplingParams(min_p=0.6), best(2)),  # >= 0.21
        (SamplingParams(min_p=0.5), best(3)),  # >= 0.175
        (SamplingParams(min_p=0.2), best(4)),  # >= 0.07
        (SamplingParams(min_p=0.1), best(5)),  # >= 0.035
    ],
    ids=lambda x: describe(x) if isinstance(x, SamplingParams) else f"{len(x)}-best",
)
def test_filters_allow_exactly_the_expected_tokens(params, allowed):
    """Over 4096 seeds every allowed token turns up (the least likely has p >= 0.1 after
    renormalization) and nothing else does (without the filter, 10%..65% of draws would)."""
    assert set(draws(params, KNOWN).tolist()) == allowed


@pytest.mark.parametrize("top_k", [-1, V, V + 100])
def test_top_k_of_minus_one_or_the_whole_vocabulary_keeps_every_token(top_k):
    """The same draws, seed for seed, as no top-k at all (OpenAI clients send -1, or a large k)."""
    np.testing.assert_array_equal(draws(SamplingParams(top_k=top_k), KNOWN), draws(SamplingParams(), KNOWN))


def test_top_p_draws_in_proportion_to_the_renormalized_probabilities():
    tokens = draws(SamplingParams(top_p=0.7), KNOWN)
    freq = np.array([np.mean(tokens == i) for i in ORDER[:3]])
    np.testing.assert_allclose(freq, np.array([0.35, 0.25, 0.2]) / 0.8, atol=0.03)


def chi_square(tokens: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic over the bins expecting >= 5 draws, the rest pooled; and its dof."""
    counts = np.bincount(tokens, minlength=len(probs)).astype(np.float64)
    expect = probs * len(tokens)
    big = expect >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expect[big], expect[~big].sum())
    keep = exp > 0
    return float(np.sum((obs[keep] - exp[keep]) ** 2 / exp[keep])), int(keep.sum() - 1)


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
def test_draws_follow_softmax_of_logits_over_temperature(temperature):
    logits = LOGITS[0]
    tokens = draws(SamplingParams(temperature=temperature), logits, position=3)
    stat, dof = chi_square(tokens, np.exp(log_softmax(logits / temperature)))
    assert stat < dof + 6 * np.sqrt(2 * dof), (stat, dof)  # ~ p < 1e-6 under the right distribution
    for wrong in (temperature * 0.7, temperature / 0.7):  # the check can tell temperatures apart
        wrong_stat, _ = chi_square(tokens, np.exp(log_softmax(logits / wrong)))
        assert wrong_stat > 2 * (dof + 6 * np.sqrt(2 * dof)), (wrong, wrong_stat)


def test_same_seed_and_position_give_the_same_token_whatever_the_neighbours():
    """Row i in a plain batch; in a batch of the other shape; and in a batch, reversed, where its
    neighbours turn on every optional stage (penalties, filters, top logprobs, greedy)."""
    n = BIG // 2
    logits = LOGITS[np.arange(n) % SMALL]
    positions = np.arange(n) % 37
    plain_rows = [(SamplingParams(temperature=1.0), 2**32 - 1 - i, ()) for i in range(n)]
    plain = run(plain_rows, logits, positions).token
    small = run(plain_rows[:SMALL], logits[:SMALL], positions[:SMALL]).token
    np.testing.assert_array_equal(small, plain[:SMALL])

    neighbours = [
        SamplingParams(temperature=0.7, top_k=3, presence_penalty=1.0, logprobs=5),
        SamplingParams(temperature=0, repetition_penalty=1.3),
        SamplingParams(temperature=2.0, top_p=0.5, min_p=0.1, frequency_penalty=-1.0),
        SamplingParams(temperature=1.0, logit_bias=((3, 50.0),), prompt_logprobs=2),
    ]
    rng = np.random.default_rng(1)
    rows, x, pos, hist = [], [], [], []
    for i in reversed(range(n)):
        rows += [plain_rows[i], (neighbours[i % 4], i, (5,))]
        x += [logits[i], rng.normal(size=V)]
        pos += [positions[i], i]
        hist += [([1, 2, 3], [4, 5]), ([i % V, 7], [i % V] * 3)]
    mixed = run(rows, np.array(x), np.array(pos), hist).token
    np.testing.assert_array_equal(mixed[0::2][::-1], plain)


def test_different_positions_and_seeds_give_different_draws():
    uniform = np.zeros(V, np.float32)
    by_position = run([(SamplingParams(), 7, ())] * BIG, uniform, np.arange(BIG)).token
    by_seed = draws(SamplingParams(), uniform, position=11)
    for tokens in (by_position, by_seed):
        counts = np.bincount(tokens, minlength=V)
        assert counts.min() > 0.5 * BIG / V and counts.max() < 1.5 * BIG / V, counts
    assert np.mean(by_position == by_seed) < 0.1


def test_logprob_is_the_models_log_softmax_at_the_chosen_token():
    rows = [
        (SamplingParams(temperature=0), 0, ()),
        (SamplingParams(temperature=1.0), 1, ()),
        (SamplingParams(temperature=0.3, top_k=2), 2, ()),
        (SamplingParams(temperature=1.0, logit_bias=((int(LOGITS[3].argmin()), 100.0),)), 3, ()),
        (SamplingParams(temperature=0, repetition_penalty=2.0, frequency_penalty=1.0), 4, ()),
        (SamplingParams(temperature=2.0, min_p=0.05), 5, ()),
        (SamplingParams(temperature=1.0), 6, (int(LOGITS[6].argmax()),)),
        (SamplingParams(temperature=1.0, top_p=0.3, logprobs=3), 7, ()),
    ]
    histories = [([1], [2])] * 4 + [([int(LOGITS[4].argmax())], [int(LOGITS[4].argmax())])] + [([1], [2])] * 3
    out = run(rows, LOGITS, np.arange(SMALL), histories)
    assert out.token[3] == LOGITS[3].argmin()  # the bias moved the choice, not the logprob
    expected = log_softmax(LOGITS)[np.arange(SMALL), out.token]
    np.testing.assert_allclose(out.logprob, expected, atol=1e-5)


def test_top_logprobs_are_sorted_and_correct_for_every_row():
    rows = [(SamplingParams(temperature=0), i, ()) for i in range(SMALL)]
    rows[5] = (SamplingParams(temperature=1.0, logprobs=3), 5, ())  # one row asks; all rows get them
    out = run(rows, LOGITS)
    lsm = log_softmax(LOGITS)
    order = np.argsort(-LOGITS, axis=-1)[:, :MAX_TOP_LOGPROBS]
    np.testing.assert_array_equal(out.top_ids, order)
    np.testing.assert_allclose(out.top_logprobs, np.take_along_axis(lsm, order, axis=1), atol=1e-5)
    assert np.all(np.diff(out.top_logprobs, axis=1) <= 0)


# ---- penalties, through greedy choices with hand-made margins ----


def logits_with(**values: float) -> np.ndarray:
    """Zeros (or `rest`) except the given ids: logits_with(t3=2.0, t5=1.5)."""
    x = np.full(V, values.pop("rest", 0.0), np.float32)
    for name, value in values.items():
        x[int(name[1:])] = value
    return x


POS = logits_with(t3=2.0, t5=1.5)  # token 3 leads token 5 by 0.5; the rest are 0
NEG = logits_with(t3=-1.0, t5=-1.4, rest=-5.0)  # all negative: token 3 leads by 0.4

ALL3 = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.1, presence_penalty=0.1)
Case = tuple[SamplingParams, list[int], list[int], np.ndarray, int]  # params, prompt, output, logits, token
P = SamplingParams
PENALTY_CASES: list[Case] = [
    # presence: once per token present in the output
    (P(presence_penalty=0.4), [9], [3], POS, 3),  # 2.0 - 0.4 = 1.6 > 1.5
    (P(presence_penalty=0.6), [9], [3], POS, 5),  # 1.4 < 1.5
    (P(presence_penalty=0.4), [9], [3, 3, 3], POS, 3),  # not per occurrence
    (P(presence_penalty=5.0), [3, 3], [9], POS, 3),  # prompt tokens do not count
    # frequency: per occurrence in the output
    (P(frequency_penalty=0.3), [9], [3], POS, 3),  # 1.7
    (P(frequency_penalty=0.2), [9], [3, 3], POS, 3),  # 1.6
    (P(frequency_penalty=0.3), [9], [3, 3], POS, 5),  # 1.4
    (P(frequency_penalty=5.0), [3, 3, 3], [9], POS, 3),  # prompt tokens do not count
    (P(frequency_penalty=-0.3), [9], [5, 5], POS, 5),  # negative encourages repeats: 2.1
    # repetition: once per token of prompt or output; positive logits divided, negative multiplied
    (P(repetition_penalty=1.2), [3], [9], POS, 3),  # 2.0 / 1.2 = 1.67
    (P(repetition_penalty=1.5), [3], [9], POS, 5),  # 1.33
    (P(repetition_penalty=1.5), [9], [3], POS, 5),  # output tokens count too
    (P(repetition_penalty=1.2), [3, 3, 3], [3], POS, 3),  # not per occurrence (1.2^4 would give 0.96)
    (P(repetition_penalty=1.3), [9], [3], NEG, 3),  # -1.3 > -1.4
    (P(repetition_penalty=1.5), [9], [3], NEG, 5),  # -1.5 < -1.4 (dividing would give -0.67)
    (P(repetition_penalty=1.5), [9], [5], NEG, 3),  # the penalized one falls further behind
    # repetition first, then frequency and presence: 2.0 / 2 - 2 * 0.1 - 0.1 = 0.7
    # (the other order would give (2.0 - 0.3) / 2 = 0.85 and keep token 3 in both cases)
    (ALL3, [9], [3, 3], logits_with(t3=2, t5=0.75), 5),
    (ALL3, [9], [3, 3], logits_with(t3=2, t5=0.65), 3),
    # no penalty: the history alone changes nothing
    (P(), [3, 3], [3, 3], POS, 3),
    (P(), [5], [5], NEG, 3),
]


def greedy(cases: list[Case]) -> list[int]:
    """Greedy token of each case, SMALL rows per call; the logprobs stay the model's."""
    tokens = []
    for i in range(0, len(cases), SMALL):
        chunk = cases[i : i + SMALL]
        rows = [(dataclasses.replace(c[0], temperature=0), 0, ()) for c in chunk]
        logits = np.array([c[3] for c in chunk])
        out = run(rows, logits, 0, [(c[1], c[2]) for c in chunk])
        raw = log_softmax(logits)[np.arange(len(chunk)), out.token]
        np.testing.assert_allclose(out.logprob, raw, atol=1e-5)
        tokens += out.token.tolist()
    return tokens


@pytest.mark.parametrize(
    "case", PENALTY_CASES, ids=[f"{describe(c[0])}-prompt{c[1]}-output{c[2]}->{c[4]}" for c in PENALTY_CASES]
)
def test_penalty_alone_in_its_batch(case):
    assert greedy([case]) == [case[4]]


def test_penalties_apply_per_row_in_a_mixed_batch():
    cases = PENALTY_CASES[::-1] + PENALTY_CASES[1::3]  # rows with and without penalties side by side
    assert greedy(cases) == [c[4] for c in cases]
