"""XLA's persistent compilation cache: a start that meets an executable it compiled before loads it
from disk instead of compiling it again (seconds instead of minutes for the default table).

On by default, in a per-user directory: `$XDG_CACHE_HOME/xlaserve/xla`, else `~/.cache/xlaserve/xla`
(`--compile-cache DIR` moves it, `--compile-cache off` turns it off). Every executable is cached,
the small and quick ones too, so a warm start compiles nothing.

A stale executable cannot be loaded: jax looks an executable up by a hash (jax/_src/cache_key.py,
jax 0.10.2) over the StableHLO of the program (so the model's shapes and config, the bucket, the
dtype, the layer loop and quantization: everything that shapes the computation), the jaxlib
version, the backend's platform and version, the device topology (or device kinds), `XLA_FLAGS`
(plus `--xla*` command-line arguments), and the serialized compile options (which carry the
XLA debug options those flags set). A new jax emits its own HLO and comes with its own jaxlib
(both are pinned together). Weights are arguments, not constants, so a model with the same shapes
and other weights rightly shares executables. XLA:CPU code is built for the host's CPU features,
which the key leaves out; on load XLA:CPU refuses an executable that uses features this host lacks,
and jax then warns and compiles afresh.

The directory is trusted: a cached executable is machine code that runs in this process, so whoever
can write to the directory can run code here. It is created private (mode 0700), and a directory
that others may write to, or that belongs to another user, is refused.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

OFF = "off"
_UNSET = object()
_active: object = _UNSET  # the directory (or None: off) configure() last set in this process


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "xlaserve" / "xla"


def resolve(setting: str | None) -> Path | None:
    """`EngineConfig.compile_cache` -> the cache directory, or None when it is off."""
    if setting == OFF:
        return None
    return Path(setting).expanduser().absolute() if setting else default_dir()


def configure(setting: str | None) -> Path | None:
    """Point jax's persistent compilation cache at `setting` (see `resolve`); call before compiling.
    -> the directory in use, or None."""
    global _active
    path = resolve(setting)
    if path is not None:
        _check_private(path)
    if path != _active:
        # jax opens its cache once per process, at the first compilation: a new setting needs a reset
        compilation_cache.reset_cache()
    jax.config.update("jax_enable_compilation_cache", path is not None)
    jax.config.update("jax_compilation_cache_dir", None if path is None else str(path))
    if path is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # default: only those over 1 s
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # no size threshold
    _active = path
    return path


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
