"""Weight loading as data: a table from Hugging Face tensor names to parameter paths and layout
transforms, applied to any stream of (name, array) pairs (safetensors files or a dequantized GGUF).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from models.config import ModelConfig
from models.errors import ModelLoadError
from models.params import ParamSpec, describe

log = logging.getLogger("models.weights")

# HF layout -> ours. Shapes: HF linear weights are [out, in]; ours are [in, ...out].
_TRANSFORMS = {
    None: (lambda w, s: w, lambda s: s),
    "T": (lambda w, s: w.T, lambda s: s[::-1]),
    "heads_in": (lambda w, s: w.T.reshape(s), lambda s: (s[1] * s[2], s[0])),  # [H*Dh, D] -> [D, H, Dh]
    "heads_out": (lambda w, s: w.T.reshape(s), lambda s: (s[2], s[0] * s[1])),  # [D, H*Dh] -> [H, Dh, D]
    "heads": (lambda w, s: w.reshape(s), lambda s: (s[0] * s[1],)),  # bias [H*Dh] -> [H, Dh]
}

GLOBAL_TABLE: dict[str, tuple[str, str | None]] = {
    "embed_tokens.weight": ("embed", None),
    "norm.weight": ("final_norm", None),
    "lm_head.weight": ("lm_head", "T"),
}

LAYER_TABLE: dict[str, tuple[str, str | None]] = {
    "input_layernorm.weight": ("attn_norm", None),
    "self_attn.q_proj.weight": ("q", "heads_in"),
    "self_attn.k_proj.weight": ("k", "heads_in"),
    "self_attn.v_proj.weight": ("v", "heads_in"),
    "self_attn.o_proj.weight": ("o", "heads_out"),
    "self_attn.q_proj.bias": ("q_bias", "heads"),
    "self_attn.k_proj.bias": ("k_bias", "heads"),
    "self_attn.v_proj.bias": ("v_bias", "heads"),
    "self_attn.o_proj.bias": ("o_bias", None),
    "self_attn.q_norm.weight": ("q_norm", None),
    "self_attn.k_norm.weight": ("k_norm", None),
    "post_attention_layernorm.weight": ("mlp_norm", None),  # Gemma: see _layer_entry
    "pre_feedforward_layernorm.weight": ("mlp_norm", None),
    "post_feedforward_layernorm.weight": ("post_mlp_norm", None),
    "mlp.gate_proj.weight": ("gate", "T"),
    "mlp.up_proj.weight": ("up", "T"),
    "mlp.down_proj.weight": ("down", "T"),
}

_PREFIXES = ("model.language_model.", "language_model.model.", "model.", "")
_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)")
_IGNORED = ("rotary_emb.inv_freq",)


def _layer_entry(cfg: ModelConfig, suffix: str) -> tuple[str, str | None] | None:
    if cfg.sandwich_norms and suffix == "post_attention_layernorm.weight":
        return ("post_attn_norm", None)
    return LAYER_TABLE.get(suffix)


def _route(cfg: ModelConfig, name: str) -> tuple[str, int | None, str | None] | None:
    """HF name -> (param name, layer index or None, transform), or None if not ours."""
    if name == "lm_head.weight":
        return ("lm_head", None, "T")
    for prefix in _PREFIXES:
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix) :]
        if (m := _LAYER_RE.fullmatch(rest)) and (entry := _layer_entry(cfg, m.group(2))):
            return (entry[0], int(m.group(1)), entry[1])
        if rest in GLOBAL_TABLE:
            key, transform = GLOBAL_TABLE[rest]
            return (key, None, transform)
    return None


def np_dtype(dtype: Any) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(jnp.dtype(dtype))


def assemble_params(
    cfg: ModelConfig,
    tensors: Iterable[tuple[str, np.ndarray, Path | str]],
    dtype: Any = jnp.float32,
    *,
    source: str,
    total: int | None = None,
) -> dict[str, Any]:
    """Place HF-named tensors into the stacked parameter tree of `cfg`, checking every shape and
    that nothing is missing. Each error names the file (`source` for the whole checkpoint)."""
    specs = describe(cfg)
    flat_specs: dict[str, ParamSpec] = {k: v for k, v in specs.items() if k != "layers"}
    layer_specs: dict[str, ParamSpec] = specs["layers"]
    target = np_dtype(dtype)
    out = {k: np.empty(s.shape, target) for k, s in flat_specs.items()}
    layers = {k: np.empty(s.shape, target) for k, s in layer_specs.items()}
    seen: set[tuple[str, int | None]] = set()
    started, last_log, count = time.monotonic(), time.monotonic(), 0
    for name, array, source in tensors:
        route = _route(cfg, name)
        if route is None:
            if not name.endswith(_IGNORED):
                log.warning("%s: ignoring tensor %s (not used by %s)", source, name, cfg.model_type)
            continue
        key, layer, transform = route
        if key == "lm_head" and cfg.tie_word_embeddings:
            continue  # tied: the embedding is the output head
        spec = (layer_specs if layer is not None else flat_specs).get(key)
        if spec is None:
            raise ModelLoadError(f"{source}: tensor {name} does not fit the config ({key} is not a parameter)")
        shape = spec.shape[1:] if layer is not None else spec.shape
        apply, hf_shape = _TRANSFORMS[transform]
        if tuple(array.shape) != tuple(hf_shape(shape)):
            raise ModelLoadError(
                f"{source}: tensor {name} has shape {tuple(array.shape)} but the config "
                f"implies {tuple(hf_shape(shape))}"
            )
        if layer is not None and layer >= cfg.num_layers:
            raise ModelLoadError(f"{source}: tensor {name} is for layer {layer}, config has {cfg.num_layers}")
        value = apply(np.asarray(array), shape).astype(target)
        if layer is None:
            out[key][...] = value
        else:
            layers[key][layer] = value
        seen.add((key, layer))
        count += 1
        if time.monotonic() - last_log > 1.0:
            last_log = time.monotonic()
            log.info("loaded %d%s tensors", count, f"/{total}" if total else "")
    missing = [k for k in flat_specs if (k, None) not in seen]
    missing += [f"layers.{i}.{k}" for k in layer_specs for i in range(cfg.num_layers) if (k, i) not in seen]
    if missing:
        raise ModelLoadError(
            f"{source}: missing weights for {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
        )
    log.info("loaded %d tensors in %.1fs", count, time.monotonic() - started)
    tree = {**out, "layers": layers}
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)
