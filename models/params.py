"""Every parameter declared once: shape and logical axes. Init, abstract shapes and shardings
derive from these declarations (`graph/sharding.py` maps logical axes to mesh axes).

Two forms of the same weights:
- the checkpoint form (`describe`): a dict in Hugging Face's granularity, layer weights stacked on
  a leading "layers" axis. Loading, `init_params` and the parity tests use it.
- the compute form (`Weights`, made by `prepare`): typed pytrees with Q|K|V fused into one matrix
  and gate|up into one, matrices flattened to 2-D `[in, out]` (optionally int8, `models/quant.py`),
  and the layers either stacked (one `LayerWeights` with a leading axis, for `lax.scan`) or a list
  of per-layer `LayerWeights` (separate buffers, for an unrolled loop). On XLA:CPU a scanned layer's
  slice of a stacked array is copied before its matrix products, which costs ~1.7x at batch 1;
  TPU fuses the slice. `graph/` picks the form per backend.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models import quant as qt
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
    norm_init = "zeros" if cfg.norm_plus_one else "ones"

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
    if cfg.sandwich_norms:
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


def abstract_params(cfg: ModelConfig, dtype: Any) -> Any:
    """ShapeDtypeStructs of the checkpoint-form parameters."""
    return map_specs(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), describe(cfg))


Matrix = Any  # jax.Array [in, out] or QTensor


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerWeights:
    """One decoder layer in compute form (each leaf has a leading [L] axis when stacked)."""

    attn_norm: jax.Array  # [D]
    qkv: Matrix  # [D, (H + 2K) * Dh]: q heads, then k heads, then v heads
    o: Matrix  # [H * Dh, D]
    mlp_norm: jax.Array  # [D]
    gate_up: Matrix  # [D, 2F]: gate, then up
    down: Matrix  # [F, D]
    qkv_bias: jax.Array | None = None  # [(H + 2K) * Dh]
    o_bias: jax.Array | None = None  # [D]
    q_norm: jax.Array | None = None  # [Dh]
    k_norm: jax.Array | None = None  # [Dh]
    post_attn_norm: jax.Array | None = None  # [D] (sandwich norms)
    post_mlp_norm: jax.Array | None = None  # [D]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Weights:
    embed: jax.Array  # [V, D]
    final_norm: jax.Array  # [D]
    lm_head: Matrix | None  # [D, V]; None: tied to the embedding (embed^T)
    layers: LayerWeights | list[LayerWeights]  # stacked (scan) or one per layer (unrolled)


# Logical axes of each compute-form field (a stacked layer's have a leading "layers"); an int8
# `QTensor` has its matrix's axes on `q` (transposed: output, then input) and the output axis on
# `scale`.
COMPUTE_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),
    "final_norm": ("norm",),
    "lm_head": ("embed", "vocab"),
    "attn_norm": ("norm",),
    "qkv": ("embed", "heads"),  # q heads, then k and v heads: all split by head
    "o": ("heads", "embed"),
    "mlp_norm": ("norm",),
    "gate_up": ("embed", "mlp"),
    "down": ("mlp", "embed"),
    "qkv_bias": ("heads",),
    "o_bias": ("norm",),
    "q_norm": ("head_dim",),
    "k_norm": ("head_dim",),
    "post_attn_norm": ("norm",),
    "post_mlp_norm": ("norm",),
}


def compute_axes(weights: Weights) -> Any:
    """The logical axes of every array of `weights` (compute form), as a tree of the same shape
    whose leaves are tuples of axis names."""

    def axes(path, leaf) -> tuple[str | None, ...]:
        names = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]
        field = next(n for n in reversed(names) if n in COMPUTE_AXES)
        out: tuple[str | None, ...] = COMPUTE_AXES[field]
        if names[-1] == "scale":  # QTensor: one scale per output channel
            out = out[-1:]
        elif names[-1] == "q":  # QTensor: the matrix stored transposed, [..., out, in]
            out = (*out[:-2], out[-1], out[-2])
        lead = len(leaf.shape) - len(out)  # 1 for a stacked layer's leaf, else 0
        if lead not in (0, 1):
            raise ValueError(f"{jax.tree_util.keystr(path)}: shape {leaf.shape} does not fit axes {out}")
        return ("layers",) * lead + out

    return jax.tree_util.tree_map_with_path(axes, weights)


def prepare(params: Params, cfg: ModelConfig, *, unrolled: bool, quantize: str | None, act_quant: bool, xp=np):
    """Checkpoint form -> compute form (`Weights`). `xp` is numpy for real weights (done on the
    host: nothing compiles) or jax.numpy under `jax.eval_shape` for the abstract shapes."""
    lp, L, D = params["layers"], cfg.num_layers, cfg.hidden_size
    if quantize not in (None, "int8"):
        raise ValueError(f"unsupported quantization {quantize!r} (supported: int8)")

    def matrix(w):
        return qt.quantize(w, act_quant, xp) if quantize == "int8" else w

    def flat(name):  # [L, D, heads, Dh] -> [L, D, heads * Dh]
        return lp[name].reshape(L, D, -1)

    stacked = LayerWeights(
        attn_norm=lp["attn_norm"],
        qkv=matrix(xp.concatenate([flat("q"), flat("k"), flat("v")], axis=-1)),
        o=matrix(lp["o"].reshape(L, -1, D)),
        mlp_norm=lp["mlp_norm"],
        gate_up=matrix(xp.concatenate([lp["gate"], lp["up"]], axis=-1)),
        down=matrix(lp["down"]),
        qkv_bias=(xp.concatenate([lp[f"{n}_bias"].reshape(L, -1) for n in "qkv"], axis=-1) if cfg.qkv_bias else None),
        o_bias=lp.get("o_bias"),
        q_norm=lp.get("q_norm"),
        k_norm=lp.get("k_norm"),
        post_attn_norm=lp.get("post_attn_norm"),
        post_mlp_norm=lp.get("post_mlp_norm"),
    )
    layers = [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(L)] if unrolled else stacked
    head = params.get("lm_head")
    if quantize == "int8":  # the output head is the largest matrix of small models: int8 too
        head = matrix(params["embed"].T if head is None else head)
    return Weights(params["embed"], params["final_norm"], head, layers)


def abstract_weights(cfg: ModelConfig, dtype: Any, **options: Any) -> Weights:
    """ShapeDtypeStructs of `prepare(...)`'s result (for `.lower()` without weights)."""
    return jax.eval_shape(lambda p: prepare(p, cfg, xp=jnp, **options), abstract_params(cfg, dtype))


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
