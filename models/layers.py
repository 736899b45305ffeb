"""Blocks shared by every architecture family: norms, rotary embeddings, attention over a paged
KV cache, the gated MLP, and the decoder skeleton (embed -> scanned layers -> norm -> logits).

Paged KV cache layout (the compile layer allocates it, models only read and write it):
  k, v: [L, P, S, K, Dh]  (layers, pages in the pool, tokens per page, kv heads, head dim)
  page_table: [B, W] int32, the pages of each sequence in order (unused entries may be anything
  valid, e.g. 0: causal masking hides them). Page 0 is scratch: padding tokens (position -1)
  write there, so a real sequence must never own page 0.
Token t of a sequence lives at page_table[b, t // S], slot t % S.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig, RopeConfig

_MASKED = -1e30  # finite, so a fully masked (padding) row gives a uniform softmax, not NaN


class KVCache(NamedTuple):
    k: jax.Array  # [L, P, S, K, Dh]
    v: jax.Array  # [L, P, S, K, Dh]

    @property
    def page_size(self) -> int:
        return self.k.shape[2]


def rms_norm(x: jax.Array, w: jax.Array, eps: float, plus_one: bool) -> jax.Array:
    """RMSNorm in float32. Gemma scales by (1 + w) in float32; Llama casts back, then scales by w."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
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


