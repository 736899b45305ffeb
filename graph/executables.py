"""The executable table: `(phase, batch, tokens, pages) -> StepProgram` (graph/programs.py: one
executable, or a front/layer/head chain), over the compiled executables kept by name.

Built with `jax.jit(fn, donate_argnums=kv).lower(abstract args).compile()` for every bucket, or
loaded from an artifact directory written by `save`: each executable's payload in `NAME.bin`, and
`manifest.json` with what the table was built for and each executable's description and checksum
(graph/executable_io.py: data only, nothing in the directory is unpickled or imported). A key that
is not in the table is a loud error: nothing is ever compiled while serving.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jaxlib
import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from graph import compile_cache, executable_io, sharding
from graph.api import ArtifactMismatchError, EngineConfig
from graph.buckets import Buckets
from graph.layout import kv_dtype, layer_loop, mesh_of
from graph.programs import INIT_KV, Key, StepProgram, lowerings, sharded_inputs, unit_names
from graph.step import State, StepInputs, carry_size
from models import quant
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
        keys: list[Key] | None = None,
    ) -> ExecutableTable:
        """Compile every executable of the table (or of `keys` only: benchmarks), or load it from
        the compilation cache: from its executable store, else through jax's cache
        (graph/compile_cache.py). `serializable`: only fresh compilations, which `save` can write
        (jax's cache is neither read nor written; the executable store still gets them)."""
        lowering: dict[str, Any] = {}
        for key in [INIT_KV, *(buckets.all_keys() if keys is None else keys)]:
            for n, fn in lowerings(cfg, dtype, config, num_pages, key, config.max_seq_len).items():
                lowering.setdefault(n, fn)
        store = compile_cache.executable_store(_store_key(cfg, dtype, config, buckets, num_pages))
        started = time.monotonic()
        log.info("compiling %d executables (%s, %s, %d KV pages)", len(lowering), dtype, layer_loop(config), num_pages)
        executables, memory, cached = {}, {}, set()
        # An artifact takes fresh compilations only: jax 0.10.2 cannot serialize an executable it
        # loaded from its cache (the XLA:CPU code written again lacks its kernels), and telling
        # which ones came from it by jax's events missed some (a small `init_kv` among them).
        bypass = compile_cache.bypassed() if serializable else contextlib.nullcontext()
        with _Progress(len(lowering)) as progress, bypass:
            for n, compiled, seconds in _read_stored(store, list(lowering)) if not serializable else ():
                executables[n], memory[n] = compiled, _memory(compiled)
                cached.add(n)
                progress.done(n, seconds, True)
            for n, compiled, seconds, hit in _compile_parallel(lowering, [n for n in lowering if n not in cached]):
                executables[n], memory[n] = compiled, _memory(compiled)
                if hit:
                    cached.add(n)
                else:
                    _store(store, n, compiled)
                progress.done(n, seconds, hit)
        log.info(
            "%d executables ready in %.1fs: %d compiled, %d from the compilation cache",
            len(lowering), time.monotonic() - started, len(lowering) - len(cached), len(cached),
        )  # fmt: skip
        return cls(cfg, dtype, config, buckets, num_pages, executables, memory, frozenset(cached))

    def get(self, key: Key) -> StepProgram:
        program = self._programs.get(key)
        if program is None:
            names = unit_names(key, layer_loop(self.config))
            if not all(n in self.executables for n in names):
                raise UncompiledShapeError(f"no compiled executable for {key}; buckets: {self.buckets}")
            program = self._programs[key] = StepProgram(
                self.cfg,
                key,
                [self.executables[n] for n in names],
                sharded_inputs(self.cfg, self.config, key, self.config.max_seq_len),
                mesh_of(self.config),
            )
        return program

    def init_kv(self) -> State:
        """A new, empty KV pool and the (zero) sampled tokens of no step yet."""
        sampled = np.zeros(carry_size(self.buckets.decode_batch[-1]), np.int32)
        return State(self.executables["init_kv"](), jax.device_put(sampled, sharding.replicated(mesh_of(self.config))))

    # ---- artifacts ----

    def manifest(self, fingerprint: str, executables: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {
            **identity(fingerprint, self.dtype, self.config, self.buckets),
            "num_pages": self.num_pages,
            "memory": self.memory,
            "executables": executables,  # by name: executable_io's description, with the payload's sha256
        }

    def save(self, directory: str | Path, fingerprint: str) -> None:
        if self.from_cache:
            raise RuntimeError(
                f"{len(self.from_cache)} executables came from the compilation cache and cannot be serialized "
                "(graph/compile_cache.py): compile the table with serializable=True"
            )
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        descriptions = {}
        for n, compiled in self.executables.items():
            descriptions[n], payload = executable_io.describe(compiled)
            (directory / f"{n}.bin").write_bytes(payload)
        (directory / MANIFEST).write_text(json.dumps(self.manifest(fingerprint, descriptions), indent=2))
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
        descriptions, memory, num_pages = (manifest.get(k) for k in ("executables", "memory", "num_pages"))
        if not (isinstance(descriptions, dict) and isinstance(memory, dict) and isinstance(num_pages, int)):
            raise ArtifactMismatchError(
                f"{directory / MANIFEST}: no executable descriptions (made by an older version?): make it again "
                "with python -m graph.aot"
            )
        _check_pool(directory, config, num_pages)
        executables = {n: _load_one(directory / f"{n}.bin", descriptions.get(n)) for n in names}
        log.info("loaded %d executables from %s in %.1fs", len(names), directory, time.monotonic() - started)
        return cls(cfg, dtype, config, buckets, num_pages, executables, {n: memory.get(n, {}) for n in names})


def _check_pool(directory: Path, config: EngineConfig, num_pages: int) -> None:
    """The pool's page count is a shape of the artifact's executables: `--kv-pages` must be the
    artifact's own, and `--kv-memory-gb` (a budget to size a new pool from) has nothing to size."""
    if config.kv_pages is not None and config.kv_pages != num_pages:
        raise ArtifactMismatchError(
            f"{directory}: the artifact's KV pool has {num_pages} pages, fixed when it was compiled, not "
            f"--kv-pages {config.kv_pages}: leave --kv-pages out, or compile the artifact with it"
        )
    if config.kv_pages is None and config.kv_memory_gb is not None:
        raise ArtifactMismatchError(
            f"{directory}: --kv-memory-gb cannot resize the artifact's KV pool ({num_pages} pages, fixed when it "
            "was compiled): leave it out, or pass it to python -m graph.aot"
        )


def _load_one(path: Path, description: Any) -> Any:
    """An artifact's executable; ArtifactMismatchError naming the file if it is missing, damaged or
    not what the manifest describes."""
    if not isinstance(description, dict):
        raise ArtifactMismatchError(
            f"{path}: not described in {MANIFEST} (made by another version of xlaserve, whose steps are other "
            "executables?): make it again with python -m graph.aot"
        )
    try:
        return executable_io.load(description, path.read_bytes())
    except FileNotFoundError:
        raise ArtifactMismatchError(f"{path}: missing executable") from None
    except executable_io.BadExecutableError as e:
        raise ArtifactMismatchError(f"{path}: {e}") from None
    except Exception as e:  # the backend refused a payload that is the one described
        raise ArtifactMismatchError(f"{path}: cannot load the executable: {e}") from None


def _store(store: compile_cache.ExecutableStore | None, name: str, compiled: Any) -> None:
    """Keep a fresh compilation in the store: its description and payload in one file (one atomic
    write). The store only saves time: an executable it cannot take is left out, with a warning."""
    if store is None:
        return
    try:
        store.write(name, executable_io.pack(*executable_io.describe(compiled)))
    except (executable_io.BadExecutableError, OSError) as e:
        log.warning("not storing executable %s: %s", name, e)


# EngineConfig fields that size the pool (its page count is a key of its own) or the queue, say
# where executables come from, or only steer the host side: the store's key leaves them out.
_NOT_IN_EXECUTABLES = (
    "kv_memory_gb", "kv_pages", "kv_memory_fraction", "max_queue", "max_queue_wait", "aot_dir", "compile_cache",
    "enable_prefix_caching", "pipeline", "prompt_lookup_max", "prompt_lookup_min", "warmup", "debug_step_delay",
    "debug_fail_step",
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
            compiled = None if data is None else executable_io.load(*executable_io.unpack(data))
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
        "mesh": sharding.describe(mesh_of(config)),  # axes, device kind and count, processes
        "model_fingerprint": fingerprint,
        "dtype": dtype,
        "buckets": dataclasses.asdict(buckets),
        "max_seq_len": config.max_seq_len,
        "layer_loop": layer_loop(config),
        "quantize": config.quantize,
        **({"int8_layout": quant.LAYOUT} if config.quantize == "int8" else {}),
        "kv_cache_dtype": kv_dtype(config, dtype),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "step_inputs": list(StepInputs._fields),  # what every step takes (e.g. the grammar mask)
    }


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactMismatchError(
            f"{directory}: no {MANIFEST}: not an artifact directory (make one with python -m graph.aot)"
        ) from None
    except (ValueError, OSError) as e:
        raise ArtifactMismatchError(f"{path}: unreadable: {e}") from None
    if not isinstance(manifest, dict):
        raise ArtifactMismatchError(f"{path}: not a manifest")
    return manifest


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x))
