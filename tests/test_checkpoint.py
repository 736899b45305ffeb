"""Compute-form orbax checkpoints (scripts/convert.py, `--model DIR`): a converted model serves the
same greedy tokens as its source (float32 and int8), restores each array straight into its
sharding on a mesh without compiling anything, keeps its config, tokenizer, name and fingerprint,
and a damaged or mismatched checkpoint is refused with a clear error.

The tiny random model (fast tier) converts through `graph.checkpoint.convert`; the real SmolLM2
(slow tier) through the `scripts/convert.py` command a user runs.
"""

from __future__ import annotations

import dataclasses
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

from graph.api import EngineConfig, SamplingParams
from graph.checkpoint import CheckpointMismatchError, check_weights, convert, load_weights
from graph.offline import LLM
from models.checkpoint import METADATA, WEIGHTS, config_from_json, config_to_json
from models.config import RopeConfig
from models.errors import ModelLoadError
from models.loader import load_model
from models.tokenizer import load_tokenizer
from tests.server_fixtures import SMALL

pytest_plugins = ("tests.fixtures_models",)

ROOT = Path(__file__).resolve().parent.parent
CONFIG = EngineConfig(
    max_batch=2, max_seq_len=64, max_prefill_tokens=16, min_context_tokens=64, max_num_batched_tokens=0, kv_pages=16
)
PROMPTS = [[5, 17, 99, 3, 42, 7, 8, 21, 13, 2], [11, 12, 14, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73]]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
TEXT = "Hello wörld!\n\t<|im_start|>user  spaces, 日本語 and 🙂: fn(x) -> x**2  <|endoftext|>"


