"""XLA's persistent compilation cache: a start that meets an executable it compiled before loads it
from disk instead of compiling it again (seconds instead of minutes for the default table).

On by default, in a per-user directory: `$XDG_CACHE_HOME/xlaserve/xla`, else `~/.cache/xlaserve/xla`
(`--compile-cache DIR` moves it, `--compile-cache off` turns it off), with jax's cache in `DIR/jax`
and the executable store (below) in `DIR/executables`. Every executable is cached, the small and
quick ones too, so a warm start compiles nothing. A model load keeps a GGUF file's converted
tokenizer in `DIR/tokenizers` (models/tokenizer.py: Gemma 3's takes ~6 s to build, ~1.5 s to read).

A stale executable cannot be loaded: jax looks an executable up by a hash (jax/_src/cache_key.py,
jax 0.10.2) over the StableHLO of the program (so the model's shapes and config, the bucket, the
dtype, the layer loop and quantization: everything that shapes the computation), the jaxlib
version, the backend's platform and version, the device topology (or device kinds), `XLA_FLAGS`
(plus `--xla*` command-line arguments), and the serialized compile options (which carry the
XLA debug options those flags set, and the cache's own path: jax puts an XLA autotuning directory
under it there, so a moved cache misses). A new jax emits its own HLO and comes with its own jaxlib
(both are pinned together). Weights are arguments, not constants, so a model with the same shapes
and other weights rightly shares executables. The key leaves out the host's CPU features, which
XLA:CPU code is built for: a home directory shared by machines with different CPUs wants one
`--compile-cache` per machine kind (jaxlib 0.10.2 does check them when it loads XLA:CPU code, "...
is not supported on the host machine", and jax turns a failed load into a warning and a compile).

jax's cache needs the program to find its executable, and tracing and lowering the model is most
of a warm start (16 of 22 s for 86 executables). So each fresh compilation is also kept, serialized
as compiled (graph/executable_io.py: payload and description, no pickle; an entry that does not
read back is a miss), in an `ExecutableStore` beside jax's cache, found by a key over what the
table is built from: the engine's configuration (all of it but the fields that only size the pool
or the queue), the pool's page count, the model config, the jax, jaxlib, numpy and ml_dtypes
versions, jax's configuration, the `JAX_*`, `XLA_*` and `LIBTPU_*` environment, backend and
devices, and a hash of the source of graph/ and models/. A start reads it before lowering anything
(86 executables: ~3 s); what it lacks goes through jax's cache, whose exact key decides. After a
change to graph/ or models/, then, a start lowers again and stays as slow as jax's cache makes it
(what jax's cache had is not stored again) until the directory is cleared.

jax 0.10.2 cannot serialize an executable it loaded from a cache (the XLA:CPU executable written
again lacks its kernels: "Function ... not found" when it runs), so only fresh compilations are
stored, and an AOT artifact holds fresh compilations only (`ExecutableTable.compile(...,
serializable=True)`).

The directory is trusted: a cached executable is machine code that runs in this process, so whoever
can write to the directory can run code here. It is created private (mode 0700), and a directory
that others may write to, or that belongs to another user, is refused.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
from jax.experimental.compilation_cache import compilation_cache

OFF = "off"
_active: Path | None = None  # the directory configure() last set in this process (None: off, or never set)


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "xlaserve" / "xla"


def resolve(setting: str | None) -> Path | None:
    """`EngineConfig.compile_cache` -> the cache directory, or None when it is off."""
    if setting == OFF:
        return None
    return Path(setting).expanduser().absolute() if setting else default_dir()


class ExecutableStore:
    """Serialized executables by unit name, under a key over everything their table is built from
    (see the module docstring); `key` holds the table's own part of it."""

    def __init__(self, root: Path, key: dict[str, Any]) -> None:
        full = {
            **key,
            "versions": {m: importlib.metadata.version(m) for m in ("jax", "jaxlib", "numpy", "ml_dtypes")},
            "jax_config": {k: v for k, v in jax.config.values.items() if "cache" not in k},
            "environment": {k: v for k, v in os.environ.items() if k.startswith(("JAX_", "XLA_", "LIBTPU_"))},
            "source": source_digest(),
        }
        self.root = root
        self._digest = hashlib.sha256(json.dumps(full, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def _path(self, name: str) -> Path:
        return self.root / f"{name}-{self._digest}.bin"

    def read(self, name: str) -> bytes | None:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes) -> None:
        self.root.mkdir(mode=0o700, exist_ok=True)
        path = self._path(name)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_bytes(data)
        os.replace(partial, path)  # readers in other processes see all of it or nothing


def executable_store(key: dict[str, Any]) -> ExecutableStore | None:
    """The store for a table with this key, or None when the cache is off."""
    return None if _active is None else ExecutableStore(_active / "executables", key)


@functools.cache
def source_digest() -> str:
    """A hash of the code that builds executables: every module of graph/ and models/."""
    digest = hashlib.sha256()
    for package in ("graph", "models"):
        root = Path(importlib.import_module(package).__file__).parent
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root.parent)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def configure(setting: str | None) -> Path | None:
    """Point jax's persistent compilation cache at `setting` (see `resolve`); call before compiling.
    -> the directory in use, or None."""
    path = resolve(setting)
    if path is not None:
        _check_private(path)
    _apply(path)
    return path


def tokenizer_cache(setting: str | None) -> Path | None:
    """Where a model load keeps converted GGUF tokenizers (models/tokenizer.py): `DIR/tokenizers` of
    the cache `setting` names (see `resolve`), or None when it is off."""
    path = resolve(setting)
    if path is None:
        return None
    _check_private(path)
    return path / "tokenizers"


@contextlib.contextmanager
def bypassed() -> Iterator[None]:
    """Compile without the cache (nothing read, nothing written) inside the block, which must not
    overlap other compilations: the setting is process-wide."""
    before = _active
    _apply(None)
    try:
        yield
    finally:
        _apply(before)


def _apply(path: Path | None) -> None:
    global _active
    # jax opens its cache once, at the first compilation after a reset (which it logs at INFO: noise here)
    jax_log = logging.getLogger("jax._src.compilation_cache")
    level = jax_log.level
    jax_log.setLevel(logging.WARNING)
    try:
        compilation_cache.reset_cache()
    finally:
        jax_log.setLevel(level)
    jax.config.update("jax_enable_compilation_cache", path is not None)
    jax.config.update("jax_compilation_cache_dir", None if path is None else str(path / "jax"))
    if path is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # default: only those over 1 s
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # no size threshold
    _active = path


def _check_private(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
    except OSError as e:
        raise ValueError(f"compile cache {path}: {e.strerror or e} (choose another with --compile-cache DIR)") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"compile cache {path} is not a directory")
    if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ValueError(
            f"compile cache {path} may be written by other users (mode {stat.S_IMODE(st.st_mode):o}, owner uid "
            f"{st.st_uid}), and what it holds runs as code in this process: make it yours and private "
            "(chmod go-w), choose another with --compile-cache DIR, or turn it off with --compile-cache off"
        )
