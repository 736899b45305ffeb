"""Reading `.safetensors` files (single or sharded with `model.safetensors.index.json`).

Parsed by hand (8-byte header length, JSON header, raw little-endian data) over a memory map, so
bfloat16 works without torch and a corrupt or truncated file is caught with a message naming it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from models.errors import ModelLoadError

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsFile:
    """One file: its tensor index, validated against the file size at open."""

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError("file is shorter than the 8-byte header length")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > 100_000_000:
                    raise ValueError(f"header length {n} exceeds the file size {size}")
                header = json.loads(f.read(n))
        except FileNotFoundError as e:
            raise ModelLoadError(f"{path}: file not found") from e
        except (ValueError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{path}: not a valid safetensors file ({e})") from e
        header.pop("__metadata__", None)
        self._data_start = 8 + n
        self.tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            begin, end = info["data_offsets"]
            dtype, shape = info["dtype"], tuple(info["shape"])
            if dtype not in _DTYPES:
                raise ModelLoadError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
            if self._data_start + end > size:
                raise ModelLoadError(
                    f"{path}: truncated file: tensor {name!r} ends at byte {self._data_start + end} "
                    f"but the file has {size} bytes"
                )
            expected = int(np.prod(shape)) * np.dtype(_DTYPES[dtype]).itemsize
            if end - begin != expected:
                raise ModelLoadError(f"{path}: tensor {name!r} has {end - begin} bytes, its shape needs {expected}")
            self.tensors[name] = (dtype, shape, begin, end)
        self._map = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)

    def get(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self.tensors[name]
        raw = self._map[self._data_start + begin : self._data_start + end]
        return raw.view(_DTYPES[dtype]).reshape(shape)


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
    """Yield (name, array view, file) for every tensor of every file."""
    for path in files:
        f = SafetensorsFile(path)
        for name in f.tensors:
            yield name, f.get(name), path
