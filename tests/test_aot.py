"""Ahead-of-time artifacts: `python -m graph.aot` writes the whole table; an engine started from
it compiles nothing (not even small eager computations), with the compilation cache off so nothing
could come from there either; an artifact made for something else is refused with a message saying
what differs; a damaged file is refused naming it, and the server then exits with that one line;
and nothing that loads artifacts or weights can unpickle."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from graph import compile_cache, executable_io
from graph.api import EngineConfig, SamplingParams
from graph.buckets import Buckets
from graph.executables import ArtifactMismatchError, ExecutableTable
from tests.server_fixtures import SMALL, engine_args

pytest_plugins = ("tests.server_fixtures",)
pytestmark = pytest.mark.slow  # compiles the real model's artifacts

ROOT = Path(__file__).resolve().parent.parent
# The session's artifact (tests/conftest.py `aot_dir`): SMALL, compiled once for every server
CONFIG = SMALL
# The int8 artifact's: SMALL's buckets for a batch of 1 (its prefill and smallest decode bucket),
# started with the warm-up: running every step shape at start-up compiles nothing either
ONE_BUCKET = dataclasses.replace(SMALL, max_batch=1, warmup=True)
PROMPT = "The capital of France is"


START = textwrap.dedent(
    """
    import json, sys, time
    t0 = time.monotonic()
    import jax
    PROBE = "-- probe --"
    events = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda e, d, **k: events.append(e) if "backend_compile" in e else None)
    from graph.api import EngineConfig, SamplingParams
    from graph.offline import LLM
    config = EngineConfig(**json.loads(sys.argv[1]))
    llm = LLM("smollm2-135m-instruct", config)
    ready = time.monotonic() - t0
    out = llm.generate([sys.argv[2]], SamplingParams(max_tokens=8, temperature=0))[0]
    compiles = len(events)
    print(PROBE, file=sys.stderr, flush=True)
    jax.jit(lambda x: x + 1)(1)  # a compilation the counter must see: a zero above is no accident
    print(json.dumps({"compiles": compiles, "probe": len(events) - compiles, "ready_s": ready, "text": out.text}))
    llm.shutdown()
    """
)


def _start(config: EngineConfig) -> tuple[dict, str]:
    if config.compile_cache is None:  # the session's cache (tests/conftest.py), not the user's
        config = dataclasses.replace(config, compile_cache=str(compile_cache.default_dir()))
    env = {**os.environ, "JAX_LOG_COMPILES": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", START, json.dumps(dataclasses.asdict(config)), PROMPT],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr.split("-- probe --")[0]  # the start's log


def _make_artifact(out: Path, config: EngineConfig, *extra: str) -> tuple[Path, str]:
    """-> (the artifact directory, graph.aot's log)"""
    cmd = [
        sys.executable,
        "-m",
        "graph.aot",
        "--model",
        "smollm2-135m-instruct",
        "--out",
        str(out),
        "--compile-cache",
        str(compile_cache.default_dir()),
        *engine_args(config),
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "manifest.json").exists()
    return out, proc.stderr


@pytest.fixture(scope="module")
def artifact(aot_dir) -> Path:
    return aot_dir


def test_start_from_artifact_compiles_nothing(artifact, smol_llm):
    warm, log = _start(dataclasses.replace(CONFIG, aot_dir=str(artifact), compile_cache="off"))
    assert warm["probe"] > 0  # the counter sees a compilation in that process
    assert warm["compiles"] == 0
    assert "Compiling" not in log
    # the same text as the session's engine over the same buckets, compiled (tests/conftest.py)
    assert warm["text"] == smol_llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0))[0].text
    print(f"\nstart from artifact {warm['ready_s']:.1f}s")  # reported, not asserted


def test_int8_artifact_starts_with_zero_compilations(artifact, tmp_path, smol_model):
    # Made with the session's cache warm from `artifact`'s compilation, and with its pool: the
    # executables both share (the KV pool's init at least) are compiled afresh, as jax cannot
    # serialize an executable it loaded from its cache (graph/compile_cache.py); the start below
    # shows every one runs.
    pages = json.loads((artifact / "manifest.json").read_text())["num_pages"]
    config = dataclasses.replace(ONE_BUCKET, quantize="int8", kv_pages=pages)
    int8, _ = _make_artifact(tmp_path / "int8", dataclasses.replace(ONE_BUCKET, kv_pages=pages), "--quantize", "int8")
    assert json.loads((int8 / "manifest.json").read_text())["quantize"] == "int8"
    warm, log = _start(dataclasses.replace(config, aot_dir=str(int8), compile_cache="off"))
    assert warm["probe"] > 0 and warm["compiles"] == 0 and "Compiling" not in log
    assert warm["text"]  # it generates
    float32 = dataclasses.replace(config, quantize="none")
    with pytest.raises(ArtifactMismatchError, match="quantize"):  # and a float32 server refuses it
        ExecutableTable.load(
            int8, smol_model.cfg, "float32", float32, Buckets.from_config(float32), smol_model.fingerprint
        )
    # made before int8 matrices were stored output-major: its executables take the other shapes
    manifest = json.loads((int8 / "manifest.json").read_text())
    assert manifest.pop("int8_layout") == "out-in"
    older = shutil.copytree(int8, tmp_path / "older")
    (older / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactMismatchError, match="int8_layout"):
        ExecutableTable.load(
            older, smol_model.cfg, "float32", config, Buckets.from_config(config), smol_model.fingerprint
        )


