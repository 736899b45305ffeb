"""Parity of every architecture with Hugging Face `transformers` on tiny random configs.

Each model is built with `AutoConfig` + random weights, saved with `save_pretrained`, loaded back
through our safetensors path, and run through the paged KV cache two ways: a full prefill of a
batch of prompts of different lengths, and step-by-step decoding one token at a time.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import transformer
from models.config import ModelConfig
from models.layers import KVCache, kv_shape
from models.params import prepare
from models.safetensors_io import iter_tensors, safetensors_files
from models.weights import assemble_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
CASES = {
    "llama": dict(model_type="llama", tie_word_embeddings=False),
    "llama3-rope-scaling": dict(
        model_type="llama",
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    ),
    "smollm2-tied": dict(model_type="llama", tie_word_embeddings=True),
    "mistral-sliding": dict(model_type="mistral", sliding_window=5),
    "qwen2-bias": dict(model_type="qwen2"),
    "qwen3-qknorm": dict(model_type="qwen3", head_dim=32),
    "gemma2": dict(
        model_type="gemma2",
        head_dim=16,
        sliding_window=4,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
    ),
    "gemma3": dict(
        model_type="gemma3_text",
        num_hidden_layers=4,
        head_dim=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
        },
    ),
}
PROMPTS = [[5, 17, 3, 44, 90, 2, 8, 61, 33, 12, 7], [9, 1, 4], [70, 71, 72, 73, 74, 75, 76]]
PAGE = 4
WIDTH = 4  # pages per sequence: 16 tokens of context


def _rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request, tmp_path_factory):
    """(our cfg, our params, the HF torch model) for one architecture."""
    overrides = {**COMMON, **CASES[request.param]}
    model_type = overrides.pop("model_type")
    hf_cfg = transformers.AutoConfig.for_model(model_type, **overrides)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # random norms and biases too, so nothing is trivially neutral
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    cfg = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    params = assemble_params(cfg, iter_tensors(safetensors_files(path)), jnp.float32, source=str(path))
    return cfg, params, model


def _hf_logits(model, prompt: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].numpy()


def _empty_cache(cfg: ModelConfig, batch: int) -> tuple[KVCache, jnp.ndarray]:
    pages = 1 + batch * WIDTH  # page 0 is scratch
    shape = kv_shape(cfg, pages, PAGE)
    kv = KVCache(jnp.zeros(shape), jnp.zeros(shape))
    table = 1 + np.arange(batch * WIDTH, dtype=np.int32).reshape(batch, WIDTH)
    return kv, jnp.asarray(table[::-1].copy())  # reversed: page order must not matter


def _weights(params, cfg, loop: str):
    host = jax.tree.map(np.asarray, params)
    return prepare(host, cfg, unrolled=loop == "unroll", quantize=None, act_quant=False)


# The layer loop does not depend on the architecture: the fast tier runs every architecture with
# `scan`, the slow tier with `unroll` too.
LOOPS = pytest.mark.parametrize("loop", ["scan", pytest.param("unroll", marks=pytest.mark.slow)])


@LOOPS
def test_prefill_batch_matches_transformers(tiny, loop):
    cfg, params, model = tiny
    params = _weights(params, cfg, loop)
    T = max(map(len, PROMPTS))
    tokens = np.zeros((len(PROMPTS), T), np.int32)
    positions = np.full((len(PROMPTS), T), -1, np.int32)
    for b, p in enumerate(PROMPTS):
        tokens[b, : len(p)] = p
        positions[b, : len(p)] = np.arange(len(p))
    kv, table = _empty_cache(cfg, len(PROMPTS))
    logits, _ = jax.jit(transformer.forward, static_argnums=1)(
        params, cfg, jnp.asarray(tokens), jnp.asarray(positions), kv, table
    )
    for b, p in enumerate(PROMPTS):
        ref = _hf_logits(model, p)
        assert _rel_err(np.asarray(logits[b, : len(p)]), ref) < 1e-4


@LOOPS
def test_decode_step_by_step_matches_transformers(tiny, loop):
    cfg, params, model = tiny
    params = _weights(params, cfg, loop)
    kv, table = _empty_cache(cfg, len(PROMPTS))
    forward = jax.jit(transformer.forward, static_argnums=1)
    # prefill the first two tokens of every prompt, then one token per step (shorter prompts pad)
    steps = max(map(len, PROMPTS))
    got = [[] for _ in PROMPTS]
    t = 0
    while t < steps:
        n = 2 if t == 0 else 1
        tokens = np.zeros((len(PROMPTS), n), np.int32)
        positions = np.full((len(PROMPTS), n), -1, np.int32)
        for b, p in enumerate(PROMPTS):
            for i in range(n):
                if t + i < len(p):
                    tokens[b, i], positions[b, i] = p[t + i], t + i
        logits, kv = forward(params, cfg, jnp.asarray(tokens), jnp.asarray(positions), kv, table)
        for b, p in enumerate(PROMPTS):
            got[b] += [np.asarray(logits[b, i]) for i in range(n) if t + i < len(p)]
        t += n
    for b, p in enumerate(PROMPTS):
        assert _rel_err(np.stack(got[b]), _hf_logits(model, p)) < 1e-4
