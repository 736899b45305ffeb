"""Resolving and loading model sources, and the one clear error for each way it can go wrong."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from models.errors import ModelLoadError
from models.loader import load_model

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, smol_model) -> Path:
    """A tiny random Llama saved by transformers (sharded safetensors) with a real tokenizer."""
    cfg = transformers.AutoConfig.for_model(
        "llama", vocab_size=smol_model.tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    model.save_pretrained(path, max_shard_size="2MB")
    smol_model.tokenizer.hf.save_pretrained(path)
    return path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_sharded_directory_loads_and_runs(hf_dir):
    assert (hf_dir / "model.safetensors.index.json").exists()
    m = load_model(str(hf_dir))
    assert m.name == "tiny-llama" and m.cfg.num_layers == 2 and m.tokenizer.has_chat_template
    assert m.params["layers"]["q"].shape == (2, 32, 4, 8)


@pytest.mark.parametrize("source", ["hf", "gguf"])
def test_facts_without_weights_are_those_of_the_full_load(source, hf_dir, smol_model):
    """What the front of engine replicas loads (graph/replicas.py): the same name, config,
    fingerprint and tokenizer as a full load, and no weights."""
    path = str(hf_dir) if source == "hf" else str(smol_model.path)
    full, facts = load_model(path), load_model(path, weights=False)
    assert facts.params == {} and full.params
    assert (facts.name, facts.cfg, facts.fingerprint) == (full.name, full.cfg, full.fingerprint)
    text = "The facts, not the weights: 123 ünïcode"
    assert facts.tokenizer.encode(text) == full.tokenizer.encode(text)


def test_bfloat16_option(hf_dir):
    m32, m16 = load_model(str(hf_dir)), load_model(str(hf_dir), dtype="bfloat16")
    assert m16.params["embed"].dtype == jnp.bfloat16
    assert m16.fingerprint != m32.fingerprint
    np.testing.assert_allclose(
        np.asarray(m16.params["layers"]["down"], np.float32), np.asarray(m32.params["layers"]["down"]), rtol=1e-2
    )


def test_bfloat16_checkpoint_reads_exactly(hf_dir, tmp_path):
    """A checkpoint saved in bfloat16 (numpy has no such type: the safetensors library hands it
    over as ml_dtypes.bfloat16) loads to exactly torch's values, in float32 and in bfloat16."""
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16)
    shutil.copytree(hf_dir, tmp_path / "bf16", ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    model.save_pretrained(tmp_path / "bf16")
    with safe_open(next((tmp_path / "bf16").glob("*.safetensors")), framework="numpy") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    expected = model.model.embed_tokens.weight.detach().float().numpy()
    for dtype in ("float32", "bfloat16"):
        embed = load_model(str(tmp_path / "bf16"), dtype=dtype).params["embed"]
        np.testing.assert_array_equal(np.asarray(embed, np.float32), expected)


def test_missing_path_names_it():
    with pytest.raises(ModelLoadError, match=r"no/such/model\.gguf: model not found"):
        load_model("./no/such/model.gguf")


def test_hub_id_offline_says_how_to_pass_a_local_path(tmp_path):
    """A user who set HF_HUB_OFFLINE=1 (read by huggingface_hub when it is imported, so set before
    the server starts) and has no cached copy: the server exits 1 with one line that names the
    model, says the hub was not reached, and says what to pass instead."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}  # an empty hub cache
    proc = subprocess.run(
        [sys.executable, "-m", "serving.main", "--model", "someone/some-model", "--port", "0"],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    error = [line for line in proc.stderr.splitlines() if "someone/some-model" in line]
    assert len(error) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "could not download" in error[0] and "outgoing traffic has been disabled" in error[0], error[0]
    assert "Pass a local path instead" in error[0]


def test_unknown_dtype():
    with pytest.raises(ModelLoadError, match="unsupported dtype 'float8'"):
        load_model(None, dtype="float8")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match=r"config\.json: file not found"):
        load_model(str(tmp_path))


def test_unknown_architecture(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "falcon"}))
    with pytest.raises(ModelLoadError, match=r"config.json: unsupported architecture 'falcon' \(supported: llama"):
        load_model(str(d))


def test_config_shapes_that_do_not_match_the_weights(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 80}))
    with pytest.raises(ModelLoadError, match=r"safetensors: tensor model.layers.0.mlp.\w+_proj.weight has shape"):
        load_model(str(d))


def test_missing_weights(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(ModelLoadError, match=r"missing weights for layers\.2\."):
        load_model(str(d))


def test_truncated_safetensors(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path / "m")
    shard = sorted(d.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(ModelLoadError, match=rf"{shard.name}: truncated file"):
        load_model(str(d))


def test_corrupt_safetensors_header(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path / "m")
    shard = sorted(d.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:16] = b"\xff" * 8  # garbage inside the JSON header
    shard.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=rf"{shard.name}: not a valid safetensors file"):
        load_model(str(d))


def test_shard_listed_in_index_is_missing(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path / "m")
    shard = sorted(d.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=rf"{shard.name}: shard listed in model.safetensors.index.json is missing"):
        load_model(str(d))


def test_loading_does_not_import_torch(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\nfrom models.loader import load_model\nload_model(None); print('ok')"
    )
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_params_live_on_the_default_device(smol_model):
    leaf = jax.tree.leaves(smol_model.params)[0]
    assert leaf.devices() == {jax.devices()[0]}
