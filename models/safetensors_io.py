"""Reading `.safetensors` files (single or sharded with `model.safetensors.index.json`) with the
`safetensors` library's numpy API, so torch is never imported.

bfloat16, which numpy lacks, comes back as `ml_dtypes.bfloat16` arrays (safetensors 0.8.0 maps
BF16 to it), as the hand-written parser this replaces returned, so loading in float32 and in
bfloat16 sees the same values. The library checks the header and that the tensors cover the file
exactly; its errors are turned into a `ModelLoadError` naming the file. Each tensor is read into
memory of its own (the hand-written parser returned views of a memory map); the loader copies it
into the parameter tree at once, so one tensor at a time is held twice.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from models.errors import ModelLoadError


def _open(path: Path):
    try:
        return safe_open(path, framework="numpy")
    except FileNotFoundError as e:
        raise ModelLoadError(f"{path}: file not found") from e
    except SafetensorError as e:
        if "incomplete metadata" in str(e):  # the header's tensors end before (or after) the file does
            raise ModelLoadError(f"{path}: truncated file, or bytes past its last tensor ({e})") from e
        raise ModelLoadError(f"{path}: not a valid safetensors file ({e})") from e


def safetensors_files(directory: Path) -> list[Path]:
    """The weight files of a Hugging Face directory (the index's shards, or every *.safetensors)."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ModelLoadError(f"{index}: invalid index file ({e!r})") from e
        files = sorted({directory / f for f in weight_map.values()})
        for f in files:
            if not f.exists():
                raise ModelLoadError(f"{f}: shard listed in {index.name} is missing")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{directory}: no *.safetensors weight files found")
    return files


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, np.ndarray, Path]]:
    """Yield (name, array, file) for every tensor of every file."""
    for path in files:
        with _open(path) as f:
            for name in f.keys():
                try:
                    array = f.get_tensor(name)
                except (SafetensorError, TypeError, ValueError) as e:  # e.g. a dtype numpy cannot hold
                    raise ModelLoadError(f"{path}: tensor {name!r}: {e}") from e
                yield name, array, path
