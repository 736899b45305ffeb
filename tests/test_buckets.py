"""Bucket arithmetic with tiny numbers: which sizes exist, which one a step picks, and that every
prefill chunk the scheduler can produce has a compiled executable."""

from __future__ import annotations

import dataclasses

import pytest

from graph.api import EngineConfig
from graph.buckets import Buckets, pick, powers_of_two, prefill_sizes

# page_size 4, 12 pages of context, chunks up to 20 tokens: every maximum is a non-power of two
TINY = EngineConfig(
    max_batch=6, max_seq_len=48, page_size=4, max_prefill_tokens=20, min_prefill_tokens=4, min_context_tokens=8
)


@pytest.mark.parametrize(
    ("lo", "hi", "expected"),
    [
        (3, 20, (4, 8, 16, 20)),
        (1, 1, (1,)),
        (1, 8, (1, 2, 4, 8)),
        (0, 4, (1, 2, 4)),
        (4, 4, (4,)),
        (5, 6, (6,)),
        (16, 48, (16, 32, 48)),
        (16, 512, (16, 32, 64, 128, 256, 512)),
    ],
)
def test_powers_of_two_between_lo_and_hi_plus_hi_itself(lo, hi, expected):
    assert powers_of_two(lo, hi) == expected


@pytest.mark.parametrize(("lo", "hi"), [(5, 4), (1, 0), (0, 0)])
def test_powers_of_two_rejects_an_empty_range(lo, hi):
    with pytest.raises(ValueError, match="empty bucket range"):
        powers_of_two(lo, hi)


@pytest.mark.parametrize(("n", "bucket"), [(0, 4), (1, 4), (4, 4), (5, 8), (8, 8), (9, 16), (17, 20), (20, 20)])
def test_pick_returns_the_smallest_bucket_that_holds_n(n, bucket):
    assert pick((4, 8, 16, 20), n) == bucket


def test_pick_beyond_the_largest_bucket_is_an_error():
    with pytest.raises(ValueError, match="21 exceeds the largest bucket 20"):
        pick((4, 8, 16, 20), 21)


def test_from_config_with_non_power_of_two_maxima():
    b = Buckets.from_config(TINY)
    assert b.prefill_tokens == (4, 8, 16, 20)
    assert b.decode_batch == (1, 2, 4, 6)
    assert b.context_pages == (2, 4, 8, 12)  # min_context_tokens 8 = 2 pages; max_seq_len 48 = 12 pages
    assert b.page_size == 4
    assert b.max_pages == 12


@pytest.mark.parametrize(
    ("lo", "hi", "step", "expected"),
    [
        (16, 512, 16, (16, 32, 48, 64, 80, 96, 112, 128, 256, 512)),  # 8 steps of 16, then doubling
        (16, 64, 16, (16, 32, 48, 64)),
        (64, 64, 16, (64,)),
        (4, 20, 16, (4, 8, 16, 20)),  # powers of two below the step
        (20, 100, 16, (32, 48, 64, 80, 96, 100)),  # from the minimum's power of two on, as without steps
        (16, 512, 32, (16, 32, 64, 96, 128, 160, 192, 224, 256, 512)),
        (16, 512, 0, (16, 32, 64, 128, 256, 512)),  # 0: powers of two only
    ],
)
def test_prefill_sizes_step_linearly_up_to_eight_steps_then_double(lo, hi, step, expected):
    assert prefill_sizes(lo, hi, step) == expected


def test_from_config_defaults():
    b = Buckets.from_config(EngineConfig())
    assert b.prefill_tokens == (16, 32, 48, 64, 80, 96, 112, 128, 256, 512)
    assert b.mixed_tokens == 32
    assert b.decode_batch == (1, 2, 4, 8, 16)
    assert b.context_pages == (128,)  # one: attention costs what a step's context holds, not its bucket
    assert b.max_pages == 128


def test_int8_on_cpu_decodes_at_least_two_rows():
    """A one-row step rounds differently on XLA:CPU; int8 makes that other text (graph/buckets.py)."""
    assert Buckets.from_config(EngineConfig(quantize="int8")).decode_batch == (2, 4, 8, 16)
    assert Buckets.from_config(EngineConfig(quantize="int8", max_batch=1)).decode_batch == (1,)


