"""How the weights sit on the device, chosen per backend: the layer loop (per-layer buffers on
XLA:CPU, where `lax.scan` copies each layer's slice of a stacked weight before using it, run as
one executable per layer: `layered`; `scan` elsewhere, where the slice fuses) and the int8
lowering (`--quantize int8`: int8 x int8 dots on CPU, weight-only int8 on GPU/TPU; see
`models/quant.py`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from graph.api import EngineConfig
from models.config import ModelConfig
from models.params import DTYPES, Weights, abstract_weights, prepare


def layer_loop(config: EngineConfig) -> str:
    """The loop the executables use (graph/programs.py): `auto` resolved for this backend."""
    if config.layer_loop != "auto":
        return config.layer_loop
    return "layered" if jax.default_backend() == "cpu" else "scan"


def weight_options(config: EngineConfig) -> dict[str, Any]:
    return {
        "unrolled": layer_loop(config) in ("unroll", "layered"),
        "quantize": None if config.quantize == "none" else config.quantize,
        "act_quant": jax.default_backend() == "cpu",
    }


def device_weights(params: dict[str, Any], cfg: ModelConfig, config: EngineConfig) -> Weights:
    """The loaded (checkpoint-form) parameters in compute form, on the device. Done on the host
    with numpy: a start from AOT artifacts must not compile even small programs."""
    host = jax.tree.map(np.asarray, params)
    return jax.tree.map(jax.device_put, prepare(host, cfg, xp=np, **weight_options(config)))


def abstract_device_weights(cfg: ModelConfig, dtype: str, config: EngineConfig) -> Weights:
    return abstract_weights(cfg, DTYPES[dtype], **weight_options(config))


def weight_bytes(weights: Any) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(weights))
