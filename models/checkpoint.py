"""Compute-form checkpoint directories: what `scripts/convert.py` writes beside the weights, and
reading it back. No arrays here (the orbax part is `graph/checkpoint.py`, which places them on
the mesh); this module knows the directory's metadata, so `models/loader.py` can tell a converted
model apart, rebuild its config and tokenizer, and name what its weights need.

    DIR/xlaserve.json     metadata: format, the model config, the options the weights were
                          prepared with, the original model's name, path and fingerprint
    DIR/weights/          the orbax checkpoint of `models.params.Weights`, in compute form
    DIR/tokenizer.json    the tokenizer, saved by transformers (+ tokenizer_config.json and
                          chat_template.jinja): `load_tokenizer(DIR)` reads it back
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

from models.config import ModelConfig
from models.errors import ModelLoadError

METADATA = "xlaserve.json"
WEIGHTS = "weights"
FORMAT = "xlaserve-compute-checkpoint"
VERSION = 2  # 2: int8 matrices stored output-major (models/quant.py)
# Orbax writes this file last, when a checkpoint is complete; a directory without it is partial.
ORBAX_DONE = "_CHECKPOINT_METADATA"


@dataclasses.dataclass(frozen=True)
class ComputeCheckpoint:
    """Where a converted model's weights are and the options `models.params.prepare` made them
    with: an engine can use them only if it would prepare them the same way."""

    path: Path  # the orbax checkpoint (DIR/weights)
    unrolled: bool  # one `LayerWeights` per layer (layered/unroll loops), else stacked (scan)
    quantize: str | None  # None | "int8"
    act_quant: bool  # int8 for int8 x int8 dots (CPU; Hadamard-rotated), else weight-only int8
    layer_loop: str  # the loop it was converted for (as resolved then), for messages
    backend: str  # the backend it was converted on, for messages
    source: str  # what it was converted from, for messages

    def options(self) -> dict[str, Any]:
        """The keyword options of `prepare` (as `graph.layout.weight_options` gives them)."""
        return {"unrolled": self.unrolled, "quantize": self.quantize, "act_quant": self.act_quant}


def is_checkpoint_dir(path: Path) -> bool:
    return path.is_dir() and (path / METADATA).is_file()


def config_to_json(cfg: ModelConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_json(data: dict[str, Any]) -> ModelConfig:
    """The inverse of `config_to_json`: nested dataclasses and tuples rebuilt from their field
    types, so the config compares (and hashes) equal to the one that was written."""
    return _decode(ModelConfig, data)


def _decode(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in args if a is not type(None)]
        return _decode(inner, value)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise TypeError(f"{hint.__name__}: expected an object, got {value!r}")
        hints = typing.get_type_hints(hint)
        names = {f.name for f in dataclasses.fields(hint)}
        unknown = set(value) - names
        if unknown:
            raise TypeError(f"{hint.__name__}: unknown fields {sorted(unknown)}")
        return hint(**{k: _decode(hints[k], v) for k, v in value.items()})
    if origin is tuple:
        return tuple(_decode(args[0], v) for v in value)
    return value


def write_metadata(
    directory: Path,
    *,
    cfg: ModelConfig,
    dtype: str,
    options: dict[str, Any],
    layer_loop: str,
    backend: str,
    name: str,
    fingerprint: str,
    source: str,
) -> None:
    """Written last by a conversion: a directory with this file is a complete checkpoint."""
    data = {
        "format": FORMAT,
        "version": VERSION,
        "name": name,
        "fingerprint": fingerprint,
        "source": source,
        "dtype": dtype,
        "options": {**options, "layer_loop": layer_loop, "backend": backend},
        "config": config_to_json(cfg),
    }
    (directory / METADATA).write_text(json.dumps(data, indent=2) + "\n")


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    name: str  # the original model's name: a converted model is served as the model it was
    fingerprint: str  # the original model's (same config, weights and dtype: see README)
    dtype: str
    cfg: ModelConfig
    checkpoint: ComputeCheckpoint


def read_metadata(directory: Path) -> CheckpointInfo:
    """The metadata of a converted model; ModelLoadError naming the file and the problem."""
    path = directory / METADATA
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: unreadable checkpoint metadata ({e})") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ModelLoadError(f'{path}: not an xlaserve checkpoint (no "format": "{FORMAT}")')
    if data.get("version") != VERSION:
        raise ModelLoadError(
            f"{path}: checkpoint format version {data.get('version')!r}; this xlaserve reads version {VERSION}: "
            "convert the model again with scripts/convert.py"
        )
    try:
        cfg = config_from_json(data["config"])
        opts = data["options"]
        checkpoint = ComputeCheckpoint(
            path=directory / WEIGHTS,
            unrolled=bool(opts["unrolled"]),
            quantize=opts["quantize"],
            act_quant=bool(opts["act_quant"]),
            layer_loop=str(opts["layer_loop"]),
            backend=str(opts["backend"]),
            source=str(data["source"]),
        )
        info = CheckpointInfo(str(data["name"]), str(data["fingerprint"]), str(data["dtype"]), cfg, checkpoint)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}: invalid checkpoint metadata ({e!r})") from e
    if not (checkpoint.path / ORBAX_DONE).is_file():
        raise ModelLoadError(
            f"{checkpoint.path}: missing or incomplete orbax checkpoint (no {ORBAX_DONE}); "
            f"convert the model again: {convert_command(checkpoint, info.dtype, directory)}"
        )
    return info


def convert_command(checkpoint: ComputeCheckpoint, dtype: str, out: Path | str, **changes: str) -> str:
    """The command that converts the same source again, with the same options unless `changes`
    (`quantize=`, `layer_loop=`, `dtype=`) say otherwise."""
    flags = {
        "dtype": dtype,
        "quantize": checkpoint.quantize or "none",
        "layer_loop": checkpoint.layer_loop,
        **changes,
    }
    options = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in flags.items())
    return f"python scripts/convert.py --model {checkpoint.source} --out {out} {options} --overwrite"
