"""int8 weights and the one linear-layer helper every matrix product of the models goes through.

A `QTensor` is an int8 matrix `[..., in, out]` with one float32 scale per output channel, stored
output-major (`q` is `[..., out, in]`: XLA:CPU's int8 dot ran up to 1.46x faster on it than on
`[in, out]` for SmolLM2's shapes, from 2 rows to a 256-token chunk, on a Zen 4). How it
multiplies is chosen by whoever quantized it (`graph/` decides per backend; models never ask):
- `act_quant=True` (W8A8, for XLA:CPU): the activations are quantized to int8 per row on the fly
  and the product is int8 x int8 -> int32, which XLA:CPU hands to YNNPACK with the weights read as
  int8. A single row is padded to two, since XLA's own matrix-vector emitter would take M = 1.
- `act_quant=False` (weight-only, for GPU/TPU): `dot(x, q.astype(x.dtype)) * scale`, which XLA
  fuses there into one kernel reading int8 weights.
Both functions below are written once for numpy and jax.numpy (`xp`): the engine quantizes real
weights on the host, and the same code run under `jax.eval_shape` gives the abstract shapes.

Per-row activation scales lose the small channels of a row that has a few large outlier channels
(residual streams do). For W8A8 the input dimension is therefore rotated by a block-diagonal
Hadamard matrix first (as QuaRot does, without calibration): y = x W = (x R)(R^T W) exactly, and
in x R each outlier is spread over its block of `ROTATE_BLOCK` channels. R^T W is folded into the
weights on the host; x R is one small [b, b] product per block at run time.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

LAYOUT = "out-in"  # how `QTensor.q` holds its matrix: compiled executables and checkpoints depend on it
ROTATE_BLOCK = 64  # Hadamard block size for W8A8 (the largest power of two <= this dividing `in`)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QTensor:
    q: Any  # int8 [..., out, in]: the matrix transposed
    scale: Any  # float32 [..., out]
    act_quant: bool = dataclasses.field(default=True, metadata={"static": True})
    rotate: int = dataclasses.field(default=0, metadata={"static": True})  # Hadamard block; 0: none

    @property
    def shape(self) -> tuple[int, ...]:
        """The matrix's shape, [..., in, out]."""
        return (*self.q.shape[:-2], self.q.shape[-1], self.q.shape[-2])


def hadamard(n: int) -> np.ndarray:
    """The orthonormal (and symmetric) Hadamard matrix of order n, a power of two."""
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.float32(np.sqrt(n))


def rotation_block(n_in: int) -> int:
    b = ROTATE_BLOCK
    while b >= 8 and n_in % b:
        b //= 2
    return b if b >= 8 else 0


def _rotate(x: Any, block: int, xp: Any, axis: int) -> Any:
    """x with dimension `axis` (-1 or -2) multiplied block-wise by the Hadamard matrix."""
    h = xp.asarray(hadamard(block))
    if axis == -1:
        return (x.reshape(*x.shape[:-1], -1, block) @ h).reshape(x.shape)
    blocks = x.reshape(*x.shape[:-2], -1, block, x.shape[-1])  # [..., in/b, b, out]
    return xp.matmul(h, blocks).reshape(x.shape)  # numpy: a BLAS product, 5x faster than its einsum


def quantize(w: Any, act_quant: bool, xp: Any) -> QTensor:
    """Symmetric int8 with a scale per output channel (the last axis), over the input axis; for
    W8A8 with the input axis Hadamard-rotated first (see the module docstring)."""
    w32 = w.astype(xp.float32)
    rotate = rotation_block(w.shape[-2]) if act_quant else 0
    if rotate:
        w32 = _rotate(w32, rotate, xp, axis=-2)
    amax = xp.maximum(xp.max(w32, axis=-2), -xp.min(w32, axis=-2))
    scale = xp.where(amax > 0, amax / 127.0, 1.0).astype(xp.float32)
    if xp is np:  # the engine's real weights, on the host: in place, no temporary of the matrix's size
        w32 = np.divide(w32, scale[..., None, :], out=w32)  # w32 is a copy (astype copies)
        q = np.clip(np.rint(w32, out=w32), -127, 127, out=w32).astype(np.int8)
        q = np.ascontiguousarray(np.swapaxes(q, -1, -2))
    else:
        q = xp.swapaxes(xp.clip(xp.round(w32 / scale[..., None, :]), -127, 127).astype(xp.int8), -1, -2)
    return QTensor(q, scale, act_quant, rotate)


def on_rows(fn: Any, x: jax.Array) -> jax.Array:
    """fn over x's rows [M, in] -> [M, out], one row padded to two: XLA:CPU hands a product of two
    rows and more to YNNPACK, a row's result the same bits however many there are, but takes a
    single row to its own emitter (a one-core matrix-vector loop, other bits, and for bfloat16 a
    float32 copy of the whole matrix first). -> [..., out]."""
    rows = x.reshape(-1, x.shape[-1])
    m = rows.shape[0]
    y = fn(jnp.pad(rows, ((0, 1), (0, 0))) if m == 1 else rows)
    return y[:m].reshape(*x.shape[:-1], y.shape[-1])


def linear(x: jax.Array, w: jax.Array | QTensor, out_dtype: Any = None) -> jax.Array:
    """x [..., in] @ w [in, out] -> [..., out] (in `out_dtype`, default x's dtype)."""
    out_dtype = out_dtype or x.dtype
    if not isinstance(w, QTensor):
        if x.dtype == jnp.float32:
            return jnp.einsum("...i,io->...o", x, w, preferred_element_type=out_dtype)
        # bfloat16: accumulated and returned in float32, then rounded. XLA:CPU runs bfloat16 x
        # bfloat16 -> float32 at 2x the speed of -> bfloat16 (YNNPACK, 512 rows of SmolLM2's
        # shapes on an avx512_bf16 Zen 4: 192-206 against 88-90 GMAC/s); on GPU/TPU it is the
        # usual form.
        y = on_rows(lambda rows: jnp.einsum("mi,io->mo", rows, w, preferred_element_type=jnp.float32), x)
        return y.astype(out_dtype)
    if not w.act_quant:
        y = jnp.einsum("...i,oi->...o", x, w.q.astype(x.dtype), preferred_element_type=jnp.float32)
        return (y * w.scale).astype(out_dtype)

    def w8a8(rows: jax.Array) -> jax.Array:
        rows = rows.astype(jnp.float32)
        if w.rotate:
            rows = _rotate(rows, w.rotate, jnp, axis=-1)
        amax = jnp.max(jnp.abs(rows), axis=-1, keepdims=True)
        x_scale = jnp.where(amax > 0, amax / 127.0, 1.0)
        xq = jnp.clip(jnp.round(rows / x_scale), -127, 127).astype(jnp.int8)
        acc = jax.lax.dot_general(xq, w.q, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)  # [M, out]
        return acc.astype(jnp.float32) * x_scale * w.scale

    return on_rows(w8a8, x).astype(out_dtype)
