"""Orbax checkpoints of the compute-form weights: writing one (`convert`, for `scripts/convert.py`)
and restoring one onto the mesh (`load_weights`, which the engine calls for every model).

Why the compute form (`models.params.prepare`'s `Weights`: fused Q|K|V and gate|up, flattened,
optionally int8) rather than the checkpoint form: a start must compile nothing, not even small
programs, and `prepare` run on device arrays would compile; run on the host it needs the whole
model in host memory first. A compute-form checkpoint holds exactly the arrays the engine puts on
the device, so each is restored straight into its sharding (orbax reads each device's shard of
each array, target `jax.ShapeDtypeStruct`s from `graph.layout.abstract_device_weights`) and no
full host copy is ever made. The price: the checkpoint is tied to the options `prepare` took
(layer loop, int8 and its lowering per backend, dtype); an engine with other options refuses it
and says how to convert again (`check_weights`).

On disk (next to models/checkpoint.py's metadata and the tokenizer) the `Weights` pytree is a
nested dict of field names, layer indices and `QTensor` parts (`layers/3/qkv/q`), so the files
do not depend on Python class names.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from graph.api import EngineConfig
from graph.layout import abstract_device_weights, device_weights, layer_loop, weight_options
from models.checkpoint import WEIGHTS, ComputeCheckpoint, convert_command, is_checkpoint_dir, write_metadata
from models.errors import ModelLoadError
from models.loader import LoadedModel
from models.params import Weights, prepare

log = logging.getLogger("graph.checkpoint")


class CheckpointMismatchError(ValueError):
    """A converted model's weights were prepared with other options than this engine needs."""


def load_weights(model: LoadedModel, config: EngineConfig) -> Weights:
    """The model's compute-form weights on the mesh, each array in its sharding: restored from
    its checkpoint, or prepared on the host from its loaded parameters (`device_weights`)."""
    if model.checkpoint is None:
        return device_weights(model.params, model.cfg, config)
    check_weights(model, config)
    started = time.monotonic()
    weights = restore(model.checkpoint, abstract_device_weights(model.cfg, model.dtype, config))
    log.info("restored %s's weights from %s in %.2fs", model.name, model.checkpoint.path, time.monotonic() - started)
    return weights


def check_weights(model: LoadedModel, config: EngineConfig) -> None:
    """CheckpointMismatchError, naming each difference and what to do, if the model's checkpoint
    was made with other `prepare` options (or dtype) than this engine's; nothing for other models."""
    ckpt = model.checkpoint
    if ckpt is None:
        return
    want = weight_options(config)
    loop = layer_loop(config)
    diffs = []
    if ckpt.unrolled != want["unrolled"]:
        have, need = _layers(ckpt.unrolled), _layers(want["unrolled"])
        diffs.append(f"layer loop {ckpt.layer_loop} ({have}), this engine runs {loop} ({need})")
    if ckpt.quantize != want["quantize"]:
        diffs.append(f"quantize {ckpt.quantize or 'none'}, this engine {config.quantize}")
    elif ckpt.quantize and ckpt.act_quant != want["act_quant"]:
        diffs.append(
            f"int8 weights for {_lowering(ckpt.act_quant)} (converted on {ckpt.backend}), while "
            f"{jax.default_backend()} uses {_lowering(want['act_quant'])}"
        )
    if config.dtype != model.dtype:
        diffs.append(f"dtype {model.dtype}, this engine {config.dtype}")
    if not diffs:
        return
    again = convert_command(ckpt, config.dtype, "NEW_DIR", quantize=config.quantize, layer_loop=loop)
    advice = f"convert it again on this backend: {again}"
    if not ckpt.quantize or ckpt.act_quant == want["act_quant"]:  # the int8 lowering is the backend's
        serve = f"--quantize {ckpt.quantize or 'none'} --layer-loop {ckpt.layer_loop} --dtype {model.dtype}"
        advice = f"serve it with {serve}, or {advice}"
    raise CheckpointMismatchError(
        f"{model.path}: the checkpoint's weights were prepared with {'; '.join(diffs)}: {advice}"
    )


def _layers(unrolled: bool) -> str:
    return "per-layer buffers" if unrolled else "stacked layers"


def _lowering(act_quant: bool) -> str:
    return "int8 x int8 dots (CPU)" if act_quant else "weight-only int8 (GPU/TPU)"