def write_kv(
    cache: jax.Array, layer: jax.Array, new: jax.Array, page_table: jax.Array, positions: jax.Array
) -> jax.Array:
    """Scatter new [B, T, K, Dh] into cache [L, P, S, K, Dh] at each token's page and slot."""
    page_size = cache.shape[2]
    valid = positions >= 0
    safe = jnp.where(valid, positions, 0)
    pages = jnp.take_along_axis(page_table, safe // page_size, axis=1)  # [B, T]
    pages = jnp.where(valid, pages, 0)
    slots = jnp.where(valid, safe % page_size, 0)
    return cache.at[layer, pages, slots].set(new.astype(cache.dtype))


def paged_attention(
    q: jax.Array,
    kv: KVCache,
    layer: jax.Array,
    page_table: jax.Array,
    positions: jax.Array,
    *,
    scale: float,
    window: jax.Array,
    softcap: float | None,
) -> jax.Array:
    """Causal attention of q [B, T, H, Dh] over the pages of each sequence (already holding
    this step's keys). `window` > 0 limits each query to its last `window` keys."""
    B, T, H, Dh = q.shape
    _, _, S, K, _ = kv.k.shape
    W = page_table.shape[1]
    k = kv.k[layer, page_table].reshape(B, W * S, K, Dh)  # [B, W*S, K, Dh]
    v = kv.v[layer, page_table].reshape(B, W * S, K, Dh)
    qg = q.reshape(B, T, K, H // K, Dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap:
        scores = jnp.tanh(scores / softcap) * softcap
    key_pos = jnp.arange(W * S, dtype=jnp.int32)[None, None, :]  # [1, 1, W*S]
    query_pos = positions[:, :, None]  # [B, T, 1]
    mask = key_pos <= query_pos
    mask &= (window <= 0) | (key_pos > query_pos - window)
    scores = jnp.where(mask[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(B, T, H, Dh)


def attention(
    cfg: ModelConfig,
    lp: dict[str, jax.Array],
    x: jax.Array,
    kv: KVCache,
    layer: jax.Array,
    page_table: jax.Array,
    positions: jax.Array,
    rope: tuple[jax.Array, jax.Array],
    window: jax.Array,
) -> tuple[jax.Array, KVCache]:
    """Projections, optional q/k norm, rotary, KV write and paged attention. x: [B, T, D]."""
    plus_one = cfg.family == "gemma"
    q = jnp.einsum("btd,dhk->bthk", x, lp["q"])
    k = jnp.einsum("btd,dhk->bthk", x, lp["k"])
    v = jnp.einsum("btd,dhk->bthk", x, lp["v"])
    if cfg.qkv_bias:
        q, k, v = q + lp["q_bias"], k + lp["k_bias"], v + lp["v_bias"]
    if cfg.qk_norm:
        q = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps, plus_one)
        k = rms_norm(k, lp["k_norm"], cfg.rms_norm_eps, plus_one)
    cos, sin = rope
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    kv = KVCache(write_kv(kv.k, layer, k, page_table, positions), write_kv(kv.v, layer, v, page_table, positions))
    out = paged_attention(
        q,
        kv,
        layer,
        page_table,
        positions,
        scale=cfg.attn_scale,
        window=window,
        softcap=cfg.attn_logit_softcap,
    )
    out = jnp.einsum("bthk,hkd->btd", out, lp["o"])
    if cfg.o_bias:
        out = out + lp["o_bias"]
    return out, kv


def mlp(cfg: ModelConfig, lp: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    gate = jnp.einsum("btd,df->btf", x, lp["gate"])
    up = jnp.einsum("btd,df->btf", x, lp["up"])
    if cfg.hidden_act in ("gelu_pytorch_tanh", "gelu_tanh"):
        act = jax.nn.gelu(gate, approximate=True)
    elif cfg.hidden_act in ("silu", "swish"):
        act = jax.nn.silu(gate)
    else:
        raise ValueError(f"unsupported activation {cfg.hidden_act!r}")
    return jnp.einsum("btf,fd->btd", act * up, lp["down"])


# A block: (cfg, layer params, h, kv, layer index, page_table, positions, rope, window) -> (h, kv)
Block = Callable[..., tuple[jax.Array, KVCache]]


def decoder(
    params: dict[str, Any],
    cfg: ModelConfig,
    tokens: jax.Array,
    positions: jax.Array,
    kv: KVCache,
    page_table: jax.Array,
    block: Block,
    embed_scale: bool,
) -> tuple[jax.Array, KVCache]:
    """Embedding, the layers under `lax.scan`, and the final norm: -> (hidden [B, T, D], kv)."""
    h = params["embed"][tokens]  # [B, T, D]
    if embed_scale:
        h = h * jnp.asarray(cfg.hidden_size**0.5, h.dtype)
    global_rope = rope_tables(cfg.rope, cfg.head_dim, positions)
    local_rope = rope_tables(cfg.rope_local, cfg.head_dim, positions) if cfg.rope_local else global_rope
    sliding = jnp.asarray(cfg.sliding_flags)
    windows = jnp.where(sliding, cfg.sliding_window or 0, 0).astype(jnp.int32)

    def step(carry, xs):
        h, kv = carry
        lp, layer, is_sliding, window = xs
        rope = jax.tree.map(lambda g, loc: jnp.where(is_sliding, loc, g), global_rope, local_rope)
        h, kv = block(cfg, lp, h, kv, layer, page_table, positions, rope, window)
        return (h, kv), None

    layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    if isinstance(params["layers"], list):  # per-layer buffers, unrolled (see models/params.py)
        carry = (h, kv)
        for i, lp in enumerate(params["layers"]):
            carry, _ = step(carry, (lp, i, cfg.sliding_flags[i], windows[i]))
        h, kv = carry
    else:
        (h, kv), _ = jax.lax.scan(step, (h, kv), (params["layers"], layer_ids, sliding, windows))
    return rms_norm(h, params["final_norm"], cfg.rms_norm_eps, cfg.family == "gemma"), kv


def unembed(params: dict[str, Any], cfg: ModelConfig, h: jax.Array) -> jax.Array:
    """Final-normed hidden [..., D] -> float32 logits [..., V] (with Gemma's soft-capping)."""
    if cfg.tie_word_embeddings:
        logits = jnp.einsum("...d,vd->...v", h, params["embed"], preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("...d,dv->...v", h, params["lm_head"], preferred_element_type=jnp.float32)
    if cfg.final_logit_softcap:
        logits = jnp.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
    return logits
