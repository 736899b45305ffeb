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
from jax.sharding import Mesh

from graph import sharding
from graph.api import EngineConfig
from models.config import ModelConfig
from models.layers import PACKED_BF16
from models.params import DTYPES, Weights, abstract_weights, compute_axes, prepare


def pipelined(config: EngineConfig) -> bool:
    """Whether the engine looks one step ahead: `pipeline`, where auto is on except on CPU (there
    the host's ~5 ms of a step slowed the device's 2 cores by more than it hid: 20% fewer tokens/s)."""
    if config.pipeline != "auto":
        return config.pipeline == "on"
    return jax.default_backend() != "cpu"


def kv_dtype(config: EngineConfig, model_dtype: str) -> str:
    """The KV pool's values: `kv_cache_dtype`, where auto is the model's dtype."""
    return model_dtype if config.kv_cache_dtype == "auto" else config.kv_cache_dtype


def kv_storage(config: EngineConfig, model_dtype: str) -> tuple[Any, bool]:
    """(the pool's dtype, packed): bfloat16 values sit in pairs in 32-bit words on CPU, whose
    gather of 16-bit rows is ~100x slower (models/layers.py `PACKED_BF16`)."""
    dtype = kv_dtype(config, model_dtype)
    if dtype == "bfloat16" and jax.default_backend() == "cpu":
        return PACKED_BF16, True
    return DTYPES[dtype], False


def layer_loop(config: EngineConfig) -> str:
    """The loop the executables use (graph/programs.py): `auto` resolved for this backend."""
    if config.layer_loop != "auto":
        return config.layer_loop
    return "layered" if jax.default_backend() == "cpu" else "scan"


def int8_activations() -> bool:
    """Whether int8 weights multiply int8 activations (W8A8: XLA:CPU runs int8 x int8 with
    YNNPACK) rather than being dequantized into the product (GPU/TPU fuse that): models/quant.py."""
    return jax.default_backend() == "cpu"


def weight_options(config: EngineConfig) -> dict[str, Any]:
    return {
        "unrolled": layer_loop(config) in ("unroll", "layered"),
        "quantize": None if config.quantize == "none" else config.quantize,
        "act_quant": int8_activations(),
    }


def mesh_of(config: EngineConfig) -> Mesh:
    return sharding.make_mesh(config.data_parallel, config.tensor_parallel)


def check_mesh(cfg: ModelConfig, config: EngineConfig) -> None:
    """MeshError (a ValueError, naming what would work) if this model cannot run on the mesh asked for."""
    sharding.check(cfg.num_kv_heads, cfg.num_heads, config.tensor_parallel, config.data_parallel, jax.device_count())


def device_weights(params: dict[str, Any], cfg: ModelConfig, config: EngineConfig) -> Weights:
    """The loaded (checkpoint-form) parameters in compute form, on the mesh, each array in its
    sharding. Done on the host with numpy: a start from AOT artifacts must not compile even small
    programs."""
    host = prepare(jax.tree.map(np.asarray, params), cfg, xp=np, **weight_options(config))
    return jax.device_put(host, weight_shardings(cfg, str(np.dtype(params["embed"].dtype)), config))


def abstract_device_weights(cfg: ModelConfig, dtype: str, config: EngineConfig) -> Weights:
    """The compute-form weights as ShapeDtypeStructs carrying their shardings on the mesh."""
    return sharding.attach(*_placed(cfg, dtype, config))


def weight_shardings(cfg: ModelConfig, dtype: str, config: EngineConfig) -> Weights:
    return _placed(cfg, dtype, config)[1]


def _placed(cfg: ModelConfig, dtype: str, config: EngineConfig) -> tuple[Weights, Weights]:
    """(the compute-form weights' ShapeDtypeStructs, their NamedShardings on the mesh)."""
    abstract = abstract_weights(cfg, DTYPES[dtype], **weight_options(config))
    return abstract, sharding.tree_shardings(mesh_of(config), abstract, compute_axes(abstract))


def weight_bytes(weights: Any) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(weights))


def weight_bytes_per_device(cfg: ModelConfig, dtype: str, config: EngineConfig) -> int:
    """What one device of the mesh holds of the compute-form weights."""
    return sharding.per_device_bytes(*_placed(cfg, dtype, config))
