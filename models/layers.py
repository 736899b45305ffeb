"""The building blocks of the decoder (`models/transformer.py`): norms, rotary embeddings,
attention over a paged KV cache, the gated MLP and the output head.

Paged KV cache layout (the compile layer allocates it, models only read and write it), head-major:
  k, v: [L, K, P, S, Dh]  (layers, kv heads, pages in the pool, tokens per page, head dim); a
  bfloat16 pool on CPU is [L, K, P, S, Dh / 2] words of two values each (`PACKED_BF16`)
  page_table: [B, W] int32, the pages of each sequence in order (unused entries may be anything
  valid, e.g. 0: causal masking hides them). Page 0 is scratch: padding tokens (position -1)
  write there, so a real sequence must never own page 0.
Token t of a sequence lives at page_table[b, t // S], slot t % S, in every (layer, kv head) plane.
A row may also hold several sequences one after another (a packed prefill chunk): each token
then has a `base`, the page-aligned start of its sequence's pages within the row, and is at
row position base + t; it attends only to row positions from its own base on.
Head-major, one (layer, head, page) is a contiguous [S, Dh] row block: a step reads a sequence's
keys with one plain row gather and no transposes (XLA:CPU runs a gather fused with a transpose at
~1 GB/s), and it is the layout Pallas paged-attention kernels take on GPU and TPU.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from models import kernels
from models.config import ModelConfig, RopeConfig
from models.params import LayerWeights, Weights
from models.quant import linear, on_rows

_MASKED = -1e30  # finite, so a fully masked (padding) row gives a uniform softmax, not NaN


# A pool of this dtype holds bfloat16 values in pairs, one 32-bit word per two of a row's head
# dimension (`pack_bf16`): XLA:CPU gathers rows of 16-bit values some 100x slower than rows of
# 32-bit words (a bfloat16 decode step of batch 16: 9.8 s, against 60 ms in float32).
PACKED_BF16 = jnp.uint32


class KVCache(NamedTuple):
    k: jax.Array  # [L, K, P, S, Dh], or [L, K, P, S, Dh / 2] of PACKED_BF16
    v: jax.Array  # the same

    @property
    def page_size(self) -> int:
        return self.k.shape[3]


def kv_shape(cfg: ModelConfig, num_pages: int, page_size: int, packed: bool = False) -> tuple[int, ...]:
    return (cfg.num_layers, cfg.num_kv_heads, num_pages, page_size, cfg.head_dim // (2 if packed else 1))


def pack_bf16(x: jax.Array) -> jax.Array:
    """[..., Dh] -> PACKED_BF16 [..., Dh / 2]: values 2i and 2i + 1, rounded to bfloat16, in word i."""
    b = x.astype(jnp.bfloat16)
    return jax.lax.bitcast_convert_type(b.reshape(*b.shape[:-1], -1, 2), PACKED_BF16)


def unpack_bf16(u: jax.Array, dtype: Any) -> jax.Array:
    """`pack_bf16`'s inverse: PACKED_BF16 [..., n] -> [..., 2n] in `dtype`."""
    return jax.lax.bitcast_convert_type(u, jnp.bfloat16).reshape(*u.shape[:-1], -1).astype(dtype)


def tree_sum(x: jax.Array) -> jax.Array:
    """The sum over the last axis (kept, size 1) as a fixed tree of elementwise additions. XLA
    orders a `reduce` by the shape around it (on CPU a row among 8 rows is summed in another order
    than a row among 2), so a row's result would depend on its batch; an addition does not."""
    while (n := x.shape[-1]) > 1:
        half = n // 2
        y = x[..., :half] + x[..., half : 2 * half]
        x = jnp.concatenate([y[..., :1] + x[..., 2 * half :], y[..., 1:]], axis=-1) if n % 2 else y
    return x


