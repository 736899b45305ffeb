"""Reading GGUF files: the config and the weights must be what transformers makes of the same file.

The two real models (SmolLM2, Llama architecture with Q4_1 weights; Gemma 3 270M with Q4_K/Q5_0/
Q6_K/Q8_0) are compared with transformers' own GGUF loading; tiny files written with
`gguf.GGUFWriter` pin down the rotary un-permutation, llama3 rope scaling, progress logging and
every error a user can meet.
"""

from __future__ import annotations

import logging
import math

import gguf
import numpy as np
import pytest

import models.gguf
from models.errors import ModelLoadError
from models.gguf import _unpermute_qk, read_gguf, read_gguf_metadata

# the real models and transformers' view of them: smollm2_gguf, gemma3_gguf, hf_smollm2, hf_gemma3
pytest_plugins = ("tests.fixtures_models",)

COMMON_KEYS = [
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "max_position_embeddings",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "rope_parameters",
]
GEMMA_KEYS = [
    "sliding_window",
    "layer_types",
    "query_pre_attn_scalar",
    "hidden_activation",
    "final_logit_softcapping",
    "attn_logit_softcapping",
]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return read_gguf(smollm2_gguf, progress=False)


@pytest.fixture(scope="module")
def gemma3(gemma3_gguf):
    return read_gguf(gemma3_gguf, progress=False)


def _as_transformers(hf_config: dict) -> dict:
    from transformers import AutoConfig

    return AutoConfig.for_model(**hf_config).to_dict()


# --- the real models against transformers ----------------------------------------------------


def test_smollm2_config_matches_transformers(smollm2, hf_smollm2):
    ours, ref = _as_transformers(smollm2.hf_config), hf_smollm2.config.to_dict()
    assert {k: ours[k] for k in COMMON_KEYS} == {k: ref[k] for k in COMMON_KEYS}
    assert smollm2.hf_config["rope_parameters"] == {"rope_type": "default", "rope_theta": 100000.0}
    assert smollm2.hf_config["tie_word_embeddings"] is True


def test_gemma3_config_matches_transformers(gemma3, hf_gemma3):
    ours, ref = _as_transformers(gemma3.hf_config), hf_gemma3.config.to_dict()
    keys = COMMON_KEYS + GEMMA_KEYS
    assert {k: ours[k] for k in keys} == {k: ref[k] for k in keys}
    cfg = gemma3.hf_config
    assert cfg["rope_parameters"] == {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
    }
    assert [i for i, t in enumerate(cfg["layer_types"]) if t == "full_attention"] == [5, 11, 17]
    assert cfg["query_pre_attn_scalar"] == cfg["head_dim"] == 256


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_config_is_taken_as_is(model, request):
    """transformers keeps every value we set (nothing is renamed, dropped or re-derived)."""
    hf_config = request.getfixturevalue(model).hf_config
    ours = _as_transformers(hf_config)
    assert {k: ours[k] for k in hf_config} == hf_config


def test_gemma3_defaults_we_leave_out_match_the_file(gemma3):
    """What we do not set comes from `Gemma3TextConfig`'s defaults: they must not contradict the file."""
    from transformers import AutoConfig

    defaults = AutoConfig.for_model("gemma3_text").to_dict()
    left_out = ("attention_bias", "use_bidirectional_attention", "attention_dropout")
    assert not set(left_out) & set(gemma3.hf_config)
    # no attention bias: the file has no bias tensor at all
    assert defaults["attention_bias"] is False
    assert [t.name for t in gemma3.header.tensors if t.name.endswith(".bias")] == []
    # causal attention: llama.cpp's `gemma3` architecture (the bidirectional one is `gemma-embedding`)
    assert defaults["use_bidirectional_attention"] is False and gemma3.header.architecture == "gemma3"
    assert defaults["attention_dropout"] == 0.0  # (training only: inference never drops)


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_tensors_equal_transformers_state_dict(model, request):
    ckpt = request.getfixturevalue(model)
    ref = request.getfixturevalue(f"hf_{model}").state_dict
    assert ckpt.hf_config["tie_word_embeddings"]
    assert set(ckpt.tensors) == set(ref)
    for name, ours in ckpt.tensors.items():
        assert ours.dtype == np.float32
        assert ours.shape == ref[name].shape, name
        np.testing.assert_array_equal(ours, ref[name], err_msg=name)


