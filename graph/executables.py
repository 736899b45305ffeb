"""The executable table: `(phase, batch, tokens, pages) -> StepProgram` (graph/programs.py: one
executable, or a front/layer/head chain), over the compiled executables kept by name.

Built with `jax.jit(fn, donate_argnums=kv).lower(abstract args).compile()` for every bucket, or
loaded from an artifact directory written by `save` (serialized executables + a manifest). A key
that is not in the table is a loud error: nothing is ever compiled while serving.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import pickle
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jaxlib
from jax.experimental.serialize_executable import deserialize_and_load, serialize
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from graph import compile_cache
from graph.api import EngineConfig
from graph.buckets import Buckets
from graph.layout import layer_loop
from graph.programs import INIT_KV, Key, StepProgram, lowerings, segments_of, unit_names
from models.config import ModelConfig

log = logging.getLogger("graph.executables")

MANIFEST = "manifest.json"


class UncompiledShapeError(RuntimeError):
    """A step asked for a bucket that is not in the table: a bug, never a silent compile."""


def _memory(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "generated_code_size_in_bytes")
    return {f: int(getattr(m, f, 0) or 0) for f in fields} if m is not None else {}


class _FromCache:
    """Tells whether everything a call compiled on this thread came from jax's persistent
    compilation cache (jax reports each cache request and each hit as an event on the compiling
    thread)."""

    REQUEST, HIT = "/jax/compilation_cache/compile_requests_use_cache", "/jax/compilation_cache/cache_hits"

    def __init__(self) -> None:
        self._local = threading.local()

    def __enter__(self) -> _FromCache:
        jax.monitoring.register_event_listener(self._on_event)
        return self

    def __exit__(self, *exc: object) -> None:
        jax.monitoring.unregister_event_listener(self._on_event)

    def _on_event(self, event: str, **kwargs: Any) -> None:
        counts = getattr(self._local, "counts", None)
        if counts is not None and event in counts:
            counts[event] += 1

    def run(self, fn: Callable[[], Any]) -> tuple[Any, bool]:
        """-> (fn(), whether it compiled something and all of it came from the cache)."""
        self._local.counts = counts = {self.REQUEST: 0, self.HIT: 0}
        try:
            return fn(), 0 < counts[self.REQUEST] == counts[self.HIT]
        finally:
            self._local.counts = None


def _compile_parallel(
    lowering: dict[str, Callable[[], Any]], names: list[str]
) -> Iterator[tuple[str, Any, float, bool]]:
    """Lower and compile `names`, one compilation per core (XLA compiles outside the GIL); -> as each
    finishes: (name, executable, seconds, whether it came from the compilation cache)."""

    def one(n: str) -> tuple[str, Any, float, bool]:
        t0 = time.monotonic()
        compiled, hit = from_cache.run(lambda: lowering[n]().compile())
        return n, compiled, time.monotonic() - t0, hit

    with _FromCache() as from_cache, concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for future in concurrent.futures.as_completed([pool.submit(one, n) for n in names]):
            yield future.result()


class _Progress:
    """Compilation progress: a bar with the count, elapsed time and an estimate of the rest when
    stderr is a terminal (tqdm), else one log line per executable."""

    def __init__(self, total: int) -> None:
        self.total, self.finished = total, 0
        self._bar: tqdm | None = None
        self._redirect: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if sys.stderr.isatty():
            self._bar = tqdm(total=total, desc="compiling", unit="exe", file=sys.stderr, dynamic_ncols=True)
            self._redirect = logging_redirect_tqdm()  # log lines print above the bar, not through it

    def __enter__(self) -> _Progress:
        self._redirect.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
        self._redirect.__exit__(*exc)

    def done(self, name: str, seconds: float, cached: bool) -> None:
        self.finished += 1
        if self._bar is not None:
            self._bar.set_postfix_str(name, refresh=False)
            self._bar.update()
        elif cached:
            log.info("loaded %d/%d %s from the compilation cache in %.1fs", self.finished, self.total, name, seconds)
        else:
            log.info("compiled %d/%d %s in %.1fs", self.finished, self.total, name, seconds)


def lower(cfg: ModelConfig, dtype: str, config: EngineConfig, num_pages: int, key: Key) -> dict[str, Any]:
    """The lowered (not yet compiled) executables of one table entry, by name."""
    fns = lowerings(cfg, dtype, config, num_pages, key, config.max_seq_len)
    return {n: fn() for n, fn in fns.items()}


@dataclasses.dataclass
class ExecutableTable:
    cfg: ModelConfig
    dtype: str
    config: EngineConfig
    buckets: Buckets
    num_pages: int
    executables: dict[str, Any]  # by unit name (graph/programs.py)
    memory: dict[str, dict[str, int]]
    from_cache: frozenset[str] = frozenset()  # loaded from the compilation cache: not serializable

    def __post_init__(self) -> None:
        self._programs: dict[Key, StepProgram] = {}

    @classmethod
    def compile(
        cls,
        cfg: ModelConfig,
        dtype: str,
        config: EngineConfig,
        buckets: Buckets,
        num_pages: int,
        serializable: bool = False,
    ) -> ExecutableTable:
        """Compile every executable of the table, or load it from the compilation cache: from its
        executable store, else through jax's cache (graph/compile_cache.py). `serializable`: only
        fresh compilations, which `save` can write (those jax's cache had are compiled again)."""
        lowering: dict[str, Any] = {}
        for key in [INIT_KV, *buckets.all_keys()]:
            for n, fn in lowerings(cfg, dtype, config, num_pages, key, config.max_seq_len).items():
                lowering.setdefault(n, fn)
        store = compile_cache.executable_store(_store_key(cfg, dtype, config, buckets, num_pages))
        started = time.monotonic()
        log.info("compiling %d executables (%s, %s, %d KV pages)", len(lowering), dtype, layer_loop(config), num_pages)
        executables, memory, cached = {}, {}, set()
        with _Progress(len(lowering)) as progress:
            for n, compiled, seconds in _read_stored(store, list(lowering)) if not serializable else ():
                executables[n], memory[n] = compiled, _memory(compiled)
                cached.add(n)
                progress.done(n, seconds, True)
            for n, compiled, seconds, hit in _compile_parallel(lowering, [n for n in lowering if n not in cached]):
                executables[n], memory[n] = compiled, _memory(compiled)
                if hit:
                    cached.add(n)
                elif store is not None:
                    store.write(n, _serialize(compiled))
                progress.done(n, seconds, hit)
        log.info(
            "%d executables ready in %.1fs: %d compiled, %d from the compilation cache",
            len(lowering), time.monotonic() - started, len(lowering) - len(cached), len(cached),
        )  # fmt: skip
        if serializable and cached:
            log.info("compiling the %d from the cache again, bypassing it, to write them", len(cached))
            with compile_cache.bypassed(), _Progress(len(cached)) as progress:
                for n, compiled, seconds, hit in _compile_parallel(lowering, sorted(cached)):
                    executables[n] = compiled
                    if store is not None:
                        store.write(n, _serialize(compiled))
                    progress.done(n, seconds, hit)
            cached.clear()
        return cls(cfg, dtype, config, buckets, num_pages, executables, memory, frozenset(cached))

    def get(self, key: Key) -> StepProgram:
        program = self._programs.get(key)
        if program is None:
            names = unit_names(key, layer_loop(self.config))
            if not all(n in self.executables for n in names):
                raise UncompiledShapeError(f"no compiled executable for {key}; buckets: {self.buckets}")
            program = self._programs[key] = StepProgram(
                self.cfg, [self.executables[n] for n in names], len(segments_of(key))
            )
        return program

    def init_kv(self) -> Any:
        return self.executables["init_kv"]()

    # ---- artifacts ----

    def manifest(self, fingerprint: str) -> dict[str, Any]:
        return {
            **identity(fingerprint, self.dtype, self.config, self.buckets),
            "num_pages": self.num_pages,
            "memory": self.memory,
        }

    def save(self, directory: str | Path, fingerprint: str) -> None:
        if self.from_cache:
            raise RuntimeError(
                f"{len(self.from_cache)} executables came from the compilation cache and cannot be serialized "
                "(graph/compile_cache.py): compile the table with serializable=True"
            )
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for n, compiled in self.executables.items():
            (directory / f"{n}.bin").write_bytes(_serialize(compiled))
        (directory / MANIFEST).write_text(json.dumps(self.manifest(fingerprint), indent=2))
        log.info("wrote %d executables and %s to %s", len(self.executables), MANIFEST, directory)

    @classmethod
    def load(
        cls,
        directory: str | Path,
        cfg: ModelConfig,
        dtype: str,
        config: EngineConfig,
        buckets: Buckets,
        fingerprint: str,
    ) -> ExecutableTable:
        directory = Path(directory)
        manifest = read_manifest(directory)
        expected = identity(fingerprint, dtype, config, buckets)
        differ = [
            f"{k}: artifact has {manifest.get(k)!r}, this server {v!r}"
            for k, v in expected.items()
            if _jsonable(manifest.get(k)) != _jsonable(v)
        ]
        if differ:
            raise ArtifactMismatchError(f"{directory}: artifact does not match this server: " + "; ".join(differ))
        started = time.monotonic()
        loop = layer_loop(config)
        names = list(dict.fromkeys(n for key in [INIT_KV, *buckets.all_keys()] for n in unit_names(key, loop)))
        executables = {}
        for n in names:
            path = directory / f"{n}.bin"
            if not path.exists():
                raise ArtifactMismatchError(f"{path}: missing executable")
            executables[n] = _deserialize(path.read_bytes())
        log.info("loaded %d executables from %s in %.1fs", len(names), directory, time.monotonic() - started)
        memory = {n: manifest["memory"].get(n, {}) for n in names}
        return cls(cfg, dtype, config, buckets, int(manifest["num_pages"]), executables, memory)


def _serialize(compiled: Any) -> bytes:
    return pickle.dumps(serialize(compiled))


def _deserialize(data: bytes) -> Any:
    payload, in_tree, out_tree = pickle.loads(data)
    return deserialize_and_load(payload, in_tree, out_tree)


# EngineConfig fields that size the pool (its page count is a key of its own) or the queue, say
# where executables come from, or only steer the host side: the store's key leaves them out.
_NOT_IN_EXECUTABLES = (
    "kv_memory_gb", "kv_pages", "kv_memory_fraction", "max_queue", "max_queue_wait", "aot_dir", "compile_cache",
    "enable_prefix_caching", "debug_step_delay", "debug_fail_step",
)  # fmt: skip


def _store_key(cfg: ModelConfig, dtype: str, config: EngineConfig, buckets: Buckets, num_pages: int) -> dict[str, Any]:
    """The table's part of its executables' key in the compilation cache's store."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in _NOT_IN_EXECUTABLES}
    return {"identity": identity("", dtype, config, buckets), "config": fields, "model": repr(cfg), "pages": num_pages}


def _read_stored(store: compile_cache.ExecutableStore | None, names: list[str]) -> Iterator[tuple[str, Any, float]]:
    """The executables of `names` that the store has, as each is loaded: (name, executable, seconds).
    A damaged entry is passed over (and compiled)."""

    def one(n: str) -> tuple[str, Any, float]:
        t0 = time.monotonic()
        data = store.read(n)
        try:
            compiled = None if data is None else _deserialize(data)
        except Exception as e:
            log.warning("ignoring stored executable %s: %s", n, e)
            compiled = None
        return n, compiled, time.monotonic() - t0

    if store is None:
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for n, compiled, seconds in pool.map(one, names):
            if compiled is not None:
                yield n, compiled, seconds


def identity(fingerprint: str, dtype: str, config: EngineConfig, buckets: Buckets) -> dict[str, Any]:
    """Everything an executable depends on: an artifact made for other values is refused."""
    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "model_fingerprint": fingerprint,
        "dtype": dtype,
        "buckets": dataclasses.asdict(buckets),
        "max_seq_len": config.max_seq_len,
        "layer_loop": layer_loop(config),
        "quantize": config.quantize,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


class ArtifactMismatchError(RuntimeError):
    """An AOT artifact directory made for another model, bucket set, dtype, backend or jax."""


def read_manifest(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        raise ArtifactMismatchError(
            f"{directory}: no {MANIFEST}: not an artifact directory (make one with python -m graph.aot)"
        ) from None


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x))