def restore(checkpoint: ComputeCheckpoint, target: Weights) -> Weights:
    """The checkpoint's arrays restored into `target`'s shardings (a tree of ShapeDtypeStructs
    with `.sharding`): each device reads its own shard. ModelLoadError if the checkpoint does not
    hold exactly the target's arrays (names, shapes, dtypes) or cannot be read."""
    import orbax.checkpoint as ocp

    flat, treedef = jax.tree_util.tree_flatten_with_path(target)
    names = [_name(path) for path, _ in flat]
    path = checkpoint.path.absolute()
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            _check_arrays(path, checkpointer.metadata(path), dict(zip(names, (a for _, a in flat), strict=True)))
            restored = checkpointer.restore(path, _nest(names, [a for _, a in flat]))
    except ModelLoadError:
        raise
    except Exception as e:  # orbax, tensorstore and file errors: a damaged checkpoint
        first = (str(e).strip().splitlines() or [""])[0].split(" See full")[0][:300]
        raise ModelLoadError(f"{path}: cannot restore the checkpoint ({type(e).__name__}: {first})") from e
    return jax.tree_util.tree_unflatten(treedef, [_get(restored, n) for n in names])


def _check_arrays(path: Path, metadata: Any, target: dict[str, Any]) -> None:
    tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", None)
    if not isinstance(tree, dict):
        raise ModelLoadError(f"{path}: missing or damaged array metadata: convert the model again")
    stored = {_name(p): m for p, m in jax.tree_util.tree_flatten_with_path(tree)[0]}
    missing, extra = sorted(set(target) - set(stored)), sorted(set(stored) - set(target))
    problems = [f"missing {', '.join(missing[:5])}"] if missing else []
    problems += [f"unexpected {', '.join(extra[:5])}"] if extra else []
    for name in sorted(set(target) & set(stored)):
        want, have = target[name], stored[name]
        if tuple(have.shape) != tuple(want.shape) or np.dtype(have.dtype) != np.dtype(want.dtype):
            problems.append(f"{name} is {_describe(have)}, expected {_describe(want)}")
    if problems:
        raise ModelLoadError(
            f"{path}: the checkpoint's arrays do not match its config and options ({'; '.join(problems[:5])})"
        )


def _describe(array: Any) -> str:
    return f"{np.dtype(array.dtype)}{list(array.shape)}"


def _name(path: tuple) -> str:
    """`layers/3/qkv/q` for a path of attribute, sequence or dict keys."""
    parts = []
    for k in path:
        key = getattr(k, "name", getattr(k, "idx", getattr(k, "key", None)))
        parts.append(str(key))
    return "/".join(parts)


def _nest(names: list[str], leaves: list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, leaf in zip(names, leaves, strict=True):
        *parents, last = name.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return out


def _get(tree: dict[str, Any], name: str) -> Any:
    for p in name.split("/"):
        tree = tree[p]
    return tree


def convert(model: LoadedModel, out: str | Path, config: EngineConfig, *, overwrite: bool = False) -> Path:
    """Write `model` as a compute-form checkpoint directory for engines with `config`'s weight
    options (layer loop, quantize, this backend's int8 lowering) and the model's dtype; -> `out`.

    The metadata file is written last: a conversion that stops half-way leaves a directory the
    loader does not take for a checkpoint."""
    import orbax.checkpoint as ocp

    out = Path(out)
    if model.checkpoint is not None:
        raise ValueError(f"{model.path}: converted already; convert its source ({model.checkpoint.source})")
    if out.exists() and any(out.iterdir()):
        if not (overwrite and is_checkpoint_dir(out)):
            hint = " (pass --overwrite to replace it)" if is_checkpoint_dir(out) else ""
            raise FileExistsError(f"{out}: exists and is not empty{hint}")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    options = weight_options(config)
    started = time.monotonic()
    host = prepare(jax.tree.map(np.asarray, model.params), model.cfg, xp=np, **options)
    flat = jax.tree_util.tree_flatten_with_path(host)[0]
    tree = _nest([_name(p) for p, _ in flat], [a for _, a in flat])
    # Uncompressed: float and int8 weights shrink little (float32 SmolLM2: 514 -> 337 MB with
    # zstd), and a restore without decompression took half the time.
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)) as checkpointer:
        checkpointer.save((out / WEIGHTS).absolute(), args=ocp.args.PyTreeSave(tree))
    model.tokenizer.save(out)
    write_metadata(
        out,
        cfg=model.cfg,
        dtype=model.dtype,
        options=options,
        layer_loop=layer_loop(config),
        backend=jax.default_backend(),
        name=model.name,
        fingerprint=model.fingerprint,
        source=str(model.path),
    )
    log.info("wrote %s to %s in %.1fs", model.name, out, time.monotonic() - started)
    return out
