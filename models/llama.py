"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2) as pure functions.

Pre-norm blocks: h += attn(norm(h)); h += mlp(norm(h)). Variants differ only through the config:
llama3 rope scaling, Qwen2's q/k/v bias, Qwen3's per-head q/k RMSNorm, Mistral's sliding window.
"""

from __future__ import annotations

from typing import Any

import jax

from models.config import ModelConfig
from models.layers import KVCache, attention, decoder, mlp, rms_norm, unembed


def block(cfg: ModelConfig, lp, h, kv, layer, page_table, positions, rope, window):
    eps = cfg.rms_norm_eps
    with jax.named_scope("attention"):
        out, kv = attention(
            cfg, lp, rms_norm(h, lp["attn_norm"], eps, False), kv, layer, page_table, positions, rope, window
        )
        h = h + out
    with jax.named_scope("mlp"):
        h = h + mlp(cfg, lp, rms_norm(h, lp["mlp_norm"], eps, False))
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
    return decoder(params, cfg, tokens, positions, kv, page_table, block, embed_scale=False)


def forward(params, cfg: ModelConfig, tokens, positions, kv: KVCache, page_table):
    """-> (float32 logits [B, T, V], updated kv)."""
    h, kv = hidden(params, cfg, tokens, positions, kv, page_table)
    return unembed(params, cfg, h), kv
