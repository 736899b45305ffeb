"""The executable table: `(phase, batch, tokens, pages) -> compiled executable`.

Built with `jax.jit(step, donate_argnums=kv).lower(abstract args).compile()` for every bucket, or
loaded from an artifact directory written by `save` (serialized executables + a manifest). A key
that is not in the table is a loud error: nothing is ever compiled while serving.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import logging
import os
import pickle
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
from jax.experimental.serialize_executable import deserialize_and_load, serialize

from graph.api import EngineConfig
from graph.buckets import Buckets
from graph.layout import abstract_device_weights, layer_loop
from graph.sampling import MAX_LOGIT_BIAS, MAX_SUPPRESS, SamplingArrays
from graph.step import StepInputs, init_kv, step
from models.config import ModelConfig
from models.layers import kv_shape
from models.params import DTYPES

log = logging.getLogger("graph.executables")

Key = tuple[str, int, int, int]  # (phase, batch, tokens, pages)
INIT_KV: Key = ("init_kv", 0, 0, 0)
MANIFEST = "manifest.json"


class UncompiledShapeError(RuntimeError):
    """A step asked for a bucket that is not in the table: a bug, never a silent compile."""


def abstract_inputs(key: Key, max_seq_len: int) -> StepInputs:
    _, B, T, W = key
    i32, f32 = jnp.int32, jnp.float32

    def a(shape, dtype=i32):
        return jax.ShapeDtypeStruct(shape, dtype)

    return StepInputs(
        tokens=a((B, T)),
        positions=a((B, T)),
        page_table=a((B, W)),
        last_index=a((B,)),
        sampling=SamplingArrays(
            temperature=a((B,), f32),
            top_k=a((B,)),
            top_p=a((B,), f32),
            min_p=a((B,), f32),
            presence=a((B,), f32),
            frequency=a((B,), f32),
            repetition=a((B,), f32),
            bias_ids=a((B, MAX_LOGIT_BIAS)),
            bias_values=a((B, MAX_LOGIT_BIAS), f32),
            suppress_ids=a((B, MAX_SUPPRESS)),
            seed=a((B,), jnp.uint32),
            want_top=a((B,), jnp.bool_),
        ),
        history=a((B, max_seq_len)),
        prompt_len=a((B,)),
        next_tokens=a((B, T)),
        want_prompt_logprobs=a((), jnp.bool_),
    )


def _memory(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "generated_code_size_in_bytes")
    return {f: int(getattr(m, f, 0) or 0) for f in fields} if m is not None else {}


def lower(cfg: ModelConfig, dtype: str, config: EngineConfig, num_pages: int, key: Key):
    """The lowered (not yet compiled) computation of one table entry."""
    jdtype = DTYPES[dtype]
    shape = kv_shape(cfg, num_pages, config.page_size)
    if key == INIT_KV:
        return jax.jit(functools.partial(init_kv, shape, jdtype)).lower()
    fn = functools.partial(step, cfg=cfg, prefill=key[0] == "prefill")
    kv = init_kv_abstract(shape, jdtype)
    # float32 means float32: no TF32 shortcut on GPUs (it breaks parity with the reference by ~1e-3)
    with jax.default_matmul_precision("highest" if dtype == "float32" else "default"):
        return jax.jit(fn, donate_argnums=(1,)).lower(
            abstract_device_weights(cfg, dtype, config), kv, abstract_inputs(key, config.max_seq_len)
        )


def init_kv_abstract(shape, dtype):
    return jax.eval_shape(functools.partial(init_kv, shape, dtype))


@dataclasses.dataclass
class ExecutableTable:
    cfg: ModelConfig
    dtype: str
    config: EngineConfig
    buckets: Buckets
    num_pages: int
    executables: dict[Key, Any]
    memory: dict[Key, dict[str, int]]

    @classmethod
    def compile(
        cls, cfg: ModelConfig, dtype: str, config: EngineConfig, buckets: Buckets, num_pages: int
    ) -> ExecutableTable:
        keys = [INIT_KV, *buckets.all_keys()]
        started = time.monotonic()
        log.info("compiling %d executables (%s, %d KV pages)", len(keys), dtype, num_pages)
        executables, memory = {}, {}
        lowered = [(key, lower(cfg, dtype, config, num_pages, key)) for key in keys]

        def compile_one(item):
            key, computation = item
            t0 = time.monotonic()
            return key, computation.compile(), time.monotonic() - t0

        # XLA compiles outside the GIL: one compilation per core
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for i, (key, compiled, seconds) in enumerate(pool.map(compile_one, lowered), 1):
                executables[key], memory[key] = compiled, _memory(compiled)
                log.info("compiled %d/%d %s in %.1fs", i, len(keys), name(key), seconds)
        log.info("compiled %d executables in %.1fs", len(keys), time.monotonic() - started)
        return cls(cfg, dtype, config, buckets, num_pages, executables, memory)

    def get(self, key: Key):
        try:
            return self.executables[key]
        except KeyError:
            raise UncompiledShapeError(f"no compiled executable for {key}; buckets: {self.buckets}") from None

    # ---- artifacts ----

    def manifest(self, fingerprint: str) -> dict[str, Any]:
        return {
            **identity(fingerprint, self.dtype, self.config, self.buckets),
            "num_pages": self.num_pages,
            "memory": {name(k): v for k, v in self.memory.items()},
        }

    def save(self, directory: str | Path, fingerprint: str) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for key, compiled in self.executables.items():
            (directory / f"{name(key)}.bin").write_bytes(pickle.dumps(serialize(compiled)))
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
        keys = [INIT_KV, *buckets.all_keys()]
        executables = {}
        for key in keys:
            path = directory / f"{name(key)}.bin"
            if not path.exists():
                raise ArtifactMismatchError(f"{path}: missing executable")
            payload, in_tree, out_tree = pickle.loads(path.read_bytes())
            executables[key] = deserialize_and_load(payload, in_tree, out_tree)
        log.info("loaded %d executables from %s in %.1fs", len(keys), directory, time.monotonic() - started)
        memory = {k: manifest["memory"].get(name(k), {}) for k in keys}
        return cls(cfg, dtype, config, buckets, int(manifest["num_pages"]), executables, memory)


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


def name(key: Key) -> str:
    phase, b, t, p = key
    return phase if key == INIT_KV else f"{phase}_b{b}_t{t}_p{p}"
