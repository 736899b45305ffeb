"""XLA's persistent compilation cache (graph/compile_cache.py): on by default in a private per-user
directory, a second start with a warm cache compiles nothing (from the executable store, or from
jax's cache when the store's key has changed), `--compile-cache off` reads and writes nothing, a
directory others may write to is refused; and the `xlaserve` console script runs both commands.
(That an artifact compiled with a warm cache runs: tests/test_aot.py.)"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from graph import compile_cache
from graph.api import EngineConfig, SamplingParams
from graph.compile_cache import default_dir  # the real one: tests/conftest.py gives engines the session's
from serving.cli import main as xlaserve
from serving.config import parse_args

# The smallest table, on the tiny model: one prefill and one decode bucket, fixed pages.
TINY = EngineConfig(
    max_batch=1, max_seq_len=64, min_prefill_tokens=16, max_prefill_tokens=16, min_context_tokens=64, kv_pages=8
)
COMPILED_LINE = re.compile(r"compiled \d+/\d+ ")


EVENTS = {
    "/jax/compilation_cache/compile_requests_use_cache": "requests",
    "/jax/compilation_cache/cache_hits": "hits",
    "/jax/core/compile/backend_compile_duration": "compiles",
}


class Events(collections.Counter):
    """jax.monitoring's compilation events while active: cache requests, cache hits, backend compiles."""

    def __enter__(self) -> Events:
        jax.monitoring.register_event_listener(self._on_event)
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        return self

    def __exit__(self, *exc: object) -> None:
        jax.monitoring.unregister_event_listener(self._on_event)
        jax.monitoring.unregister_event_duration_listener(self._on_duration)

    def _on_event(self, event: str, **kwargs: object) -> None:
        if event in EVENTS:
            self[EVENTS[event]] += 1

    def _on_duration(self, event: str, duration: float, **kwargs: object) -> None:
        self._on_event(event)


def _start(model, config: EngineConfig) -> tuple[Events, list[int]]:
    """Build an engine (counting what it compiles) and run one greedy request through it."""
    from graph.offline import LLM

    with Events() as events:
        llm = LLM(model, config)
    try:
        return events, llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0))[0].token_ids
    finally:
        llm.shutdown()


def test_default_directory_is_per_user(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_dir() == tmp_path / "xdg" / "xlaserve" / "xla"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_dir() == tmp_path / "home" / ".cache" / "xlaserve" / "xla"


@pytest.fixture(scope="module")
def warm(tiny_model, tmp_path_factory) -> tuple[EngineConfig, list[int]]:
    """A fresh cache after one start: (the engine config, the tokens that start generated)."""
    cache = tmp_path_factory.mktemp("cache") / "xla"
    config = dataclasses.replace(TINY, compile_cache=str(cache))
    cold, tokens = _start(tiny_model, config)
    assert cold["hits"] < cold["requests"]  # it compiled
    assert any((cache / "jax").iterdir()) and any((cache / "executables").iterdir())
    assert cache.stat().st_mode & 0o777 == 0o700  # private: it holds code
    return config, tokens


def _ready_line(caplog) -> str:
    lines = [r.getMessage() for r in caplog.records]
    assert not any(COMPILED_LINE.search(line) for line in lines), lines
    return next(line for line in lines if " executables ready in " in line)


# options that steer only the host side (the warm-up, pipelining, prefix caching, the queue): a
# start that changes them runs the same executables
HOST_SIDE = {"warmup": False, "pipeline": "off", "enable_prefix_caching": False, "max_queue": 3, "max_queue_wait": 0}


@pytest.mark.parametrize("host_side", [{}, HOST_SIDE], ids=["same-options", "host-side-options-changed"])
def test_second_start_with_a_warm_cache_compiles_nothing(tiny_model, warm, caplog, host_side):
    config, tokens = warm
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="graph.executables"):
        events, again = _start(tiny_model, dataclasses.replace(config, **host_side))
    assert re.search(r"ready in \S+: 0 compiled, [1-9]\d* from the compilation cache", _ready_line(caplog))
    assert events["requests"] == 0  # all from the executable store: nothing was even lowered
    assert again == tokens
    # jax counts a hit in its cache as a backend compile too, so the tests that assert zero
    # compilations (tests/test_aot.py, tests/test_engine.py) see an executable loaded from there
    assert events["compiles"] == events["hits"]