def test_manifest_describes_the_artifact(artifact):
    manifest = json.loads((artifact / "manifest.json").read_text())
    for key in ("jax", "jaxlib", "backend", "mesh", "model_fingerprint", "dtype", "buckets"):
        assert key in manifest
    assert manifest["mesh"] == {"axes": {"data": 1, "model": 1}, "device_kind": "cpu", "devices": 1, "processes": 1}
    assert manifest["layer_loop"] == "layered"  # the CPU default: front, layers (per group), head
    assert manifest["memory"]["layers_b2_t1_p32"]["temp_size_in_bytes"] > 0


@pytest.mark.parametrize(
    ("change", "what"),
    [
        ({"max_batch": 4}, "buckets"),
        ({"dtype": "bfloat16"}, "dtype"),
        ({"kv_cache_dtype": "bfloat16"}, "kv_cache_dtype"),
        ({"max_seq_len": 256}, "buckets"),
    ],
)
def test_mismatched_artifact_is_refused(artifact, smol_model, change, what):
    config = dataclasses.replace(CONFIG, **change)
    with pytest.raises(ArtifactMismatchError, match=what):
        ExecutableTable.load(
            artifact, smol_model.cfg, config.dtype, config, Buckets.from_config(config), smol_model.fingerprint
        )


def test_artifact_for_another_model_or_jax_is_refused(artifact, smol_model, tmp_path):
    buckets = Buckets.from_config(CONFIG)
    with pytest.raises(ArtifactMismatchError, match="model_fingerprint"):
        ExecutableTable.load(artifact, smol_model.cfg, "float32", CONFIG, buckets, "another-model")
    other = tmp_path / "other"
    other.mkdir()
    manifest = json.loads((artifact / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "jax": "0.0.1"}))
    with pytest.raises(ArtifactMismatchError, match=r"jax: artifact has '0\.0\.1'"):
        ExecutableTable.load(other, smol_model.cfg, "float32", CONFIG, buckets, smol_model.fingerprint)


def test_artifact_of_another_versions_executables_is_refused(artifact, smol_model, tmp_path):
    """An artifact made when a step was other executables (before a prefill chunk's sampling was
    one `pick` for every chunk length, it had a `head_prefill_*` per length) names what is missing
    and how to make it again."""
    older = tmp_path / "older"
    shutil.copytree(artifact, older)
    manifest = json.loads((older / "manifest.json").read_text())
    assert manifest["executables"].pop("pick_r4")
    (older / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactMismatchError, match=r"pick_r4\.bin: not described .* python -m graph\.aot"):
        ExecutableTable.load(
            older, smol_model.cfg, "float32", CONFIG, Buckets.from_config(CONFIG), smol_model.fingerprint
        )


def _damage(artifact: Path, into: Path, how: str) -> tuple[Path, Path]:
    """A copy of the artifact with one executable truncated or one of its bytes flipped; -> (the
    copy, the damaged file)."""
    shutil.copytree(artifact, into)
    victim = into / "layers_b2_t1_p32.bin"
    data = victim.read_bytes()
    victim.write_bytes(
        data[: len(data) // 2] if how == "truncated" else data[:999] + bytes([data[999] ^ 1]) + data[1000:]
    )
    return into, victim


@pytest.mark.parametrize("how", ["truncated", "altered"])
def test_damaged_artifact_is_refused_naming_the_file(artifact, smol_model, tmp_path, how):
    damaged, victim = _damage(artifact, tmp_path / "damaged", how)
    with pytest.raises(ArtifactMismatchError, match=re.escape(str(victim))):
        ExecutableTable.load(
            damaged, smol_model.cfg, "float32", CONFIG, Buckets.from_config(CONFIG), smol_model.fingerprint
        )
    cmd = [sys.executable, "-m", "serving.main", "--port", "0", "--aot-dir", str(damaged), "--compile-cache", "off"]
    server = subprocess.run([*cmd, *engine_args(CONFIG)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    errors = [line for line in server.stderr.splitlines() if " ERROR " in line]
    assert server.returncode != 0
    assert len(errors) == 1 and str(victim) in errors[0], server.stderr[-3000:]
    assert "Traceback" not in server.stderr


def test_manifest_names_no_code(artifact, smol_model, tmp_path):
    """A manifest edited to name another class for a tree node is refused before anything is
    imported: only builtin containers and the pytree classes of graph/ and models/ decode."""
    edited = tmp_path / "edited"
    shutil.copytree(artifact, edited)
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["executables"]["init_kv"]["out_tree"][0] = "subprocess:Popen"
    (edited / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactMismatchError, match=r"init_kv\.bin: .*subprocess:Popen"):
        ExecutableTable.load(
            edited, smol_model.cfg, "float32", CONFIG, Buckets.from_config(CONFIG), smol_model.fingerprint
        )
    for name in ("os:system", "builtins:eval", "graph:__builtins__", "models.nowhere:X", "graph.step:jax.numpy"):
        with pytest.raises(executable_io.BadExecutableError):
            executable_io._node_type(name)


def test_nothing_that_loads_artifacts_or_weights_unpickles():
    unpicklers = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}
    unpicklers.add("jax.experimental.serialize_executable")  # jax's executable pickler
    for path in [*(ROOT / "graph").rglob("*.py"), *(ROOT / "models").rglob("*.py")]:
        text = path.read_text()
        imported = set(re.findall(r"^\s*(?:import|from)\s+([\w.]+)", text, re.MULTILINE))
        assert not imported & unpicklers, path
        assert "allow_pickle=True" not in text and "torch.load" not in text, path
