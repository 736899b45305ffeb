"""The device mesh and the one table from logical axes to mesh axes.

A server runs on a mesh of `--data-parallel D` x `--tensor-parallel T` devices, axes ("data",
"model"); the default 1 x 1 is the first device. Every executable is compiled with explicit
shardings for its arguments and results (XLA SPMD partitions it and inserts the collectives), so
the same table of executables serves any mesh, and a step never moves an array between layouts
behind the scheduler's back.

Where each array sits comes from the logical axes it declares (`models/params.py`: `ParamSpec.axes`
for the checkpoint form, `compute_axes` for the compute form) through `RULES`:
- tensor parallel: attention heads, KV heads, the MLP hidden dimension and the vocabulary (embedding
  and output head) are split over "model"; norms and everything else are replicated;
- the KV page pool `[layers, kv heads, pages, page size, head dim]` is split by KV head over "model";
- data parallel: the batch dimension of a step's token arrays is split over "data" (a decode batch
  of 16 on D = 2 runs 8 rows per shard); the weights and the KV pool are replicated over "data".
  Each data shard reads its rows' pages from its own copy of the pool, and a step's new K/V (a few
  kilobytes a row) is gathered to every copy. Splitting the pool's pages over "data" instead
  (each shard its own slice) needs the scheduler to keep each sequence on the shard that holds its
  pages; without that, XLA gathers the whole pool across shards at every layer (measured: ~18 s a
  step for SmolLM2 on two processes), so it is not done yet.
A dimension its mesh axis does not divide is replicated instead (e.g. a decode batch of 1 on D = 2).
KV heads are the exception: they are never replicated to fill the axis (vLLM does that; it costs
T / kv_heads times the pool's memory), so T must divide the KV head count, and a T that does not is
refused with the valid values (`check`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA, MODEL = "data", "model"
AXES = (DATA, MODEL)
# logical axis -> mesh axis; a logical axis not named here is replicated
RULES: dict[str, str] = {
    "heads": MODEL,
    "kv_heads": MODEL,
    "mlp": MODEL,
    "vocab": MODEL,
    "batch": DATA,
}
KV_AXES = ("layers", "kv_heads", "pages", "page", "head_dim")  # the pool's dimensions


class MeshError(ValueError):
    """A mesh this model or this machine cannot have."""


def check(num_kv_heads: int, num_heads: int, tensor: int, data: int, devices: int) -> None:
    """Raise MeshError naming what is possible if `tensor` x `data` cannot run here."""
    if tensor < 1 or data < 1:
        raise MeshError("--tensor-parallel and --data-parallel must be at least 1")
    if tensor * data > devices:
        raise MeshError(
            f"--tensor-parallel {tensor} x --data-parallel {data} needs {tensor * data} devices; "
            f"{devices} available ({jax.default_backend()})"
        )
    if num_kv_heads % tensor or num_heads % tensor:
        valid = [t for t in range(1, num_kv_heads + 1) if num_kv_heads % t == 0 and num_heads % t == 0]
        raise MeshError(
            f"--tensor-parallel {tensor} does not divide this model's {num_kv_heads} KV heads "
            f"({num_heads} attention heads); KV heads are split, never replicated, over the tensor axis: "
            f"use one of {', '.join(map(str, valid))}"
        )


@functools.cache
def make_mesh(data: int = 1, tensor: int = 1) -> Mesh:
    """The mesh of the first `data * tensor` devices (all processes' devices, in jax's order)."""
    devices = jax.devices()
    if data * tensor > len(devices):
        raise MeshError(f"a {data} x {tensor} mesh needs {data * tensor} devices; {len(devices)} available")
    return Mesh(np.asarray(devices[: data * tensor]).reshape(data, tensor), AXES)


def spec(mesh: Mesh, axes: tuple[str | None, ...], shape: tuple[int, ...]) -> P:
    """The PartitionSpec of an array with logical `axes`: each through `RULES`, unless its mesh
    axis does not divide the dimension (or is used already by an earlier dimension)."""
    out: list[str | None] = []
    for axis, n in zip(axes, shape, strict=True):
        mesh_axis = RULES.get(axis) if axis is not None else None
        if mesh_axis is None or n % mesh.shape[mesh_axis] or mesh_axis in out:
            mesh_axis = None
        out.append(mesh_axis)
    return P(*out)


def named(mesh: Mesh, axes: tuple[str | None, ...], shape: tuple[int, ...]) -> NamedSharding:
    return NamedSharding(mesh, spec(mesh, axes, shape))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def tree_shardings(mesh: Mesh, abstract: Any, axes: Any) -> Any:
    """NamedShardings of a tree of arrays (or ShapeDtypeStructs) from a matching tree of axes."""
    return jax.tree.map(lambda a, ax: named(mesh, ax, a.shape), abstract, axes, is_leaf=_is_axes)


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def kv(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    return named(mesh, KV_AXES, shape)


def batch_leading(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """An activation or step input whose first dimension is the batch."""
    return named(mesh, ("batch",) + (None,) * (len(shape) - 1), shape)


def attach(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def per_device_bytes(abstract: Any, shardings: Any) -> int:
    """The bytes one device holds of a tree of arrays placed with `shardings`."""
    total = 0
    for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True):
        shard = s.shard_shape(a.shape)
        total += math.prod(shard) * np.dtype(a.dtype).itemsize
    return total


def describe(mesh: Mesh) -> dict[str, Any]:
    """What an AOT artifact records of its mesh: an artifact made for another one is refused."""
    devices = mesh.devices.reshape(-1)
    return {
        "axes": dict(mesh.shape),
        "device_kind": devices[0].device_kind,
        "devices": len(devices),
        "processes": len({d.process_index for d in devices}),
    }