def test_from_config_caps_prefill_chunks_and_minima_at_the_context_length():
    b = Buckets.from_config(
        EngineConfig(max_batch=1, max_seq_len=16, page_size=8, max_prefill_tokens=64, min_prefill_tokens=32)
    )
    assert b.prefill_tokens == (16,)  # chunks never exceed max_seq_len, and the minimum follows
    assert b.decode_batch == (1,)
    assert b.context_pages == (2,)  # by default the only bucket is the whole context


def test_from_config_min_context_below_one_page_is_one_page():
    b = Buckets.from_config(EngineConfig(max_seq_len=32, page_size=8, min_context_tokens=0, max_prefill_tokens=32))
    assert b.context_pages == (1, 2, 4)


@pytest.mark.parametrize(("max_seq_len", "page_size"), [(50, 4), (48, 5), (7, 16)])
def test_from_config_rejects_max_seq_len_not_a_multiple_of_page_size(max_seq_len, page_size):
    with pytest.raises(ValueError, match=f"max_seq_len {max_seq_len} must be a multiple of page_size {page_size}"):
        Buckets.from_config(EngineConfig(max_seq_len=max_seq_len, page_size=page_size))


@pytest.mark.parametrize(("tokens", "pages"), [(1, 2), (8, 2), (9, 4), (16, 4), (17, 8), (32, 8), (33, 12), (48, 12)])
def test_context_for_rounds_tokens_up_to_pages_then_to_a_bucket(tokens, pages):
    assert Buckets.from_config(TINY).context_for(tokens) == pages


def test_context_for_beyond_max_seq_len_is_an_error():
    with pytest.raises(ValueError):
        Buckets.from_config(TINY).context_for(49)


def test_prefill_and_decode_keys_of_a_tiny_config():
    b = Buckets.from_config(TINY)
    assert b.prefill_keys() == [
        ("prefill", 1, 4, 2), ("prefill", 1, 4, 4), ("prefill", 1, 4, 8), ("prefill", 1, 4, 12),
        ("prefill", 1, 8, 2), ("prefill", 1, 8, 4), ("prefill", 1, 8, 8), ("prefill", 1, 8, 12),
        # a chunk padded to 16 has more than 8 real tokens: 2 pages (8 tokens) can never hold it
        ("prefill", 1, 16, 4), ("prefill", 1, 16, 8), ("prefill", 1, 16, 12),
        ("prefill", 1, 20, 8), ("prefill", 1, 20, 12),
    ]  # fmt: skip
    assert b.decode_keys() == [("decode", bs, 1, p) for bs in (1, 2, 4, 6) for p in (2, 4, 8, 12)]
    # mixed steps: every batch and context bucket with one chunk size, by default the largest prefill
    # bucket up to 32 tokens
    assert b.mixed_tokens == 20
    assert b.mixed_keys() == [("mixed", bs, 20, p) for bs in (1, 2, 4, 6) for p in (2, 4, 8, 12)]
    assert b.all_keys() == b.prefill_keys() + b.decode_keys() + b.mixed_keys()
    assert len(set(b.all_keys())) == len(b.all_keys())


@pytest.mark.parametrize(("budget", "chunk"), [(0, 0), (10, 4), (13, 4), (14, 8), (21, 8), (22, 16), (1000, 20)])
def test_the_mixed_chunk_is_the_largest_prefill_bucket_beside_a_full_batch(budget, chunk):
    config = dataclasses.replace(TINY, max_num_batched_tokens=budget)
    assert Buckets.from_config(config).mixed_tokens == chunk
    assert bool(Buckets.from_config(config).mixed_keys()) == bool(chunk)


def test_default_mixed_chunks_are_32_tokens_or_the_smallest_bucket_and_none_for_one_sequence():
    assert Buckets.from_config(EngineConfig()).mixed_tokens == 32
    # a speculative row feeds 1 + K tokens: the chunk grows with it (the largest bucket up to 32 (1 + K))
    assert Buckets.from_config(EngineConfig(num_speculative_tokens=4)).mixed_tokens == 128
    assert Buckets.from_config(EngineConfig(num_speculative_tokens=1)).mixed_tokens == 64
    big = EngineConfig(max_batch=4, min_prefill_tokens=128, max_prefill_tokens=512)
    assert Buckets.from_config(big).mixed_tokens == 128
    assert Buckets.from_config(dataclasses.replace(big, max_batch=1)).mixed_keys() == []


