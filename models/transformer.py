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
from models.layers import KVCache, attention, mlp, rms_norm, rope_tables, unembed
from models.params import LayerWeights, Weights


def block(cfg: ModelConfig, lw: LayerWeights, h, kv: KVCache, layer, page_table, positions, rope, window):
    """One decoder layer: -> (h, kv). `layer` and `window` are ints (unrolled) or traced (scan)."""
    eps, plus_one = cfg.rms_norm_eps, cfg.norm_plus_one
    with jax.named_scope("attention"):
        x = rms_norm(h, lw.attn_norm, eps, plus_one)
        out, kv = attention(cfg, lw, x, kv, layer, page_table, positions, rope, window)
        if cfg.sandwich_norms:
            out = rms_norm(out, lw.post_attn_norm, eps, plus_one)
        h = h + out
    with jax.named_scope("mlp"):
        out = mlp(cfg, lw, rms_norm(h, lw.mlp_norm, eps, plus_one))
        if cfg.sandwich_norms:
            out = rms_norm(out, lw.post_mlp_norm, eps, plus_one)
        h = h + out
    return h, kv


def embed(w: Weights, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] -> h [B, T, D]."""
    h = w.embed[tokens]
    if cfg.embed_scale:
        h = h * jnp.asarray(cfg.hidden_size**0.5, h.dtype)
    return h


Rope = tuple[jax.Array, jax.Array]


def ropes(cfg: ModelConfig, positions: jax.Array) -> tuple[Rope, Rope]:
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
    tokens: jax.Array,  # [B, T] int32
    positions: jax.Array,  # [B, T] int32, -1 for padding
    kv: KVCache,
    page_table: jax.Array,  # [B, W] int32
) -> tuple[jax.Array, KVCache]:
    """Embedding, the layers (unrolled over a list, or `lax.scan` over stacked weights), and the
    final norm: -> (hidden [B, T, D], kv)."""
    h = embed(w, cfg, tokens)
    global_rope, local_rope = ropes(cfg, positions)
    if isinstance(w.layers, list):
        for i, lw in enumerate(w.layers):
            rope = local_rope if cfg.sliding_flags[i] else global_rope
            h, kv = block(cfg, lw, h, kv, i, page_table, positions, rope, windows(cfg)[i])
    else:

        def step(carry, xs):
            h, kv = carry
            lw, layer, is_sliding, window = xs
            rope = jax.tree.map(lambda g, loc: jnp.where(is_sliding, loc, g), global_rope, local_rope)
            return block(cfg, lw, h, kv, layer, page_table, positions, rope, window), None

        xs = (
            w.layers,
            jnp.arange(cfg.num_layers, dtype=jnp.int32),
            jnp.asarray(cfg.sliding_flags),
            jnp.asarray(windows(cfg), jnp.int32),
        )
        (h, kv), _ = jax.lax.scan(step, (h, kv), xs)
    return final_norm(w, cfg, h), kv


def forward(w: Weights, cfg: ModelConfig, tokens, positions, kv: KVCache, page_table):
    """-> (float32 logits [B, T, V], updated kv)."""
    h, kv = hidden(w, cfg, tokens, positions, kv, page_table)
    return unembed(w, cfg, h), kv
