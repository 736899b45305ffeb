"""The blocks under the model: head-major paged attention against dense attention computed from
the same keys and values (no cache), int8 matrices against float32, and rows that come out the same
bits in any batch."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.layers import (
    PACKED_BF16,
    KVCache,
    kv_slots,
    pack_bf16,
    paged_attention,
    rms_norm,
    unembed,
    unpack_bf16,
    write_kv,
)
from models.quant import _rotate, linear, quantize, rotation_block

B, K, G, Dh, S, W, L = 3, 2, 3, 8, 4, 5, 2  # 3 sequences, 2 kv heads x 3 queries each, 5 pages of 4
LENGTHS = (17, 6, 20)


def _dense_attention(q, k, v, length, scale, window):
    """q [T, H, Dh] at positions 0..T-1 over k, v [T, K, Dh]: plain causal softmax attention."""
    out = np.zeros_like(q)
    for t in range(length):
        for h in range(K * G):
            lo = max(0, t - window + 1) if window else 0
            s = (k[lo : t + 1, h // G] @ q[t, h]) * scale
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ v[lo : t + 1, h // G]
    return out


def _bf16(x: np.ndarray) -> np.ndarray:
    return np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))


def _empty_pool(shape: tuple[int, ...], packed: bool) -> KVCache:
    """A float32 pool [L, K, P, S, Dh], or one of bfloat16 pairs [L, K, P, S, Dh / 2]."""
    if packed:
        shape = (*shape[:-1], shape[-1] // 2)
    return KVCache(*(jnp.zeros(shape, PACKED_BF16 if packed else jnp.float32) for _ in range(2)))


def test_bfloat16_pairs_unpack_to_the_rounded_values_in_order():
    x = np.random.default_rng(4).normal(size=(3, 8)).astype(np.float32)
    packed = pack_bf16(jnp.asarray(x))
    assert packed.shape == (3, 4) and packed.dtype == PACKED_BF16
    np.testing.assert_array_equal(np.asarray(unpack_bf16(packed, jnp.float32)), _bf16(x))


@pytest.mark.parametrize("packed", [False, True], ids=["float32", "bfloat16-pairs"])
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("layer", [1, "traced"])
@pytest.mark.parametrize("last", [None, 1, 5], ids=["prompt", "decode", "verify"])
def test_head_major_paged_attention_equals_dense_attention(window, layer, last, packed):
    """Every position of each sequence (a prompt: scores are a dot), or only its `last` ones
    with the rest already cached (decode and speculative rows: few queries, scores are a
    multiply-and-sum), against a plain softmax; from a float32 pool, and from a pool of bfloat16
    pairs against the keys and values rounded to bfloat16."""
    rng = np.random.default_rng(0)
    T = max(LENGTHS)
    q = rng.normal(size=(B, T, K * G, Dh)).astype(np.float32)
    k = rng.normal(size=(B, T, K, Dh)).astype(np.float32)
    v = rng.normal(size=(B, T, K, Dh)).astype(np.float32)
    positions = np.full((B, T), -1, np.int32)
    for b, n in enumerate(LENGTHS):
        positions[b, :n] = np.arange(n)
    pages = rng.permutation(np.arange(1, 1 + B * W)).reshape(B, W).astype(np.int32)  # page order is random
    shape = (L, K, 1 + B * W, S, Dh)

    @jax.jit
    def run(layer_index):
        lay = 1 if layer == 1 else layer_index
        cache = _empty_pool(shape, packed)
        slots = kv_slots(pages, positions, cache.page_size)
        flat = (-1, *k.shape[2:])
        cache = KVCache(write_kv(cache.k, lay, k.reshape(flat), slots), write_kv(cache.v, lay, v.reshape(flat), slots))
        if last is None:
            return paged_attention(q, cache, lay, pages, positions, scale=0.3, window=window, softcap=None)
        ends = np.array(LENGTHS)[:, None] - last + np.arange(last)  # each row's last positions
        q_last = jnp.take_along_axis(jnp.asarray(q), jnp.asarray(ends)[:, :, None, None], axis=1)
        return paged_attention(q_last, cache, lay, pages, jnp.asarray(ends, jnp.int32), scale=0.3, window=window,
                               softcap=None)  # fmt: skip

    out = np.asarray(run(jnp.int32(1)))
    if packed:
        k, v = _bf16(k), _bf16(v)
    for b, n in enumerate(LENGTHS):
        ref = _dense_attention(q[b], k[b], v[b], n, 0.3, window)
        got, want = (out[b, :n], ref[:n]) if last is None else (out[b], ref[n - last : n])
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("packed", [False, True], ids=["float32", "bfloat16-pairs"])
@pytest.mark.parametrize("window", [0, 300])
def test_a_chunk_after_a_long_context_equals_dense_attention(window, packed):
    """The last 40 tokens of a 700-token sequence, the rest already cached: the context before the
    chunk goes in wide blocks (`WIDE_BLOCK`), the rest in ordinary ones, under a sliding window too."""
    rng = np.random.default_rng(5)
    n, T, S, W = 700, 40, 16, 48
    k, v = (rng.normal(size=(n, K, Dh)).astype(np.float32) for _ in range(2))
    q = rng.normal(size=(1, T, K * G, Dh)).astype(np.float32)
    pages = rng.permutation(np.arange(1, 1 + W))[None].astype(np.int32)
    cache = _empty_pool((L, K, 1 + W, S, Dh), packed)
    slots = kv_slots(pages, np.arange(n, dtype=np.int32)[None], S)
    cache = KVCache(write_kv(cache.k, 1, jnp.asarray(k), slots), write_kv(cache.v, 1, jnp.asarray(v), slots))
    positions = np.arange(n - T, n, dtype=np.int32)[None]
    out = np.asarray(paged_attention(q, cache, 1, pages, positions, scale=0.3, window=window, softcap=None))
    if packed:
        k, v = _bf16(k), _bf16(v)
    for t, pos in enumerate(positions[0]):
        lo = max(0, pos - window + 1) if window else 0
        for h in range(K * G):
            s = (k[lo : pos + 1, h // G] @ q[0, t, h]) * 0.3
            p = np.exp(s - s.max())
            np.testing.assert_allclose(out[0, t, h], (p / p.sum()) @ v[lo : pos + 1, h // G], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [0, 5])
def test_sequences_packed_in_one_row_attend_only_to_themselves(window):
    """The three sequences one after another in a single row (a packed prefill chunk), each
    from a page boundary of the row: each token's output is its own sequence's dense attention."""
    rng = np.random.default_rng(1)
    N = sum(LENGTHS)
    q = rng.normal(size=(1, N, K * G, Dh)).astype(np.float32)
    k = rng.normal(size=(1, N, K, Dh)).astype(np.float32)
    v = rng.normal(size=(1, N, K, Dh)).astype(np.float32)
    positions = np.concatenate([np.arange(n) for n in LENGTHS])[None].astype(np.int32)
    row_pages = [-(-n // S) for n in LENGTHS]
    starts = np.cumsum([0, *row_pages[:-1]]) * S
    base = np.concatenate([np.full(n, b) for n, b in zip(LENGTHS, starts, strict=True)])[None].astype(np.int32)
    pages = rng.permutation(np.arange(1, 1 + sum(row_pages)))[None].astype(np.int32)
    shape = (L, K, 1 + sum(row_pages), S, Dh)

    @jax.jit
    def run():
        cache = KVCache(jnp.zeros(shape), jnp.zeros(shape))
        slots = kv_slots(pages, positions, cache.page_size, base)
        flat = (-1, *k.shape[2:])
        cache = KVCache(write_kv(cache.k, 1, k.reshape(flat), slots), write_kv(cache.v, 1, v.reshape(flat), slots))
        return paged_attention(q, cache, 1, pages, positions, scale=0.3, window=window, softcap=None, base=base)

    out = np.asarray(run())[0]
    at = 0
    for n in LENGTHS:
        ref = _dense_attention(q[0, at : at + n], k[0, at : at + n], v[0, at : at + n], n, 0.3, window)
        np.testing.assert_allclose(out[at : at + n], ref, atol=1e-5, rtol=1e-5)
        at += n


def test_hadamard_rotation_is_exact_and_undone_by_itself():
    x = np.random.default_rng(1).normal(size=(3, 192)).astype(np.float32)
    block = rotation_block(192)
    assert block == 64
    np.testing.assert_allclose(_rotate(_rotate(x, block, np, -1), block, np, -1), x, atol=1e-5)
    w = np.random.default_rng(2).normal(size=(192, 7)).astype(np.float32)
    np.testing.assert_allclose(_rotate(x, block, np, -1) @ _rotate(w, block, np, -2), x @ w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act_quant", [True, False], ids=["w8a8", "weight-only"])
@pytest.mark.parametrize("rows", [1, 5])
def test_int8_linear_is_close_to_float32(act_quant, rows):
    rng = np.random.default_rng(3)
    w = rng.normal(size=(256, 96)).astype(np.float32)
    x = rng.normal(size=(rows, 256)).astype(np.float32)
    x[:, 7] *= 30  # an outlier channel, as residual streams have
    ref = x @ w
    qw = jax.tree.map(jnp.asarray, quantize(w, act_quant, np))
    assert qw.q.dtype == jnp.int8 and qw.scale.shape == (96,)
    got = np.asarray(jax.jit(linear)(jnp.asarray(x), qw))
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() / np.abs(ref).max() < 0.02


def _first_row_by_batch(fn, rows: np.ndarray, batches=(1, 2, 4, 8, 16)) -> dict[int, np.ndarray]:
    """fn's first row of output for the first `b` rows of `rows`, one compilation per batch."""
    jitted = jax.jit(fn)
    return {b: np.asarray(jitted(jnp.asarray(rows[:b])))[0] for b in batches}


