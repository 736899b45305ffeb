"""Every parameter declared once: shape and logical axes. Init, abstract shapes and shardings
derive from these declarations (`graph/sharding.py` maps logical axes to mesh axes).

Layer weights are stacked on a leading "layers" axis so the forward pass can `lax.scan` them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # the `dtype` option
Params = dict[str, Any]  # {"embed": Array, ..., "layers": {"q": Array, ...}}


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical axis names, one per dim
    init: str = "normal"  # normal | zeros | ones (the neutral value of a norm weight)


def describe(cfg: ModelConfig) -> Params:
    """The parameter tree of `cfg` as ParamSpecs."""
    L, D, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    H, K, Dh, V = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
    # Gemma's norms scale by (1 + w), so their neutral weight is 0; Llama's by w, neutral 1.
    norm_init = "zeros" if cfg.family == "gemma" else "ones"

    def norm(*layers: int) -> ParamSpec:  # norm(L): one per layer; norm(): a single one
        return ParamSpec((*layers, D), ("layers",) * len(layers) + ("norm",), norm_init)

    layers: Params = {
        "attn_norm": norm(L),
        "q": ParamSpec((L, D, H, Dh), ("layers", "embed", "heads", "head_dim")),
        "k": ParamSpec((L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim")),
        "v": ParamSpec((L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim")),
        "o": ParamSpec((L, H, Dh, D), ("layers", "heads", "head_dim", "embed")),
        "mlp_norm": norm(L),
        "gate": ParamSpec((L, D, F), ("layers", "embed", "mlp")),
        "up": ParamSpec((L, D, F), ("layers", "embed", "mlp")),
        "down": ParamSpec((L, F, D), ("layers", "mlp", "embed")),
    }
    if cfg.qkv_bias:
        layers["q_bias"] = ParamSpec((L, H, Dh), ("layers", "heads", "head_dim"), "zeros")
        layers["k_bias"] = ParamSpec((L, K, Dh), ("layers", "kv_heads", "head_dim"), "zeros")
        layers["v_bias"] = ParamSpec((L, K, Dh), ("layers", "kv_heads", "head_dim"), "zeros")
    if cfg.o_bias:
        layers["o_bias"] = ParamSpec((L, D), ("layers", "norm"), "zeros")
    if cfg.qk_norm:
        layers["q_norm"] = ParamSpec((L, Dh), ("layers", "head_dim"), norm_init)
        layers["k_norm"] = ParamSpec((L, Dh), ("layers", "head_dim"), norm_init)
    if cfg.family == "gemma":  # sandwich norms around both blocks
        layers["post_attn_norm"] = norm(L)
        layers["post_mlp_norm"] = norm(L)
    tree: Params = {
        "embed": ParamSpec((V, D), ("vocab", "embed")),
        "final_norm": norm(),
        "layers": layers,
    }
    if not cfg.tie_word_embeddings:
        tree["lm_head"] = ParamSpec((D, V), ("embed", "vocab"))
    return tree


def _is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def map_specs(fn: Callable[[ParamSpec], Any], tree: Params) -> Any:
    return jax.tree.map(fn, tree, is_leaf=_is_spec)


def abstract_params(cfg: ModelConfig, dtype: Any, unrolled: bool = False) -> Any:
    """ShapeDtypeStructs of the parameters (for `.lower()` without materializing weights)."""
    tree = map_specs(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), describe(cfg))
    if unrolled:
        tree["layers"] = [
            jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), tree["layers"])
            for _ in range(cfg.num_layers)
        ]
    return tree


def unroll_layers(params: Params) -> Params:
    """Stacked layer weights -> a list of per-layer buffers, for the unrolled layer loop.

    On CPU, XLA copies each layer's slice out of a stacked array inside `lax.scan` before its
    matrix products, which halves decode speed; separate buffers avoid the copy (compilation then
    grows with depth). Split on the host: slicing on the device would compile small programs.
    """
    host = jax.tree.map(np.asarray, params["layers"])
    n = len(next(iter(host.values())))
    layers = [jax.tree.map(lambda a, i=i: jax.device_put(np.ascontiguousarray(a[i])), host) for i in range(n)]
    return {**params, "layers": layers}


def init_params(cfg: ModelConfig, seed: int = 0, dtype: Any = jnp.float32, scale: float = 0.02) -> Params:
    """Random parameters (tests and benchmarks without weights), made on the host."""
    rng = np.random.default_rng(seed)

    def make(s: ParamSpec) -> jax.Array:
        if s.init == "zeros":
            value = np.zeros(s.shape, np.float32)
        elif s.init == "ones":
            value = np.ones(s.shape, np.float32)
        else:
            value = rng.normal(0.0, scale, s.shape).astype(np.float32)
        return jnp.asarray(value, dtype)

    return map_specs(make, describe(cfg))


def num_params(cfg: ModelConfig) -> int:
    return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(describe(cfg), is_leaf=_is_spec))