def test_a_budget_without_room_for_a_chunk_beside_a_full_batch_is_refused():
    with pytest.raises(ValueError, match="use at least 10, or 0 for no mixed steps"):
        Buckets.from_config(dataclasses.replace(TINY, max_num_batched_tokens=9))


CONFIGS = {
    "tiny": TINY,
    "defaults": EngineConfig(),
    "prefill-min-above-context-min": EngineConfig(
        max_seq_len=32, page_size=4, max_prefill_tokens=16, min_prefill_tokens=8, min_context_tokens=4
    ),
    "page-size-6": EngineConfig(
        max_seq_len=48, page_size=6, max_prefill_tokens=16, min_prefill_tokens=4, min_context_tokens=6
    ),
    "pages-of-8-chunks-of-24": EngineConfig(
        max_seq_len=40, page_size=8, max_prefill_tokens=24, min_prefill_tokens=16, min_context_tokens=8
    ),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_every_prefill_chunk_has_a_key_and_every_key_can_be_used(config):
    """A chunk of n tokens starting at `start` runs in the bucket (pick(prefill_tokens, n),
    context_for(start + n)) (graph/batching.py); meeting a key that is not compiled is a bug."""
    b = Buckets.from_config(config)
    keys = b.prefill_keys()
    max_chunk = b.prefill_tokens[-1]
    needed = {
        ("prefill", 1, pick(b.prefill_tokens, n), b.context_for(start + n))
        for n in range(1, max_chunk + 1)
        for start in range(config.max_seq_len - n + 1)
    }
    assert needed - set(keys) == set()
    # and each key's context holds at least the shortest chunk that is padded to its token bucket
    shortest = dict(zip(b.prefill_tokens, (1, *(t + 1 for t in b.prefill_tokens[:-1])), strict=True))
    for _, _, t, p in keys:
        assert p * b.page_size >= shortest[t], (t, p)


def test_a_three_token_prompt_runs_in_a_compiled_prefill_bucket():
    """The same check through the real batching code: chunks are padded to at least
    min_prefill_tokens (8) while their context only needs the pages of their real tokens (1)."""
    from graph.api import SamplingParams
    from graph.batching import build_step
    from graph.scheduler import Chunk, Prefill, Sequence

    config = CONFIGS["prefill-min-above-context-min"]
    b = Buckets.from_config(config)
    seq = Sequence("r", [5, 6, 7], SamplingParams(), seed=0, pages=[1])
    key, (inputs,) = build_step(Prefill((Chunk(seq, 0, 3),)), b, config.max_seq_len, lambda s: (), _all_allowed)
    assert key == ("prefill", 1, 8, 1)
    assert inputs.tokens.shape == (1, 8) and inputs.page_table.shape == (1, 1)
    assert key in b.all_keys()


def test_packed_prompts_sit_one_after_another_in_one_row_each_from_a_page_boundary():
    from graph.api import SamplingParams
    from graph.batching import build_step
    from graph.scheduler import Chunk, Prefill, Sequence

    config = EngineConfig(max_batch=4, max_seq_len=256, page_size=4, max_prefill_tokens=32, min_context_tokens=4)
    b = Buckets.from_config(config)
    a = Sequence("a", [10, 11, 12, 13, 14], SamplingParams(), seed=0, pages=[7, 3])
    c = Sequence("c", [20, 21, 22, 23, 24, 25, 26], SamplingParams(), seed=0, pages=[5, 9], computed=4)
    key, (inputs,) = build_step(
        Prefill((Chunk(a, 0, 5), Chunk(c, 4, 3))), b, config.max_seq_len, lambda s: (), _all_allowed
    )
    assert key == ("prefill", 1, 16, 4) and key in b.all_keys()  # 8 tokens (the smallest bucket: 16), 4 pages
    assert inputs.tokens[0, :8].tolist() == [10, 11, 12, 13, 14, 24, 25, 26]
    assert inputs.positions[0].tolist() == [0, 1, 2, 3, 4, 4, 5, 6] + [-1] * 8
    assert inputs.base[0, :8].tolist() == [0] * 5 + [8] * 3  # c's pages start at the row's third page
    assert inputs.page_table[0].tolist() == [7, 3, 5, 9]
    assert inputs.last_index.tolist()[:2] == [4, 7]


def _all_allowed(rows):
    import numpy as np

    return np.full((len(rows), 1), 0xFFFFFFFF, np.uint32)
