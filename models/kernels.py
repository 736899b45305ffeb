"""Decode attention through jax's Pallas paged-attention kernels, where the backend has one and the
layer is one they compute exactly; `models/layers.py: paged_attention` (jnp) everywhere else.

Both kernels (`jax.experimental.pallas.ops.gpu.paged_attention`, Triton, and
`...ops.tpu.paged_attention`, Mosaic) take one query token per row and a pool
`[kv heads, pages, page size, head dim]`: our pool `[L, K, P, S, Dh]` is read as one kv head of
L*K*P pages (a free reshape, where slicing out the layer would copy it) and each (row, kv head) pair
becomes a row of its own whose page table is offset to its (layer, head) plane. Neither kernel masks
a window's start, a packed row's base or scales the query, so sliding layers and prefill stay on the
jnp path and the query is scaled before the call.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig

KERNEL_BLOCK = 128  # keys per step of the kernel's loop (tokens), as models/layers.py's ATTENTION_BLOCK
GPU_SPLITS = 16  # most partitions of a row's pages the GPU kernel runs in parallel (its default)


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def decode_kernel_applies(
    cfg: ModelConfig,
    pool: jax.Array,
    window: Any,
    positions: jax.Array,
    base: jax.Array | None = None,
    *,
    backend: str | None = None,
    devices: int | None = None,
) -> bool:
    """Whether a segment's attention over one layer of `pool` [L, K, P, S, Dh] runs in a Pallas
    kernel on `backend` (default: jax's): a decode segment (positions [B, 1], no packed bases) of a
    layer without a sliding window, on one device, in shapes the backend's kernel compiles."""
    backend = backend or jax.default_backend()
    if backend not in ("gpu", "tpu") or positions.shape[1] != 1 or base is not None:
        return False
    # a pallas_call has no SPMD partitioning rule: on a mesh XLA would gather the pool to every device
    if (jax.device_count() if devices is None else devices) != 1:
        return False
    # `window` is traced under scan and in the layered loop: only a model without windows is known global
    if cfg.sliding_window and not (isinstance(window, int | np.integer) and window <= 0):
        return False
    _, _, _, S, Dh = pool.shape
    if backend == "gpu":  # Triton: power-of-two tensors, dots of at least 16 x 16
        return _power_of_two(S) and _power_of_two(Dh) and Dh >= 16
    # Mosaic: a lane-dense head dim (it refuses 64) and pages of whole bfloat16 tiles (16 rows, a
    # guess no TPU has checked); the kernel reads K/V as bfloat16, so a float32 pool would lose
    # precision it has on the jnp path
    return Dh % 128 == 0 and S % 16 == 0 and pool.dtype == jnp.bfloat16


def paged_decode(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    layer: Any,
    page_table: jax.Array,
    positions: jax.Array,
    *,
    scale: float,
    softcap: float | None,
    backend: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """`paged_attention` for a decode segment in the backend's Pallas kernel: q [B, 1, H, Dh] over
    layer `layer` of k, v [L, K, P, S, Dh] -> [B, 1, H, Dh]. `interpret` runs the kernel in the
    Pallas interpreter (any backend; tests)."""
    backend = backend or jax.default_backend()
    B, _, H, Dh = q.shape
    L, K, P, S, _ = k.shape
    G = H // K
    per_block = max(1, KERNEL_BLOCK // S)  # pages
    W = page_table.shape[1]
    splits = min(GPU_SPLITS, -(-W // per_block)) if backend == "gpu" else 1
    # padding entries point at each plane's page 0, beyond every row's length
    page_table = jnp.pad(page_table, ((0, 0), (0, -W % (splits * per_block))))
    planes = (layer * K + jnp.arange(K, dtype=jnp.int32)) * P  # [K]
    tables = (page_table[:, None, :] + planes[None, :, None]).reshape(B * K, -1)
    # a padding row (position -1) sees one key: the TPU kernel leaves a row of length 0 unwritten
    lengths = jnp.repeat(jnp.maximum(positions[:, 0] + 1, 1), K)  # [B*K]
    qk = (q[:, 0].astype(jnp.float32) * scale).astype(k.dtype).reshape(B * K, G, Dh)
    pages = (k.reshape(1, L * K * P, S, Dh), v.reshape(1, L * K * P, S, Dh))
    cap = softcap or None
    # imported here: the Pallas packages add ~0.2 s to a process's start, and CPU never gets here
    if backend == "gpu":
        from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention as kernel

        out = kernel(
            qk, *pages, tables, lengths,
            pages_per_compute_block=per_block, k_splits=splits, attn_logits_soft_cap=cap, interpret=interpret,
        )  # fmt: skip
    else:
        from jax.experimental.pallas import tpu as pltpu
        from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as kernel

        with pltpu.force_tpu_interpret_mode() if interpret else contextlib.nullcontext():
            out = kernel(qk, *pages, lengths, tables, pages_per_compute_block=per_block, attn_logits_soft_cap=cap)
    return out.reshape(B, 1, H, Dh).astype(q.dtype)