def test_smollm2_layouts(smollm2):
    t = smollm2.tensors
    assert t["model.embed_tokens.weight"].shape == (49152, 576)
    assert t["model.layers.0.self_attn.q_proj.weight"].shape == (9 * 64, 576)
    assert t["model.layers.0.self_attn.k_proj.weight"].shape == (3 * 64, 576)
    assert t["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)


def test_gemma3_norms_have_the_offset_removed(gemma3):
    """llama.cpp stores Gemma's RMSNorm weights as w + 1; Hugging Face's are w (it computes x * (1 + w))."""
    header = gemma3.header
    infos = {info.name: info for info in header.tensors}
    pairs = {
        "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
        "blk.0.attn_q_norm.weight": "model.layers.0.self_attn.q_norm.weight",
        "blk.0.attn_k_norm.weight": "model.layers.0.self_attn.k_norm.weight",
        "blk.0.post_ffw_norm.weight": "model.layers.0.post_feedforward_layernorm.weight",
        "output_norm.weight": "model.norm.weight",
    }
    for gguf_name, hf_name in pairs.items():
        info = infos[gguf_name]  # norms are stored unquantized: their bytes are the float32 values
        assert info.qtype == gguf.GGMLQuantizationType.F32 and info.nbytes == 4 * math.prod(info.shape)
        stored = np.fromfile(header.path, np.float32, count=math.prod(info.shape), offset=info.start)
        np.testing.assert_array_equal(gemma3.tensors[hf_name], stored.reshape(info.shape) - 1.0)


# --- tiny files ------------------------------------------------------------------------------


def _llama_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute`, verbatim."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny(path, arch="llama", tensors=None, raw=None, hidden=8, theta=10000.0):
    """A 1-layer model: 2 heads of hidden/2, 1 KV head; `tensors` are F32, `raw` (bytes, type)."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(theta)
    for name, array in (tensors or {}).items():
        writer.add_tensor(name, array.astype(np.float32))
    for name, (array, qtype) in (raw or {}).items():
        writer.add_tensor(name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(0)
    for n_heads, head_dim in ((2, 4), (9, 64), (3, 64)):
        w = rng.standard_normal((n_heads * head_dim, 5)).astype(np.float32)
        np.testing.assert_array_equal(_unpermute_qk(_llama_permute(w, n_heads), n_heads), w)
    # per head, llama.cpp's row order is (0, 2, 1, 3) for head_dim 4: interleaved halves
    rows = np.arange(8, dtype=np.float32)[:, None]
    assert _llama_permute(rows, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_tiny_llama_round_trip(tmp_path, caplog):
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((8, 8)), rng.standard_normal((4, 8))
    path = _write_tiny(
        tmp_path / "tiny.gguf",
        tensors={
            "token_embd.weight": rng.standard_normal((32, 8)),
            "blk.0.attn_q.weight": _llama_permute(q, 2),
            "blk.0.attn_k.weight": _llama_permute(k, 1),
            "output.weight": rng.standard_normal((32, 8)),
        },
    )
    with caplog.at_level(logging.INFO, logger="models.gguf"):
        ckpt = read_gguf(path)
    np.testing.assert_allclose(ckpt.tensors["model.layers.0.self_attn.q_proj.weight"], q, rtol=1e-6)
    np.testing.assert_allclose(ckpt.tensors["model.layers.0.self_attn.k_proj.weight"], k, rtol=1e-6)
    assert ckpt.tensors["model.embed_tokens.weight"].shape == (32, 8)
    assert ckpt.hf_config["tie_word_embeddings"] is False
    assert ckpt.hf_config["head_dim"] == 4
    assert "dequantized 4/4 tensors" in caplog.text


def test_llama3_rope_scaling_is_recovered_from_rope_freqs(tmp_path):
    factor, theta, head_dim = 8.0, 500000.0, 32
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    smooth = (8192 / wavelen - 1) / 3
    freqs = np.where(wavelen > 8192, factor, np.where(wavelen < 2048, 1.0, 1 / ((1 - smooth) / factor + smooth)))
    path = _write_tiny(
        tmp_path / "llama3.gguf",
        tensors={"token_embd.weight": np.zeros((32, 64)), "rope_freqs.weight": freqs},
        hidden=64,
        theta=theta,
    )
    ckpt = read_gguf(path, progress=False)
    assert ckpt.hf_config["rope_parameters"] == {
        "rope_type": "llama3",
        "rope_theta": theta,
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert "rope_freqs.weight" not in ckpt.tensors and len(ckpt.tensors) == 1


# --- errors: each names the file -------------------------------------------------------------


def _error(path) -> str:
    with pytest.raises(ModelLoadError) as info:
        read_gguf(path, progress=False)
    assert str(path) in str(info.value)
    return str(info.value)


def test_missing_file(tmp_path):
    assert "file not found" in _error(tmp_path / "missing.gguf")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "config.gguf"
    path.write_text('{"model_type": "llama"}')
    assert "not a GGUF file" in _error(path)


def test_truncated_tensor_data(tmp_path, smollm2_gguf):
    data = smollm2_gguf.read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[: len(data) - 1000])
    assert "truncated" in _error(path)


def test_truncated_header(tmp_path, smollm2_gguf):
    path = tmp_path / "header.gguf"
    with open(smollm2_gguf, "rb") as f:
        path.write_bytes(f.read(4096))
    assert "ends inside its header" in _error(path)


def test_unsupported_architecture(tmp_path):
    path = _write_tiny(tmp_path / "falcon.gguf", arch="falcon", tensors={"token_embd.weight": np.zeros((4, 8))})
    message = _error(path)
    assert "'falcon'" in message
    assert "llama, mistral, qwen2, qwen3, gemma2, gemma3" in message


def test_unsupported_quant_type(tmp_path):
    blocks = np.zeros((4, 18), dtype=np.uint8)  # 4 rows of one 32-value IQ4_NL block
    path = _write_tiny(
        tmp_path / "iq4.gguf",
        tensors={"token_embd.weight": np.zeros((32, 8))},
        raw={"blk.0.ffn_up.weight": (blocks, gguf.GGMLQuantizationType.IQ4_NL)},
    )
    message = _error(path)
    assert "blk.0.ffn_up.weight" in message and "IQ4_NL" in message and "Q4_K" in message


def test_metadata_only_read_lists_tensors_and_tokenizer_without_dequantizing(smollm2_gguf, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("the metadata read dequantized a tensor")

    monkeypatch.setattr(models.gguf, "dequantize", no_weights)
    monkeypatch.setattr(models.gguf, "_dequantize", no_weights)
    header = read_gguf_metadata(smollm2_gguf)
    assert header.architecture == "llama"
    assert len(header.tensors) == 272
    assert header.tokenizer_metadata["tokenizer.ggml.model"] == "gpt2"
    assert len(header.tokenizer_metadata["tokenizer.ggml.tokens"]) == 49152