def test_a_planned_pool_compiles_each_executable_once_and_a_warm_start_lowers_nothing(tiny_model, tmp_path):
    """Sizing the pool from the host's memory needs the largest executable's temporaries: it is
    compiled for the pool the plan then gives (CPU: the decode batch's cap), so the table takes it
    from the store instead of compiling it again; and a warm start reads it from there too."""
    from graph.offline import LLM

    config = dataclasses.replace(TINY, kv_pages=None, max_batch=2, compile_cache=str(tmp_path / "xla"))
    for start in ("cold", "warm"):
        with Events() as events:
            llm = LLM(tiny_model, config)
        try:
            executables = len(llm.engine.table.executables)
            assert llm.engine.table.num_pages == config.max_batch * config.max_seq_len // config.page_size + 1
            assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0))[0].token_ids
        finally:
            llm.shutdown()
        if start == "cold":
            assert events["hits"] == 0 and events["compiles"] == executables
        else:
            assert events["requests"] == 0, events


@pytest.mark.parametrize("damage", ["code change", "truncated entries", "altered entries"])
def test_start_past_the_executable_store_loads_from_jax_cache(tiny_model, warm, caplog, monkeypatch, request, damage):
    """The store's key misses after any change to graph/ or models/, and a truncated or altered
    entry (its payload's checksum) is passed over; jax's cache, keyed by the program itself, then
    decides, and still compiles nothing."""
    config, tokens = warm
    if damage == "code change":
        monkeypatch.setattr(compile_cache, "source_digest", lambda: "another version of the code")
    else:  # (jax's key holds the cache's path: the damage is done in place, and undone after)
        entries = {path: path.read_bytes() for path in (Path(config.compile_cache) / "executables").iterdir()}
        request.addfinalizer(lambda: [path.write_bytes(data) for path, data in entries.items()])
        for path, data in entries.items():
            path.write_bytes(
                data[:100] if damage == "truncated entries" else data[:-50] + bytes([data[-50] ^ 1]) + data[-49:]
            )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="graph.executables"):
        events, again = _start(tiny_model, config)
    assert events["requests"] > 0 and events["hits"] == events["requests"]  # all of it from jax's cache
    assert re.search(r": 0 compiled, ", _ready_line(caplog)) and again == tokens


def test_other_xla_flags_compile_afresh(tiny_model, warm, caplog, monkeypatch):
    """Both keys take in `XLA_FLAGS`: with another flag, nothing comes from the cache."""
    config, tokens = warm
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_fast_min_max=false")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="graph.executables"):
        events, again = _start(tiny_model, config)
    assert events["requests"] > 0 and events["hits"] == 0
    assert any(re.search(r"ready in \S+: [1-9]\d* compiled, 0 from", r.getMessage()) for r in caplog.records)
    assert again == tokens


def test_compile_cache_off_writes_nothing(tiny_model, tmp_path, monkeypatch, session_compile_cache):
    config = dataclasses.replace(TINY, compile_cache=parse_args(["--compile-cache", "off"]).engine.compile_cache)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # where a default cache would go
    before = sorted(session_compile_cache.iterdir())
    events, _ = _start(tiny_model, config)
    assert events["compiles"] > 0 and events["requests"] == 0  # it compiled, and asked no cache
    assert not any(tmp_path.iterdir()) and sorted(session_compile_cache.iterdir()) == before


def test_cache_directory_others_can_write_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ValueError, match="may be written by other users"):
        compile_cache.configure(str(shared))


def test_console_script_runs_both_commands(capsys):
    script = Path(sys.executable).with_name("xlaserve")
    assert script.exists(), f"{script} is missing: install the package (make install)"
    top = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert top.returncode == 0 and "serve" in top.stdout and "compile" in top.stdout
    for command, option in (("serve", "--port"), ("compile", "--out")):
        with pytest.raises(SystemExit) as exit:
            xlaserve([command, "--help"])
        assert exit.value.code == 0
        usage = capsys.readouterr().out
        assert usage.startswith(f"usage: xlaserve {command} ") and option in usage and "--compile-cache" in usage