@pytest.fixture(scope="module")
def tiny_ckpts(tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-ckpt")
    return {q: convert(tiny_model, root / q, dataclasses.replace(CONFIG, quantize=q)) for q in ("none", "int8")}


def _greedy(model, config: EngineConfig, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Greedy tokens of each prompt, one request at a time: requests sent together may be
    batched differently by two engines (by thread timing), and a batch of another shape can
    round differently and flip a near-tie."""
    llm = LLM(model, config)
    try:
        return [llm.generate([p], params)[0].token_ids for p in prompts]
    finally:
        llm.shutdown()


def test_config_round_trips_through_json(smol_model):
    gemma_like = dataclasses.replace(
        smol_model.cfg,
        rope_local=RopeConfig(theta=10_000.0),
        rope=RopeConfig(theta=1e6, kind="llama3", factor=8.0),
        layer_sliding=(True, False) * 15,
        sliding_window=512,
        attn_logit_softcap=50.0,
        query_pre_attn_scalar=256,
        eos_token_ids=(1, 106),
    )
    for cfg in (smol_model.cfg, gemma_like):
        back = config_from_json(json.loads(json.dumps(config_to_json(cfg))))
        assert back == cfg and hash(back) == hash(cfg)


def test_gguf_tokenizer_round_trips(smol_model, tmp_path):
    """The default model's tokenizer is built from GGUF metadata; saved, it reads back the same."""
    ours = smol_model.tokenizer
    ours.save(tmp_path)
    back = load_tokenizer(tmp_path, eos_token_ids=smol_model.cfg.eos_token_ids)
    assert back.encode(TEXT) == ours.encode(TEXT) and back.decode(ours.encode(TEXT)) == ours.decode(ours.encode(TEXT))
    assert back.hf.get_vocab() == ours.hf.get_vocab() and back.vocab_size == ours.vocab_size
    assert (back.eos_token_ids, back.bos_token_id) == (ours.eos_token_ids, ours.bos_token_id)
    assert back.special_ids == ours.special_ids and back.byte_fallback_ids == ours.byte_fallback_ids
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    assert back.encode_chat(messages) == ours.encode_chat(messages)


def test_converted_model_keeps_config_name_fingerprint_and_tokenizer(tiny_model, tiny_ckpts):
    model = load_model(str(tiny_ckpts["none"]))
    assert model.cfg == tiny_model.cfg and model.dtype == "float32"
    # Served as the model it was converted from; the same fingerprint, so AOT artifacts carry over.
    assert (model.name, model.fingerprint) == (tiny_model.name, tiny_model.fingerprint)
    assert model.params == {} and model.checkpoint is not None and model.checkpoint.path == tiny_ckpts["none"] / WEIGHTS
    assert model.tokenizer.encode(TEXT) == tiny_model.tokenizer.encode(TEXT)


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_converted_tiny_model_serves_the_same_greedy_tokens(tiny_model, tiny_ckpts, quantize):
    config = dataclasses.replace(CONFIG, quantize=quantize)
    want = _greedy(tiny_model, config, PROMPTS, GREEDY)
    assert _greedy(load_model(str(tiny_ckpts[quantize])), config, PROMPTS, GREEDY) == want
    assert len(set(map(tuple, want))) > 1 and all(len(set(t)) > 1 for t in want)  # not a degenerate model


def test_restore_compiles_nothing_and_equals_the_host_preparation(tiny_model, tiny_ckpts):
    events: list[str] = []
    jax.monitoring.register_event_duration_secs_listener(lambda event, _, **kw: events.append(event))
    restored = load_weights(load_model(str(tiny_ckpts["int8"])), dataclasses.replace(CONFIG, quantize="int8"))
    compiles = [e for e in events if "backend_compile" in e]
    assert compiles == []
    prepared = load_weights(tiny_model, dataclasses.replace(CONFIG, quantize="int8"))
    assert jax.tree.structure(restored) == jax.tree.structure(prepared)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(prepared), strict=True):
        assert a.dtype == b.dtype and a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_bfloat16_checkpoint_restores_exactly(tiny_model, tmp_path):
    bf16 = dataclasses.replace(tiny_model, params=jax.tree.map(lambda a: a.astype(jnp.bfloat16), tiny_model.params))
    bf16 = dataclasses.replace(bf16, dtype="bfloat16")
    config = dataclasses.replace(CONFIG, dtype="bfloat16")
    model = load_model(str(convert(bf16, tmp_path / "bf16", config)), dtype="bfloat16")
    restored, prepared = load_weights(model, config), load_weights(bf16, config)
    assert {a.dtype for a in jax.tree.leaves(restored)} == {jnp.dtype(jnp.bfloat16)}
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(prepared), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


MESH_CHECK = """
import json, sys
import jax, numpy as np
from graph.api import EngineConfig
from graph.checkpoint import load_weights
from graph.layout import abstract_device_weights
from models.loader import load_model

model = load_model(sys.argv[1])
config = EngineConfig(tensor_parallel=2, data_parallel=2, layer_loop="layered")
puts = []  # the shape of every host array handed to jax.device_put while restoring
device_put = jax.device_put
def spy(x, *args, **kwargs):
    puts.extend(tuple(np.shape(a)) for a in jax.tree.leaves(x) if isinstance(a, np.ndarray))
    return device_put(x, *args, **kwargs)
jax.device_put = spy
weights = load_weights(model, config)
jax.device_put = device_put
target = abstract_device_weights(model.cfg, model.dtype, config)
out = []
for (path, w), t in zip(jax.tree_util.tree_flatten_with_path(weights)[0], jax.tree.leaves(target), strict=True):
    out.append({
        "name": jax.tree_util.keystr(path), "shape": list(w.shape), "same_sharding": w.sharding == t.sharding,
        "replicated": w.sharding.is_fully_replicated, "spec": str(t.sharding.spec),
        "shards": sorted({tuple(s.data.shape) for s in w.addressable_shards}),
        "want_shard": list(t.sharding.shard_shape(t.shape)), "sum": float(np.asarray(w, np.float64).sum()),
    })
print(json.dumps({"devices": jax.device_count(), "arrays": out, "puts": puts}))
"""


def test_restore_places_each_shard_on_a_2x2_mesh(tiny_model, tiny_ckpts):
    """Each array lands in the engine's NamedSharding (split ones split: each device holds its
    shard), its values those of the checkpoint, and only shards ever go from the host to a device."""
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"}
    proc = subprocess.run(
        [sys.executable, "-c", MESH_CHECK, str(tiny_ckpts["none"])],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8
    arrays = report["arrays"]
    assert all(a["same_sharding"] for a in arrays), [a["name"] for a in arrays if not a["same_sharding"]]
    split = [a for a in arrays if "model" in a["spec"]]
    assert {a["name"] for a in split} >= {".embed", ".layers[0].qkv", ".layers[1].gate_up", ".layers[1].down"}
    for a in split:
        assert not a["replicated"] and a["shards"] == [a["want_shard"]] != [a["shape"]], a
    # Each of the 4 devices was handed its own shard of each array, nothing more: no full host copy.
    assert sorted(map(tuple, report["puts"])) == sorted(tuple(a["want_shard"]) for a in arrays for _ in range(4))
    host = load_weights(tiny_model, CONFIG)  # the same weights prepared on the host, one device
    for a, w in zip(arrays, jax.tree.leaves(host), strict=True):
        assert a["sum"] == pytest.approx(float(np.asarray(w, np.float64).sum()), rel=1e-6, abs=1e-6), a["name"]


def test_an_engine_with_other_options_refuses_the_checkpoint(tiny_ckpts):
    model = load_model(str(tiny_ckpts["none"]))
    check_weights(model, CONFIG)  # the options it was converted with
    mismatch = r"quantize none, this engine int8.*serve it with --quantize none.*convert it again.*--quantize int8"
    with pytest.raises(CheckpointMismatchError, match=mismatch):
        check_weights(model, dataclasses.replace(CONFIG, quantize="int8"))
    mismatch = r"layer loop layered \(per-layer buffers\), this engine runs scan \(stacked layers\)"
    with pytest.raises(CheckpointMismatchError, match=mismatch):
        LLM(model, dataclasses.replace(CONFIG, layer_loop="scan"))  # refused before compiling
    with pytest.raises(ModelLoadError, match=r"holds float32 weights, not bfloat16: pass --dtype float32"):
        load_model(str(tiny_ckpts["none"]), dtype="bfloat16")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_broken_checkpoint_gives_a_clear_error(tiny_ckpts, tmp_path):
    src = tiny_ckpts["none"]
    missing = _copy(src, tmp_path / "missing")
    shutil.rmtree(missing / WEIGHTS)
    with pytest.raises(ModelLoadError, match=r"missing or incomplete orbax checkpoint.*convert the model again"):
        load_model(str(missing))

    garbled = _copy(src, tmp_path / "garbled")
    (garbled / METADATA).write_text("{not json")
    with pytest.raises(ModelLoadError, match=rf"{METADATA}: unreadable checkpoint metadata"):
        load_model(str(garbled))

    resized = _copy(src, tmp_path / "resized")  # a config that does not fit the arrays
    meta = json.loads((resized / METADATA).read_text())
    meta["config"]["intermediate_size"] = 96
    (resized / METADATA).write_text(json.dumps(meta))
    with pytest.raises(
        ModelLoadError, match=r"arrays do not match.*gate_up is float32\[64, 256\], expected float32\[64, 192\]"
    ):
        load_weights(load_model(str(resized)), CONFIG)

    truncated = _copy(src, tmp_path / "truncated")
    for f in (truncated / WEIGHTS).glob("ocdbt.process_*/d/*"):  # the array data
        f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match=r"cannot restore the checkpoint"):
        load_weights(load_model(str(truncated)), CONFIG)


def test_convert_refuses_to_overwrite_other_files(tiny_model, tiny_ckpts, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        convert(tiny_model, tmp_path, CONFIG, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="converted already"):
        convert(load_model(str(tiny_ckpts["none"])), tmp_path / "again", CONFIG)


# ---- the real SmolLM2, converted by the command a user runs (slow tier) ----


def _convert_command(out: Path, *options: str) -> Path:
    cmd = [sys.executable, "scripts/convert.py", "--model", "smollm2-135m-instruct", "--out", str(out), *options]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote smollm2-135m-instruct" in proc.stdout
    return out


@pytest.mark.slow
def test_converted_smollm2_serves_the_same_greedy_tokens(smol_model, smol_llm, tmp_path):
    """float32 (int8 conversion: the tiny model above; SmolLM2's int8 table would add a minute).
    The reference is the session's engine over the GGUF model, on the same bucket set: the
    converted model's engine loads its executables from the session's compilation cache."""
    out = _convert_command(tmp_path / "smollm2")
    prompts = [smol_model.tokenizer.encode(p) for p in ("The capital of France is", "def fib(n):")]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    want = [smol_llm.generate([p], params)[0].token_ids for p in prompts]  # one at a time, as `_greedy`
    assert _greedy(load_model(str(out)), SMALL, prompts, params) == want


def test_gemma3_gguf_tokenizer_round_trips(gemma3_gguf, tmp_path):
    """A SentencePiece GGUF vocabulary (byte fallback, BOS added) survives the save too."""
    ours = load_tokenizer(gemma3_gguf)
    ours.save(tmp_path)
    back = load_tokenizer(tmp_path)
    assert back.encode(TEXT) == ours.encode(TEXT) and back.bos_token_id == ours.bos_token_id
    assert back.eos_token_ids == ours.eos_token_ids
    assert back.byte_fallback_ids == ours.byte_fallback_ids and len(back.byte_fallback_ids) == 256
    assert back.encode(TEXT)[0] == ours.bos_token_id  # added, as llama.cpp adds it to this vocabulary
    assert back.has_chat_template == ours.has_chat_template  # (this GGUF has none)