def rms_norm(x: jax.Array, w: jax.Array, eps: float, plus_one: bool) -> jax.Array:
    """RMSNorm in float32. Gemma scales by (1 + w) in float32; Llama casts back, then scales by w.
    The mean is a `tree_sum`: a row's norm must not depend on the rows beside it."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(tree_sum(x32 * x32) / x.shape[-1] + eps)
    if plus_one:
        return (normed * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
    return w * normed.astype(x.dtype)


def inv_frequencies(rope: RopeConfig, dim: int) -> np.ndarray:
    """Rotary inverse frequencies [dim/2] (float32), with linear or llama3 scaling."""
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv = (np.float32(1.0) / (np.float32(rope.theta) ** exponents)).astype(np.float32)
    if rope.kind == "linear":
        return (inv / np.float32(rope.factor)).astype(np.float32)
    if rope.kind == "llama3":
        old = rope.original_max_position
        low_wavelen, high_wavelen = old / rope.low_freq_factor, old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def rope_tables(rope: RopeConfig, dim: int, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin: [B, T, Dh] (float32) for `positions` [B, T], in the rotate-half layout."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_frequencies(rope, dim))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, T, H, Dh]; cos, sin: [B, T, Dh]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def kv_slots(
    page_table: jax.Array, positions: jax.Array, page_size: int, base: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """The (page, slot) of each token [B, T] -> two [B * T] arrays; padding (position -1) goes to
    scratch page 0. `base` [B, T]: where each token's sequence starts in its row (packed rows)."""
    valid = positions >= 0
    safe = jnp.where(valid, positions if base is None else positions + base, 0)
    pages = jnp.take_along_axis(page_table, safe // page_size, axis=1)
    return jnp.where(valid, pages, 0).reshape(-1), jnp.where(valid, safe % page_size, 0).reshape(-1)


def write_kv(cache: jax.Array, layer: Any, new: jax.Array, slots: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Scatter new [N, K, Dh] into cache [L, K, P, S, Dh] (or packed) at each token's (page, slot) [N]."""
    pages, offsets = slots
    new = pack_bf16(new) if cache.dtype == PACKED_BF16 else new.astype(cache.dtype)
    if new.shape[0] == 1:
        # one token would become a dynamic-update-slice, and XLA:CPU then copies the whole pool
        # around the attention loop that reads it (100x slower at batch 1); a second write, to
        # scratch page 0, keeps it an in-place scatter
        new = jnp.concatenate([new, jnp.zeros_like(new)])
        pages, offsets = jnp.pad(pages, (0, 1)), jnp.pad(offsets, (0, 1))
    # advanced indices around a slice: the indexed view is [N, K, Dh], new's own layout
    return cache.at[layer, :, pages, offsets].set(new)


ATTENTION_BLOCK = 128  # keys per step of the attention loop (tokens)
# keys per step over the context wholly before a prompt chunk's first query (a later chunk of a long
# prompt, a chat turn after a cached history): there every key is visible to every query, and
# fewer, larger steps run faster on XLA:CPU (SmolLM2, 64 tokens after 1,168: 74 -> 47 ms over 30
# layers); near the queries, blocks stay small, so a short context computes no masked keys
WIDE_BLOCK = 512
FEW_QUERIES = 16  # query rows per KV head (tokens x query heads per KV head) up to which scores are not a dot


def paged_attention(
    q: jax.Array,
    kv: KVCache,
    layer: Any,
    page_table: jax.Array,
    positions: jax.Array,
    *,
    scale: float,
    window: Any,
    softcap: float | None,
    base: jax.Array | None = None,
) -> jax.Array:
    """Causal attention of q [B, T, H, Dh] over the pages of each sequence (already holding
    this step's keys). `window` > 0 limits each query to its last `window` keys; `base` [B, T]
    (packed rows) is where each query's sequence starts in its row.

    The keys are visited in blocks of `ATTENTION_BLOCK` with an online softmax, in a loop that
    runs only over the blocks some query can see: the cost follows the step's real context, not
    the page table's width, and each block's keys stay in cache (on XLA:CPU, 3x faster than one
    softmax over the whole context at batch 16 and 300 tokens). A prompt chunk's context before
    its first query goes in blocks of `WIDE_BLOCK` keys.

    Where a row has few queries per KV head (decode and speculative rows: up to `FEW_QUERIES`),
    the scores are a multiply and a sum over the head dimension instead of a dot: XLA:CPU runs a
    batched dot of a few rows per (KV head, sequence) far below its speed, and this form fuses
    (SmolLM2, 30 layers, attention alone: batch 8 at 250 tokens of context 19 -> 12 ms, batch 32
    146 -> 86 ms; a whole int8 decode step of batch 16 74 -> 64 ms, a speculative one 160 -> 132
    ms). Values agree with the dot to float rounding, and a row's sum does not depend on the batch
    (tests/test_layers.py). The weighted sum of values stays a dot: as a multiply and a sum over
    the keys' axis, XLA:CPU rounds a row differently in batches of 8 and more."""
    B, T, H, Dh = q.shape
    L, K, P, S, stored = kv.k.shape  # stored: Dh, or Dh / 2 words of a packed pool
    packed = kv.k.dtype == PACKED_BF16
    G = H // K
    bp = max(1, min(ATTENTION_BLOCK // S, page_table.shape[1]))  # pages per block
    page_table = jnp.pad(page_table, ((0, 0), (0, -page_table.shape[1] % bp)))  # page 0: masked anyway
    row_pos = positions if base is None else jnp.where(positions >= 0, positions + base, -1)  # [B, T]
    query_pos = jnp.repeat(row_pos, G, axis=1)[None, :, :, None]  # [1, B, T*G, 1], query r = t*G + g
    start = 0 if base is None else jnp.repeat(base, G, axis=1)[None, :, :, None]
    valid = row_pos >= 0
    lowest = jnp.min(jnp.where(valid, row_pos, jnp.iinfo(jnp.int32).max))
    first = jnp.where(window > 0, jnp.maximum(lowest - window + 1, 0), 0) // (bp * S)
    last = jnp.maximum(jnp.max(row_pos) // (bp * S), first)  # at least one block: never 0 / 0
    qg = q.reshape(B, T, K, G, Dh).transpose(2, 0, 1, 3, 4).reshape(K, B, T * G, Dh)
    heads = (layer * K + jnp.arange(K, dtype=jnp.int32))[:, None, None] * P  # [K, 1, 1]
    # one (layer, head, page) is one row of S * Dh values: a gather of whole rows
    k_rows, v_rows = kv.k.reshape(L * K * P, S * stored), kv.v.reshape(L * K * P, S * stored)
    few = T * G <= FEW_QUERIES and (T == 1 or B > 1)  # one speculative row: the dots are faster (3.9 vs 7.8 ms)

    def gather(rows_of: jax.Array, rows: jax.Array, n: int, dtype: Any) -> jax.Array:
        """The pages `rows` [K, B, n] of one pool -> [K, B, n * S, Dh] (unpacked to `dtype`)."""
        x = rows_of[rows].reshape(K, B, n * S, stored)
        return unpack_bf16(x, dtype) if packed else x

    def block(n: int):
        """The loop body over blocks of `n` pages."""

        def body(i, carry):
            m, total, acc = carry
            rows = heads + jax.lax.dynamic_slice_in_dim(page_table, i * n, n, axis=1)[None]  # [K, B, n]
            f32 = jnp.float32
            k = gather(k_rows, rows, n, f32 if few else q.dtype)
            v = gather(v_rows, rows, n, q.dtype)
            if few:
                s = (qg.astype(f32)[:, :, :, None, :] * k.astype(f32)[:, :, None, :, :]).sum(-1) * scale
            else:
                s = jnp.einsum("kbrd,kbsd->kbrs", qg, k, preferred_element_type=jnp.float32) * scale
            if softcap:
                s = jnp.tanh(s / softcap) * softcap
            key_pos = i * n * S + jnp.arange(n * S, dtype=jnp.int32)  # row positions
            mask = (key_pos <= query_pos) & (key_pos >= start)
            mask &= (window <= 0) | (key_pos > query_pos - window)
            s = jnp.where(mask, s, _MASKED)
            m_new = jnp.maximum(m, s.max(axis=-1, keepdims=True))
            p = jnp.exp(s - m_new)
            fade = jnp.exp(m - m_new)  # 0 once a row meets its first visible key: what masked blocks added goes
            total = total * fade + tree_sum(p)
            acc = acc * fade + jnp.einsum("kbrs,kbsd->kbrd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            return m_new, total, acc

        return body

    carry = (
        jnp.full((K, B, T * G, 1), _MASKED, jnp.float32),
        jnp.zeros((K, B, T * G, 1), jnp.float32),
        jnp.zeros((K, B, T * G, Dh), jnp.float32),
    )
    wide = WIDE_BLOCK // ATTENTION_BLOCK  # blocks per wide block
    if B == 1 and not few and page_table.shape[1] >= wide * bp:
        # a prompt chunk's context before its first query, in wide blocks; then blocks from there on
        below = jnp.minimum(lowest, jnp.max(row_pos)) // (wide * bp * S)  # -1: no query in the row
        begin = first // wide
        carry = jax.lax.fori_loop(begin, jnp.maximum(below, begin), block(wide * bp), carry)
        first = jnp.maximum(first, below * wide)  # never past `last`: `below` is at most the last query's block
    _, total, acc = jax.lax.fori_loop(first, last + 1, block(bp), carry)
    out = (acc / total).astype(q.dtype)  # [K, B, T*G, Dh]
    return out.reshape(K, B, T, G, Dh).transpose(1, 2, 0, 3, 4).reshape(B, T, H, Dh)


class Segment(NamedTuple):
    """Rows of one shape within a step: `[B, T]` tokens, each row one sequence's run of positions.
    A step is one segment (a prefill chunk or a decode batch) or several (a mixed step: the decode
    rows and a prefill chunk); the dense layers run on all their tokens at once, attention on each
    segment in its own shape."""

    page_table: jax.Array  # i32 [B, W]
    positions: jax.Array  # i32 [B, T], -1 = padding
    rope: tuple[jax.Array, jax.Array]  # cos, sin [B, T, Dh] (the rotary tables of this layer's kind)
    base: jax.Array | None = None  # i32 [B, T]: a packed row's start of each token's sequence


def flatten(hs: tuple[jax.Array, ...]) -> jax.Array:
    """Per-segment hidden [B_i, T_i, D] -> all the step's tokens [N, D]."""
    flat = [h.reshape(-1, h.shape[-1]) for h in hs]
    return flat[0] if len(flat) == 1 else jnp.concatenate(flat)


def unflatten(x: jax.Array, segs: tuple[Segment, ...]) -> tuple[jax.Array, ...]:
    """[N, ...] -> per-segment [B_i, T_i, ...]."""
    out, start = [], 0
    for seg in segs:
        B, T = seg.positions.shape
        out.append(x[start : start + B * T].reshape(B, T, *x.shape[1:]))
        start += B * T
    return tuple(out)


def attention(
    cfg: ModelConfig, lw: LayerWeights, x: jax.Array, segs: tuple[Segment, ...], kv: KVCache, layer: Any, window: Any
) -> tuple[jax.Array, KVCache]:
    """Fused q|k|v projection, optional q/k norm, rotary, KV write and paged attention, per segment.
    x: [N, D], the step's tokens segment after segment."""
    H, K, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qkv = linear(x, lw.qkv)  # [N, (H + 2K) * Dh]
    if lw.qkv_bias is not None:
        qkv = qkv + lw.qkv_bias
    qs, ks, vs = [], [], []
    for part, seg in zip(unflatten(qkv, segs), segs, strict=True):
        B, T = seg.positions.shape
        q = part[..., : H * Dh].reshape(B, T, H, Dh)
        k = part[..., H * Dh : (H + K) * Dh].reshape(B, T, K, Dh)
        v = part[..., (H + K) * Dh :].reshape(B, T, K, Dh)
        if lw.q_norm is not None:
            q = rms_norm(q, lw.q_norm, cfg.rms_norm_eps, cfg.norm_plus_one)
            k = rms_norm(k, lw.k_norm, cfg.rms_norm_eps, cfg.norm_plus_one)
        cos, sin = seg.rope
        qs.append(apply_rope(q, cos, sin))
        ks.append(apply_rope(k, cos, sin).reshape(B * T, K, Dh))
        vs.append(v.reshape(B * T, K, Dh))
    # every segment's keys are written before any is read: one scatter per cache, in place (a
    # write after another segment's read would make XLA copy the whole pool)
    slots = [kv_slots(seg.page_table, seg.positions, kv.page_size, seg.base) for seg in segs]
    slots = tuple(jnp.concatenate(x) for x in zip(*slots, strict=True))
    kv = KVCache(write_kv(kv.k, layer, jnp.concatenate(ks), slots), write_kv(kv.v, layer, jnp.concatenate(vs), slots))
    outs = []
    for q, seg in zip(qs, segs, strict=True):
        B, T = seg.positions.shape
        if kernels.decode_kernel_applies(cfg, kv.k, window, seg.positions, seg.base):  # GPU/TPU decode only
            out = kernels.paged_decode(
                q, kv.k, kv.v, layer, seg.page_table, seg.positions,
                scale=cfg.attn_scale, softcap=cfg.attn_logit_softcap,
            )  # fmt: skip
        else:
            out = paged_attention(
                q, kv, layer, seg.page_table, seg.positions,
                scale=cfg.attn_scale, window=window, softcap=cfg.attn_logit_softcap, base=seg.base,
            )  # fmt: skip
        outs.append(out.reshape(B, T, H * Dh))
    out = linear(flatten(tuple(outs)), lw.o)
    if lw.o_bias is not None:
        out = out + lw.o_bias
    return out, kv


def mlp(cfg: ModelConfig, lw: LayerWeights, x: jax.Array) -> jax.Array:
    # gate and up stay float32 until their product (a bfloat16 model's activation function in
    # bfloat16 took 3.6x as long on XLA:CPU: 0.93 against 0.26 ms at 256 tokens of SmolLM2)
    gate, up = jnp.split(linear(x, lw.gate_up, jnp.float32), 2, axis=-1)
    if cfg.hidden_act in ("gelu_pytorch_tanh", "gelu_tanh"):
        act = jax.nn.gelu(gate, approximate=True)
    elif cfg.hidden_act in ("silu", "swish"):
        act = jax.nn.silu(gate)
    else:
        raise ValueError(f"unsupported activation {cfg.hidden_act!r}")
    return linear((act * up).astype(x.dtype), lw.down)


def unembed(w: Weights, cfg: ModelConfig, h: jax.Array) -> jax.Array:
    """Final-normed hidden [..., D] -> float32 logits [..., V] (with Gemma's soft-capping)."""
    if w.lm_head is None:  # tied

        def product(x: jax.Array) -> jax.Array:
            return jnp.einsum("...d,vd->...v", x, w.embed, preferred_element_type=jnp.float32)

        if h.dtype == jnp.float32:
            logits = product(h)
        else:  # a bfloat16 row alone: XLA:CPU copied the whole matrix to float32 first (SmolLM2: 35 -> 4 ms)
            logits = on_rows(product, h)
    else:
        logits = linear(h, w.lm_head, jnp.float32)
    if cfg.final_logit_softcap:
        logits = jnp.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
    return logits
