"""Gemma 2 / Gemma 3 text decoder as pure functions, built from the Llama family's blocks.

Differences from Llama: RMSNorm scales by (1 + w); embeddings are scaled by sqrt(hidden);
sandwich norms (a norm after attention and after the MLP, before each residual add); gelu-tanh;
attention and final-logit soft-capping (Gemma 2); interleaved sliding-window and global layers,
each kind with its own rotary base (Gemma 3); q/k norm (Gemma 3). All come from the config.
"""

from __future__ import annotations

from typing import Any

import jax

from models.config import ModelConfig
from models.layers import KVCache, attention, decoder, mlp, rms_norm, unembed


def block(cfg: ModelConfig, lp, h, kv, layer, page_table, positions, rope, window):
    eps = cfg.rms_norm_eps
    with jax.named_scope("attention"):
        x = rms_norm(h, lp["attn_norm"], eps, True)
        out, kv = attention(cfg, lp, x, kv, layer, page_table, positions, rope, window)
        h = h + rms_norm(out, lp["post_attn_norm"], eps, True)
    with jax.named_scope("mlp"):
        out = mlp(cfg, lp, rms_norm(h, lp["mlp_norm"], eps, True))
        h = h + rms_norm(out, lp["post_mlp_norm"], eps, True)
    return h, kv


def hidden(
    params: dict[str, Any],
    cfg: ModelConfig,
    tokens: jax.Array,  # [B, T] int32
    positions: jax.Array,  # [B, T] int32, -1 for padding
    kv: KVCache,
    page_table: jax.Array,  # [B, W] int32
) -> tuple[jax.Array, KVCache]:
    """-> (final-normed hidden states [B, T, D], updated kv)."""
    return decoder(params, cfg, tokens, positions, kv, page_table, block, embed_scale=True)


def forward(params, cfg: ModelConfig, tokens, positions, kv: KVCache, page_table):
    """-> (float32 logits [B, T, V], updated kv)."""
    h, kv = hidden(params, cfg, tokens, positions, kv, page_table)
    return unembed(params, cfg, h), kv
