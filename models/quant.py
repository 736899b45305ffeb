"""int8 weights and the one linear-layer helper every matrix product of the models goes through.

A `QTensor` is an int8 matrix `[..., in, out]` with one float32 scale per output channel. How it
multiplies is chosen by whoever quantized it (`graph/` decides per backend; models never ask):
- `act_quant=True` (W8A8, for XLA:CPU): the activations are quantized to int8 per row on the fly
  and the product is int8 x int8 -> int32, which XLA:CPU hands to YNNPACK with the weights read as
  int8. A single row is padded to two, since XLA's own matrix-vector emitter would take M = 1.
- `act_quant=False` (weight-only, for GPU/TPU): `dot(x, q.astype(x.dtype)) * scale`, which XLA
  fuses there into one kernel reading int8 weights.
Both functions below are written once for numpy and jax.numpy (`xp`): the engine quantizes real
weights on the host, and the same code run under `jax.eval_shape` gives the abstract shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QTensor:
    q: Any  # int8 [..., in, out]
    scale: Any  # float32 [..., out]
    act_quant: bool = dataclasses.field(default=True, metadata={"static": True})

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape


def quantize(w: Any, act_quant: bool, xp: Any) -> QTensor:
    """Symmetric int8 with a scale per output channel (the last axis), over the input axis."""
    w32 = w.astype(xp.float32)
    amax = xp.max(xp.abs(w32), axis=-2)
    scale = xp.where(amax > 0, amax / 127.0, 1.0).astype(xp.float32)
    q = xp.clip(xp.round(w32 / scale[..., None, :]), -127, 127).astype(xp.int8)
    return QTensor(q, scale, act_quant)


def linear(x: jax.Array, w: jax.Array | QTensor, out_dtype: Any = None) -> jax.Array:
    """x [..., in] @ w [in, out] -> [..., out] (in `out_dtype`, default x's dtype)."""
    out_dtype = out_dtype or x.dtype
    if not isinstance(w, QTensor):
        return jnp.einsum("...i,io->...o", x, w, preferred_element_type=out_dtype)
    if not w.act_quant:
        y = jnp.einsum("...i,io->...o", x, w.q.astype(x.dtype), preferred_element_type=jnp.float32)
        return (y * w.scale).astype(out_dtype)
    lead, n_in = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, n_in).astype(jnp.float32)
    m = rows.shape[0]
    if m == 1:  # M = 1 would leave YNNPACK for a one-core matrix-vector loop
        rows = jnp.pad(rows, ((0, 1), (0, 0)))
    amax = jnp.max(jnp.abs(rows), axis=-1, keepdims=True)
    x_scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    xq = jnp.clip(jnp.round(rows / x_scale), -127, 127).astype(jnp.int8)
    acc = jax.lax.dot(xq, w.q, preferred_element_type=jnp.int32)  # [M, out]
    y = acc.astype(jnp.float32) * x_scale * w.scale
    return y[:m].reshape(*lead, w.q.shape[-1]).astype(out_dtype)
