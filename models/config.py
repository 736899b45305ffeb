"""The model configuration: one frozen, hashable dataclass, static under `jax.jit`.

Built from a Hugging Face `config.json` dict (legacy `rope_theta`/`rope_scaling` or the
transformers-5 `rope_parameters` form) or from GGUF metadata converted to that dict.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from models.errors import ModelLoadError

LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm2")
GEMMA_TYPES = ("gemma2", "gemma3_text", "gemma3")
SUPPORTED_TYPES = LLAMA_TYPES + GEMMA_TYPES


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one attention kind (global or sliding)."""

    theta: float = 10000.0
    kind: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    rope: RopeConfig = RopeConfig()
    rope_local: RopeConfig | None = None  # Gemma 3: the sliding layers' own rotary base
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"  # silu | gelu_pytorch_tanh
    sliding_window: int | None = None
    layer_sliding: tuple[bool, ...] = ()  # per layer: does it use the sliding window
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # What sets Gemma apart from Llama, as data (models/transformer.py has no family branches):
    norm_plus_one: bool = False  # RMSNorm scales by (1 + w), so a neutral norm weight is 0
    embed_scale: bool = False  # embeddings are multiplied by sqrt(hidden_size)
    sandwich_norms: bool = False  # a norm after attention and after the MLP, before each residual add

    @property
    def attn_scale(self) -> float:
        scalar = self.query_pre_attn_scalar or self.head_dim
        return float(scalar) ** -0.5

    @property
    def sliding_flags(self) -> tuple[bool, ...]:
        return self.layer_sliding or (False,) * self.num_layers

    @classmethod
    def from_hf(cls, d: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
        """Build from a Hugging Face config dict; `source` names the file in errors."""
        model_type = d.get("model_type")
        if model_type is None and "text_config" in d:  # multimodal wrappers: take the text part
            return cls.from_hf({**d["text_config"], "model_type": "gemma3_text"}, source=source)
        if model_type not in SUPPORTED_TYPES:
            raise ModelLoadError(
                f"{source}: unsupported architecture {model_type!r} (supported: {', '.join(SUPPORTED_TYPES)})"
            )
        if model_type == "gemma3":
            model_type = "gemma3_text"
        try:
            return _from_hf(cls, model_type, d)
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"{source}: invalid or incomplete config ({e!r})") from e


def _rope_from(params: dict[str, Any] | None, default_theta: float) -> RopeConfig:
    params = params or {}
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"unsupported rope_type {kind!r} (supported: default, linear, llama3)")
    return RopeConfig(
        theta=float(params.get("rope_theta", default_theta)),
        kind=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position=int(params.get("original_max_position_embeddings", 8192)),
    )


def _ropes(model_type: str, d: dict[str, Any]) -> tuple[RopeConfig, RopeConfig | None]:
    """(global rope, local rope or None) from either config form."""
    legacy_theta = float(d.get("rope_theta") or 10000.0)
    params = d.get("rope_parameters")
    if params is None:  # legacy form
        scaling = dict(d.get("rope_scaling") or {})
        main = _rope_from({**scaling, "rope_theta": legacy_theta}, legacy_theta)
        if model_type == "gemma3_text":
            local = RopeConfig(theta=float(d.get("rope_local_base_freq", 10000.0)))
            if main.theta == 10000.0 and "rope_theta" not in d:
                main = dataclasses.replace(main, theta=1_000_000.0)
            return main, local
        return main, None
    if "full_attention" in params or "sliding_attention" in params:
        main = _rope_from(params.get("full_attention"), legacy_theta)
        local = params.get("sliding_attention")
        return main, (_rope_from(local, 10000.0) if local is not None else None)
    return _rope_from(params, legacy_theta), None


def _layer_sliding(model_type: str, d: dict[str, Any], n: int) -> tuple[bool, ...]:
    types = d.get("layer_types")
    if types:
        if len(types) != n:
            raise ValueError(f"layer_types has {len(types)} entries for {n} layers")
        return tuple(t == "sliding_attention" for t in types)
    if model_type == "gemma2":
        return tuple(i % 2 == 0 for i in range(n))
    if model_type == "gemma3_text":
        pattern = int(d.get("sliding_window_pattern", 6))
        return tuple((i + 1) % pattern != 0 for i in range(n))
    if model_type == "mistral" and d.get("sliding_window"):
        return (True,) * n
    if model_type in ("qwen2", "qwen3") and d.get("use_sliding_window"):
        start = int(d.get("max_window_layers", n))
        return tuple(i >= start for i in range(n))
    return (False,) * n


def _from_hf(cls: type[ModelConfig], model_type: str, d: dict[str, Any]) -> ModelConfig:
    n_layers = int(d["num_hidden_layers"])
    n_heads = int(d["num_attention_heads"])
    hidden = int(d["hidden_size"])
    head_dim = int(d.get("head_dim") or hidden // n_heads)
    if d.get("mlp_bias"):
        raise ValueError("mlp_bias=True is not supported")
    rope, rope_local = _ropes(model_type, d)
    sliding = _layer_sliding(model_type, d, n_layers)
    eos = d.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list | tuple) else (() if eos is None else (eos,))
    gemma = model_type in GEMMA_TYPES
    attn_bias = bool(d.get("attention_bias") or False)
    return cls(
        model_type=model_type,
        vocab_size=int(d["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(d["intermediate_size"]),
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=int(d.get("num_key_value_heads") or n_heads),
        head_dim=head_dim,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", gemma)),
        rope=rope,
        rope_local=rope_local,
        qkv_bias=model_type == "qwen2" or attn_bias,
        o_bias=attn_bias and model_type != "qwen2",
        qk_norm=model_type in ("qwen3", "gemma3_text"),
        hidden_act=d.get("hidden_activation") or d.get("hidden_act") or "silu",
        sliding_window=int(d["sliding_window"]) if any(sliding) else None,
        layer_sliding=sliding if any(sliding) else (),
        query_pre_attn_scalar=d.get("query_pre_attn_scalar") if gemma else None,
        attn_logit_softcap=d.get("attn_logit_softcapping") if gemma else None,
        final_logit_softcap=d.get("final_logit_softcapping") if gemma else None,
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=tuple(int(e) for e in eos_ids),
        norm_plus_one=gemma,
        embed_scale=gemma,
        sandwich_norms=gemma,
    )
