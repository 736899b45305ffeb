"""The decoder of every supported family (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2, Gemma 2/3) as
pure functions over the compute-form weights (`models/params.py: Weights`).

Pre-norm blocks: h += attn(norm(h)); h += mlp(norm(h)). The families differ only through config
fields: llama3/linear rope scaling, Qwen2's q/k/v bias, Qwen3's and Gemma 3's per-head q/k norm,
sliding windows (Mistral; interleaved with global layers, each kind with its own rotary base, in
Gemma 2/3), and Gemma's (1 + w) norms, sqrt(D) embedding scale, sandwich norms, gelu-tanh and
soft-capping.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.config import ModelConfig
from models.layers import KVCache, Segment, attention, flatten, mlp, rms_norm, rope_tables, unembed, unflatten
from models.params import LayerWeights, Weights


def block(cfg: ModelConfig, lw: LayerWeights, h, segs: tuple[Segment, ...], kv: KVCache, layer, window):
    """One decoder layer over all the step's tokens h [N, D]: -> (h, kv). `layer` and `window` are
    ints (unrolled) or traced (scan)."""
    eps, plus_one = cfg.rms_norm_eps, cfg.norm_plus_one
    with jax.named_scope("attention"):
        x = rms_norm(h, lw.attn_norm, eps, plus_one)
        out, kv = attention(cfg, lw, x, segs, kv, layer, window)
        if cfg.sandwich_norms:
            out = rms_norm(out, lw.post_attn_norm, eps, plus_one)
        h = h + out
    with jax.named_scope("mlp"):
        out = mlp(cfg, lw, rms_norm(h, lw.mlp_norm, eps, plus_one))
        if cfg.sandwich_norms:
            out = rms_norm(out, lw.post_mlp_norm, eps, plus_one)
        h = h + out
    return h, kv


def segments(page_tables, positions, ropes, sliding, bases=None) -> tuple[Segment, ...]:
    """A layer's segments: each with the rotary tables of the layer's kind (`sliding`: a bool or
    a traced one) picked from its (global, local) pair, and its packed-row bases (or None)."""

    def pick(pair):
        if isinstance(sliding, bool):
            return pair[1] if sliding else pair[0]
        return jax.tree.map(lambda g, loc: jnp.where(sliding, loc, g), *pair)

    bases = bases or (None,) * len(positions)
    return tuple(Segment(t, p, pick(r), b) for t, p, r, b in zip(page_tables, positions, ropes, bases, strict=True))


def embed(w: Weights, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] -> h [B, T, D]."""
    h = w.embed[tokens]
    if cfg.embed_scale:
        h = h * jnp.asarray(cfg.hidden_size**0.5, h.dtype)
    return h


Rope = tuple[jax.Array, jax.Array]


def ropes_for(cfg: ModelConfig, positions: jax.Array) -> tuple[Rope, Rope]:
    """(global, local) rotary tables for `positions` (the same pair without a local base)."""
    global_rope = rope_tables(cfg.rope, cfg.head_dim, positions)
    local_rope = rope_tables(cfg.rope_local, cfg.head_dim, positions) if cfg.rope_local else global_rope
    return global_rope, local_rope


def windows(cfg: ModelConfig) -> list[int]:
    """Each layer's sliding window (0: global attention)."""
    return [(cfg.sliding_window or 0) if s else 0 for s in cfg.sliding_flags]


def final_norm(w: Weights, cfg: ModelConfig, h: jax.Array) -> jax.Array:
    return rms_norm(h, w.final_norm, cfg.rms_norm_eps, cfg.norm_plus_one)


def hidden(
    w: Weights,
    cfg: ModelConfig,
    tokens: tuple[jax.Array, ...],  # per segment [B, T] int32
    positions: tuple[jax.Array, ...],  # per segment [B, T] int32, -1 for padding
    kv: KVCache,
    page_tables: tuple[jax.Array, ...],  # per segment [B, W] int32
    bases: tuple[jax.Array | None, ...] | None = None,  # per segment [B, T] int32 (packed rows) or None
) -> tuple[tuple[jax.Array, ...], KVCache]:
    """Embedding, the layers (unrolled over a list, or `lax.scan` over stacked weights), and the
    final norm, over one or several segments: -> (per-segment hidden [B, T, D], kv)."""
    h = flatten(tuple(embed(w, cfg, t) for t in tokens))
    ropes = tuple(ropes_for(cfg, p) for p in positions)
    if isinstance(w.layers, list):
        for i, lw in enumerate(w.layers):
            segs = segments(page_tables, positions, ropes, bool(cfg.sliding_flags[i]), bases)
            h, kv = block(cfg, lw, h, segs, kv, i, windows(cfg)[i])
    else:

        def step(carry, xs):
            h, kv = carry
            lw, layer, is_sliding, window = xs
            segs = segments(page_tables, positions, ropes, is_sliding, bases)
            return block(cfg, lw, h, segs, kv, layer, window), None

        xs = (
            w.layers,
            jnp.arange(cfg.num_layers, dtype=jnp.int32),
            jnp.asarray(cfg.sliding_flags),
            jnp.asarray(windows(cfg), jnp.int32),
        )
        (h, kv), _ = jax.lax.scan(step, (h, kv), xs)
    h = final_norm(w, cfg, h)
    return unflatten(h, segments(page_tables, positions, ropes, False)), kv


def forward(w: Weights, cfg: ModelConfig, tokens, positions, kv: KVCache, page_table):
    """One segment -> (float32 logits [B, T, V], updated kv)."""
    (h,), kv = hidden(w, cfg, (tokens,), (positions,), kv, (page_table,))
    return unembed(w, cfg, h), kv