def test_a_bfloat16_rows_linear_and_tied_logits_are_the_same_bits_in_any_batch():
    """A bfloat16 model's matrix products (float32 accumulation, one row padded to two) and its
    tied output head: a row's result alone is its result among 2 to 16 rows."""
    rng = np.random.default_rng(6)
    x = rng.normal(size=(16, 576)).astype(np.float32)
    w = jnp.asarray(rng.normal(size=(576, 3072)).astype(np.float32)).astype(jnp.bfloat16)
    outs = _first_row_by_batch(lambda x: linear(x.astype(jnp.bfloat16), w).astype(jnp.float32), x)
    assert all(np.array_equal(o, outs[1]) for o in outs.values())
    embed = jnp.asarray(rng.normal(size=(4096, 576)).astype(np.float32)).astype(jnp.bfloat16)
    weights = types.SimpleNamespace(lm_head=None, embed=embed)
    cfg = types.SimpleNamespace(final_logit_softcap=None)
    logits = _first_row_by_batch(lambda x: unembed(weights, cfg, x.astype(jnp.bfloat16)), x)
    assert all(np.array_equal(o, logits[1]) for o in logits.values())


def test_a_rows_norm_and_attention_are_the_same_bits_in_any_batch():
    """Batch independence at the bit: XLA:CPU sums a `reduce` in an order that depends on the
    shape around it (SmolLM2's 576-wide norm of a row among 8 came out 1 ulp off the same row
    alone), and int8 activations round such an ulp into other text. Attention from a float32
    pool and from one of bfloat16 pairs."""
    rng = np.random.default_rng(4)
    x = (rng.normal(size=(16, 576)) * 3).astype(np.float32)
    w = rng.normal(size=576).astype(np.float32)
    norms = _first_row_by_batch(lambda x: rms_norm(x, w, 1e-5, False), x)
    assert all(np.array_equal(n, norms[1]) for n in norms.values())

    L, K, P, S, Dh = 2, 3, 20, 16, 64
    kv = KVCache(*(jnp.asarray(rng.normal(size=(L, K, P, S, Dh)).astype(np.float32)) for _ in range(2)))
    q = rng.normal(size=(16, 1, 3 * K, Dh)).astype(np.float32)
    pages = jnp.asarray(np.tile(np.arange(1, 17, dtype=np.int32), (16, 1)))  # every row the same 200 tokens

    def attend(q):
        n = q.shape[0]
        return paged_attention(
            q, kv, 1, pages[:n], jnp.full((n, 1), 199, jnp.int32), scale=0.125, window=0, softcap=None
        )

    outs = _first_row_by_batch(attend, q)
    assert all(np.array_equal(o, outs[1]) for o in outs.values())
    kv = KVCache(pack_bf16(kv.k), pack_bf16(kv.v))  # a pool of bfloat16 pairs (--kv-cache-dtype bfloat16 on CPU)
    outs = _first_row_by_batch(attend, q)
    assert all(np.array_equal(o, outs[1]) for o in outs.values())
