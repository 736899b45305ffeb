"""Session fixtures shared by the engine and server tests: the real bundled model, loaded once,
an offline engine over it with a small bucket set, and a tiny random model for fast engine
mechanics (it borrows the real tokenizer so text paths run for real); and the session's one XLA
compilation cache."""

from __future__ import annotations

import os

# Eight simulated CPU devices for the whole session, set before jax starts: the mesh tests
# (tests/test_sharding.py) split engines over them; every other engine runs on the first one, as
# on a one-device machine. The server subprocesses inherit it.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from graph import compile_cache
from models.loader import LoadedModel, load_model

pytest.register_assert_rewrite("tests.server_fixtures")  # before its import below: its asserts explain failures

from tests.server_fixtures import SMALL, EarlyJobs, compile_small_artifact  # noqa: E402

# The slow tier (`pytest -m "not slow"` leaves it out; `make test` runs it): every test that
# compiles the real SmolLM2 or starts a server (through these fixtures, or as its module says with
# `pytestmark`), and every test that reads Gemma 3 270M's 262k-token vocabulary (`model` parameter
# `gemma3`). The fast tier keeps the pure functions, the tiny random model through the whole
# engine, and SmolLM2's GGUF reader and tokenizer.
SLOW_FIXTURES = {"smol_llm", "smol_hf", "aot_dir", "aot_engine", "server"}
SLOW_FIXTURES |= {"gemma3", "hf_gemma3", "gemma3_gguf", "gemma3_model"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or params.get("model") == "gemma3":
            item.add_marker(pytest.mark.slow)
    # the fast tier first (in pytest's order): its failures show in minutes, and the session's
    # artifact compiles meanwhile (`aot_dir`, an early job)
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)


@pytest.fixture(scope="session", autouse=True)
def session_compile_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One XLA compilation cache for the whole session, in a fresh directory (the user's own is never
    touched): engines in this process take it as their default directory, and the server and compile
    subprocesses get it as `--compile-cache` (tests/server_fixtures.py), so a bucket set compiled
    once in the session loads from the cache at its next start.

    Tests that count compilations while serving (tests/test_engine.py) still see every one: the
    cache is read only while the table is built, and jax reports a hit in its cache as a backend
    compile (tests/test_compile_cache.py checks that); the AOT tests turn the cache off."""
    path = tmp_path_factory.mktemp("xla-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compile_cache, "default_dir", lambda: path)
        yield path


@pytest.fixture(scope="session", autouse=True)
def early(request: pytest.FixtureRequest, session_compile_cache: Path, tmp_path_factory) -> Iterator[EarlyJobs]:
    """The selected tests' early jobs (tests/server_fixtures.py `EarlyJobs`), begun now."""
    by_module: dict[object, list[pytest.Item]] = {}
    for item in request.session.items:
        by_module.setdefault(getattr(item, "module", None), []).append(item)
    jobs = {}
    if any("aot_dir" in item.fixturenames for item in request.session.items if hasattr(item, "fixturenames")):
        jobs["aot_dir"] = _compile_small_artifact
    for module, items in by_module.items():
        if (offer := getattr(module, "early_jobs", None)) is not None:
            jobs.update(offer(items))
    started = EarlyJobs(jobs, tmp_path_factory.mktemp("early-jobs"))
    yield started
    started.stop()


@pytest.fixture(scope="session")
def smol_model(session_compile_cache: Path) -> LoadedModel:
    return load_model("smollm2-135m-instruct", tokenizer_cache=session_compile_cache / "tokenizers")


@pytest.fixture(scope="session")
def gemma3_model(session_compile_cache: Path) -> LoadedModel:
    """Gemma 3 270M, loaded once for the session's references (its 262k-token vocabulary and
    weights take ~14 s to load on 2 cores)."""
    return load_model("gemma3-270m", tokenizer_cache=session_compile_cache / "tokenizers")


def _compile_small_artifact(log_dir: Path) -> Path:
    return compile_small_artifact(log_dir / "smollm2-small")


@pytest.fixture(scope="session")
def aot_dir(early: EarlyJobs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's small bucket set (tests/server_fixtures.py `SMALL`), compiled once with
    `python -m graph.aot`, from the session's start (an early job); every server of the session
    loads it."""
    return early.result("aot_dir", _compile_small_artifact, tmp_path_factory.mktemp("aot"))


@pytest.fixture(scope="session")
def smol_llm(smol_model, aot_dir):
    """An engine in this process over the same bucket set: the artifact's compile filled the
    session's compilation cache, so this one loads (an artifact holds fresh compilations only,
    so the other order would compile twice)."""
    from graph.offline import LLM

    llm = LLM(smol_model, SMALL)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="session")
def tiny_model(smol_model) -> LoadedModel:
    from models.config import ModelConfig
    from models.params import init_params

    cfg = dataclasses.replace(
        smol_model.cfg, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16
    )
    assert isinstance(cfg, ModelConfig)
    return dataclasses.replace(
        smol_model, name="tiny", cfg=cfg, params=init_params(cfg, seed=1, scale=0.5), fingerprint="tiny0001"
    )


def hf_model_from_gguf(path):
    """transformers' torch model (float32, eager attention) holding our dequantized GGUF weights."""
    import torch
    import transformers

    from models.gguf import read_gguf

    ckpt = read_gguf(path, progress=False)
    cfg = transformers.AutoConfig.for_model(**ckpt.hf_config)
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    state = {k: torch.from_numpy(v.copy()) for k, v in ckpt.tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    if missing:
        model.tie_weights()
    return model


@pytest.fixture(scope="session")
def smol_hf(smol_model):
    return hf_model_from_gguf(smol_model.path)
