"""The Pallas decode kernels (`models/kernels.py`) against the jnp `paged_attention`, run in the
Pallas interpreter on CPU; when they apply; and that the calls the model makes lower for CUDA and
TPU (the Triton and Mosaic lowerings run here, only their compilers need the device)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.config import ModelConfig
from models.kernels import decode_kernel_applies, paged_decode
from models.layers import KVCache, paged_attention

# 5 decode rows: two lengths off a page boundary, one on it, a first token, and a padding row
# (position -1); 2 kv heads x 3 queries; 8 pages of 16 per kernel block, so the longest row spans
# three blocks and three GPU partitions, and the short ones skip partitions
LENGTHS = (300, 16, 137, 1, 0)
L, K, G, S = 2, 2, 3, 16
W = -(-max(LENGTHS) // S)


def _config(head_dim: int, **kw) -> ModelConfig:
    return ModelConfig("llama", 32, 64, 128, L, K * G, K, head_dim, **kw)


def _decode_rows(head_dim: int, dtype, seed: int = 0):
    """A random pool (every slot written, page 0 too), the rows' pages in scattered order, and
    one query per row at position length - 1."""
    rng = np.random.default_rng(seed)
    B, P = len(LENGTHS), 1 + len(LENGTHS) * W
    shape = (L, K, P, S, head_dim)
    k, v = (jnp.asarray(rng.normal(size=shape), dtype) for _ in range(2))
    q = jnp.asarray(rng.normal(size=(B, 1, K * G, head_dim)), dtype)
    pages = jnp.asarray(rng.permutation(np.arange(1, P)).reshape(B, W), jnp.int32)
    positions = jnp.asarray([[n - 1] for n in LENGTHS], jnp.int32)
    return q, KVCache(k, v), pages, positions


def _both(backend: str, head_dim: int, dtype, softcap: float | None) -> tuple[np.ndarray, np.ndarray]:
    q, kv, pages, positions = _decode_rows(head_dim, dtype)

    @jax.jit
    def run(layer):  # traced, as under the scan over layers
        ref = paged_attention(q, kv, layer, pages, positions, scale=0.3, window=0, softcap=softcap)
        out = paged_decode(
            q, kv.k, kv.v, layer, pages, positions, scale=0.3, softcap=softcap, backend=backend, interpret=True
        )
        return ref, out

    ref, out = (np.asarray(x, np.float32) for x in run(jnp.int32(1)))
    assert np.isfinite(out).all()  # the padding row too: it writes the next layer's scratch keys
    real = [b for b, n in enumerate(LENGTHS) if n > 0]
    return ref[real], out[real]


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_gpu_kernel_matches_jnp_attention_on_decode_rows(softcap):
    ref, out = _both("gpu", 16, jnp.float32, softcap)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


def test_tpu_kernel_matches_jnp_attention_on_bfloat16_decode_rows():
    """The TPU kernel reads K/V as bfloat16 (hence only a bfloat16 pool) and keeps the softmax
    weights in float32 where the jnp path rounds them to bfloat16 before the value product."""
    ref, out = _both("tpu", 128, jnp.bfloat16, None)
    np.testing.assert_allclose(out, ref, atol=2e-2, rtol=0)


def test_kernels_apply_only_to_global_decode_rows_on_one_gpu_or_tpu():
    cfg = _config(64)
    pool = jax.ShapeDtypeStruct((L, K, 9, S, 64), jnp.float32)
    decode, prefill = jnp.zeros((4, 1), jnp.int32), jnp.zeros((1, 32), jnp.int32)
    gpu = functools.partial(decode_kernel_applies, backend="gpu", devices=1)
    assert gpu(cfg, pool, 0, decode)
    assert not decode_kernel_applies(cfg, pool, 0, decode)  # this CPU: the jnp path, as every other test runs
    assert not decode_kernel_applies(cfg, pool, 0, decode, backend="cpu", devices=1)
    assert not gpu(cfg, pool, 0, prefill)
    assert not gpu(cfg, pool, 0, decode, base=decode)  # a packed row
    assert not decode_kernel_applies(cfg, pool, 0, decode, backend="gpu", devices=2)  # a mesh
    sliding = dataclasses.replace(cfg, sliding_window=8, layer_sliding=(True, False))
    assert not gpu(sliding, pool, 8, decode)
    assert gpu(sliding, pool, 0, decode)  # its global layer, unrolled
    assert not gpu(sliding, pool, jnp.int32(0), decode)  # under scan the window is not known
    assert not gpu(_config(48), jax.ShapeDtypeStruct((L, K, 9, S, 48), jnp.float32), 0, decode)  # Triton: 2^n
    assert not gpu(cfg, jax.ShapeDtypeStruct((L, K, 9, 12, 64), jnp.float32), 0, decode)
    tpu = functools.partial(decode_kernel_applies, backend="tpu", devices=1)
    assert tpu(_config(128), jax.ShapeDtypeStruct((L, K, 9, S, 128), jnp.bfloat16), 0, decode)
    assert not tpu(_config(128), jax.ShapeDtypeStruct((L, K, 9, S, 128), jnp.float32), 0, decode)
    assert not tpu(cfg, jax.ShapeDtypeStruct((L, K, 9, S, 64), jnp.bfloat16), 0, decode)


@pytest.mark.parametrize(("backend", "platform", "head_dim"), [("gpu", "cuda", 64), ("tpu", "tpu", 128)])
def test_decode_kernel_call_lowers_for_its_platform(backend, platform, head_dim):
    """A 16-row bfloat16 decode batch over a 2048-token page table, as a served model's step."""
    B, H, Kv, P, Wd = 16, 9, 3, 4097, 128
    assert decode_kernel_applies(_config(head_dim), jax.ShapeDtypeStruct((L, Kv, P, S, head_dim), jnp.bfloat16), 0,
                                 jnp.zeros((B, 1)), backend=backend, devices=1)  # fmt: skip
    f = functools.partial(paged_decode, scale=0.125, softcap=50.0, backend=backend)
    args = (
        jax.ShapeDtypeStruct((B, 1, H, head_dim), jnp.bfloat16),
        *[jax.ShapeDtypeStruct((L, Kv, P, S, head_dim), jnp.bfloat16)] * 2,
        jax.ShapeDtypeStruct((), jnp.int32),
        jax.ShapeDtypeStruct((B, Wd), jnp.int32),
        jax.ShapeDtypeStruct((B, 1), jnp.int32),
    )
    text = jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    assert ("__gpu$xla.gpu.triton" if backend == "gpu" else "tpu_custom_call") in text
