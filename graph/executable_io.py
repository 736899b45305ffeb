"""Compiled executables as data: the backend's serialized executable (the payload) and a JSON
description of how jax calls it. Reading them back runs no code from the file.

`jax.experimental.serialize_executable` would pickle jax's whole `UnloadedMeshExecutable` (the
payload inside is itself a pickle, of jax objects around the backend's bytes), and unpickling
builds whatever objects a file names. Here the file holds only what the backend's own
`serialize_executable` writes (XLA's executable bytes, which `deserialize_executable` parses as
data), and jax's wrapper around it is rebuilt by the steps jax takes after compiling
(jax/_src/interpreters/pxla.py `UnloadedMeshExecutable.from_hlo`, jax 0.10.2, pinned with jaxlib):
shardings and layouts read from the executable, avals, the arguments jit dropped as unused, and
donation from the description.

The argument and result tree structures are recorded when compiling, from the compiled
executable's own `in_tree`/`out_tree`, and decoded against builtin containers and the pytree
classes of graph/ and models/ only. Rebuilding them from the abstract signature at load instead
means tracing every function again: 12-15 s for the default table on a 2-core machine, where
reading all of it takes ~3 s. `describe` checks, when compiling, that the description rebuilds
the same executable (trees, avals, shardings, layouts), so what it cannot express fails there.

A payload is checked against the size and sha256 in its description before XLA parses it: a
truncated or altered file is an error naming it, not a crash in the parser. That guards against
damage, not against someone who can write the description too; a payload is machine code that
runs when called, so artifacts come from trusted places (graph/compile_cache.py says the same of
its directory).
"""

from __future__ import annotations

import hashlib
import importlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import stages
from jax._src.core import ShapedArray
from jax._src.interpreters import pxla
from jax._src.lib import xla_client as xc
from jax._src.linear_util import DebugInfo
from jax._src.named_sharding import UNSPECIFIED
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.tree_util import PyTreeDef, default_registry

_BUILTIN_NODES = {"tuple": tuple, "list": list, "dict": dict, "NoneType": type(None)}
_NODE_PACKAGES = ("graph", "models")  # pytree classes may come from these packages only
# what `describe` checks the rebuilt executable against
_CHECKED = (
    "input_avals", "input_shardings", "output_avals", "output_shardings", "committed", "kept_var_idx",
    "xla_in_layouts", "dispatch_in_layouts", "xla_out_layouts",
)  # fmt: skip


class BadExecutableError(ValueError):
    """A serialized executable or its description that cannot be read back."""


def describe(compiled: jax.stages.Compiled) -> tuple[dict[str, Any], bytes]:
    """-> (JSON-able description, payload) of a fresh compilation (not one jax loaded from its
    cache: graph/compile_cache.py)."""
    unloaded = getattr(compiled._executable, "_unloaded_executable", None)
    if unloaded is None or not isinstance(unloaded, pxla.UnloadedMeshExecutable):
        raise BadExecutableError("this executable cannot be serialized")
    if (
        compiled._params.const_args
        or unloaded.mut or unloaded.ordered_effects or unloaded.unordered_effects
        or unloaded.host_callbacks or unloaded.keepalive
    ):  # fmt: skip
        raise BadExecutableError(f"{unloaded.name}: constants, effects or callbacks cannot be serialized")
    args_info, in_tree = jax.tree_util.tree_flatten(compiled.args_info)
    if unloaded.all_args_info is None:
        raise BadExecutableError(f"{unloaded.name}: no record of its arguments")
    debug = unloaded.all_args_info.debug_info
    payload = unloaded.backend.serialize_executable(unloaded.xla_executable)
    description = {
        "bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "name": unloaded.name,
        "devices": [d.id for d in unloaded.device_list],
        "in_tree": _tree_json(in_tree),
        "out_tree": _tree_json(compiled.out_tree),
        "in_avals": [_aval_json(a) for a in unloaded.all_args_info.in_avals],  # the unused ones too
        "arg_names": None if debug.arg_names is None else list(debug.arg_names),
        "kept": sorted(unloaded.kept_var_idx),
        "donated": [i for i, a in enumerate(args_info) if a.donated],
        "out_avals": [_aval_json(a) for a in unloaded.output_avals],
        "committed": unloaded.committed,
        "no_kwargs": compiled._no_kwargs,
        **_mesh_json(unloaded.input_shardings, unloaded.output_shardings),
    }
    description = json.loads(json.dumps(description))  # check what loading will see
    rebuilt, rebuilt_args, rebuilt_out = _rebuild(
        unloaded.xla_executable, description, unloaded.backend, unloaded.device_list
    )
    differ = [f for f in _CHECKED if getattr(rebuilt, f) != getattr(unloaded, f)]
    if rebuilt_args != compiled.args_info:
        differ.append("args_info")
    if rebuilt_out != compiled.out_tree:
        differ.append("out_tree")
    if differ:
        raise BadExecutableError(f"{unloaded.name}: its description does not rebuild it ({', '.join(differ)} differ)")
    return description, payload


def load(description: dict[str, Any], payload: bytes) -> jax.stages.Compiled:
    """The executable `describe` described, on this process's backend. Raises BadExecutableError
    for a payload that is not the one described or a description that cannot be decoded."""
    if len(payload) != description.get("bytes"):
        raise BadExecutableError(f"truncated or extended: {len(payload)} bytes, expected {description.get('bytes')}")
    if hashlib.sha256(payload).hexdigest() != description.get("sha256"):
        raise BadExecutableError("checksum mismatch: the file is damaged or was altered")
    backend = jax.devices()[0].client
    by_id = {d.id: d for d in backend.devices()}
    try:
        devices = xc.DeviceList(tuple(by_id[i] for i in description["devices"]))
    except (KeyError, TypeError) as e:
        raise BadExecutableError(
            f"made for devices {description.get('devices')}, this process has {list(by_id)}"
        ) from e
    executable = backend.deserialize_executable(payload, executable_devices=devices)
    unloaded, args_info, out_tree = _rebuild(executable, description, backend, devices)
    return jax.stages.Compiled(unloaded.load(), [], args_info, out_tree, no_kwargs=description.get("no_kwargs") is True)


def pack(description: dict[str, Any], payload: bytes) -> bytes:
    """One file holding both: the description's length (8 bytes), the description, the payload."""
    header = json.dumps(description).encode()
    return len(header).to_bytes(8, "little") + header + payload


def unpack(data: bytes) -> tuple[dict[str, Any], bytes]:
    n = int.from_bytes(data[:8], "little")
    if len(data) < 8 + n:
        raise BadExecutableError("truncated")
    try:
        description = json.loads(data[8 : 8 + n])
    except ValueError as e:
        raise BadExecutableError(f"unreadable description: {e}") from None
    if not isinstance(description, dict):
        raise BadExecutableError("unreadable description")
    return description, data[8 + n :]


def _rebuild(
    executable: Any, d: dict[str, Any], backend: Any, devices: Any
) -> tuple[pxla.UnloadedMeshExecutable, Any, PyTreeDef]:
    """jax's wrapper of a backend executable, as `UnloadedMeshExecutable.from_hlo` builds it after
    compiling (no shardings or layouts given: both are read from the executable); -> (it, the
    arguments' info tree, the result tree)."""
    try:
        in_tree, out_tree = _tree(d["in_tree"]), _tree(d["out_tree"])
        avals = [_aval(a) for a in d["in_avals"]]
        kept = {int(i) for i in d["kept"]}
        out_avals = [_aval(a) for a in d["out_avals"]]
        arg_names = None if d["arg_names"] is None else tuple(str(n) for n in d["arg_names"])
        donated = [int(i) for i in d["donated"]]
        name, committed = str(d["name"]), bool(d["committed"])
    except BadExecutableError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # RuntimeError: not a pytree node; too deep
        raise BadExecutableError(f"unreadable description: {e!r}") from None
    if in_tree.num_leaves != len(avals) or out_tree.num_leaves != len(out_avals) or not kept <= set(range(len(avals))):
        raise BadExecutableError("the description's trees and avals disagree")
    mesh = _mesh(d, backend)
    if mesh is not None:  # avals on a mesh carry its abstract form
        avals = [a.update(sharding=NamedSharding(mesh.abstract_mesh, P(*(None,) * a.ndim))) for a in avals]
        out_avals = [a.update(sharding=NamedSharding(mesh.abstract_mesh, P(*(None,) * a.ndim))) for a in out_avals]
    in_avals = [a for i, a in enumerate(avals) if i in kept]
    in_shardings = pxla._maybe_get_and_check_in_shardings(
        executable, _shardings(mesh, d.get("in_specs"), len(in_avals)), devices, in_avals, 0
    )
    out_shardings = pxla._maybe_get_and_check_out_shardings(
        executable, _shardings(mesh, d.get("out_specs"), len(out_avals)), devices, out_avals, 0
    )
    in_layouts, out_layouts = pxla._get_layouts_from_executable(
        executable, [None] * len(in_avals), [None] * len(out_avals), 0, in_avals, out_avals
    )
    dispatch_in_layouts = pxla.get_dispatch_layouts(in_layouts, in_shardings, in_avals)
    out_shardings = pxla.maybe_recover_user_shardings(in_shardings, out_shardings, in_avals, out_avals)
    unloaded = pxla.UnloadedMeshExecutable(
        xla_executable=executable,
        device_list=devices,
        backend=backend,
        input_avals=in_avals,
        input_shardings=pxla.finalize_shardings(in_shardings, devices),
        output_avals=out_avals,
        output_shardings=pxla.finalize_shardings(out_shardings, devices),
        committed=committed,
        name=name,
        unordered_effects=[],
        ordered_effects=[],
        keepalive=[],
        host_callbacks=[],
        kept_var_idx=kept,
        mut=None,
        xla_in_layouts=in_layouts,
        dispatch_in_layouts=dispatch_in_layouts,
        xla_out_layouts=out_layouts,
        all_args_info=pxla.AllArgsInfo(avals, DebugInfo("jit", name, arg_names, None)),
        pgle_profiler=None,
    )
    return unloaded, stages.make_args_info(in_tree, avals, donated), out_tree


def _mesh_json(in_shardings: Any, out_shardings: Any) -> dict[str, Any]:
    """The mesh of an executable compiled with NamedShardings (graph/sharding.py), and the
    PartitionSpec of each argument and result: what `_rebuild` needs to give it the same
    shardings (the executable itself only knows their device-level form)."""
    named = [s for s in (*in_shardings, *out_shardings) if isinstance(s, NamedSharding)]
    if not named:
        return {}
    mesh = named[0].mesh
    if any(s.mesh != mesh for s in named) or len(named) != len(in_shardings) + len(out_shardings):
        raise BadExecutableError("an executable on more than one mesh, or partly on none, cannot be described")
    return {
        "mesh": {
            "axes": [[str(n), int(k)] for n, k in mesh.shape.items()],
            "devices": [int(x.id) for x in mesh.devices.reshape(-1)],
        },
        "in_specs": [_spec_json(s.spec) for s in in_shardings],
        "out_specs": [_spec_json(s.spec) for s in out_shardings],
    }


def _spec_json(spec: P) -> list[Any]:
    return [list(e) if isinstance(e, tuple) else e for e in spec]


def _mesh(d: dict[str, Any], backend: Any) -> Mesh | None:
    if d.get("mesh") is None:
        return None
    by_id = {x.id: x for x in backend.devices()}
    try:
        names, sizes = zip(*((str(n), int(k)) for n, k in d["mesh"]["axes"]), strict=True)
        devices = np.asarray([by_id[int(i)] for i in d["mesh"]["devices"]], dtype=object).reshape(sizes)
        return Mesh(devices, names)
    except (KeyError, TypeError, ValueError) as e:
        raise BadExecutableError(f"unreadable mesh: {e!r}") from None


def _shardings(mesh: Mesh | None, specs: Any, n: int) -> list[Any]:
    if mesh is None:
        return [UNSPECIFIED] * n
    if n == 0:
        return ()  # as jax keeps it
    if not isinstance(specs, list) or len(specs) != n:
        raise BadExecutableError("the description's specs and avals disagree")
    try:
        return [NamedSharding(mesh, P(*(tuple(e) if isinstance(e, list) else e for e in spec))) for spec in specs]
    except (TypeError, ValueError) as e:
        raise BadExecutableError(f"unreadable spec: {e!r}") from None


def _aval_json(a: ShapedArray) -> list[Any]:
    return [list(a.shape), jnp.dtype(a.dtype).name, bool(a.weak_type)]


def _aval(x: list[Any]) -> ShapedArray:
    shape, dtype, weak = x
    return ShapedArray(tuple(int(n) for n in shape), jnp.dtype(str(dtype)), weak_type=bool(weak))


def _tree_json(t: PyTreeDef) -> Any:
    """A tree structure as JSON: "*" for a leaf, null for None, else [node type, children] and the
    node's aux data as a third item when it has any."""
    node = t.node_data()
    if node is None:
        return "*"
    kind, aux = node
    if kind is type(None):
        return None
    if kind.__module__ != "builtins" and kind.__module__.split(".")[0] not in _NODE_PACKAGES:
        raise BadExecutableError(f"pytree node {kind} is not from {_NODE_PACKAGES}")
    out = [f"{kind.__module__}:{kind.__qualname__}", [_tree_json(c) for c in t.children()]]
    return out if aux is None else [*out, _aux_json(aux)]


def _tree(x: Any) -> PyTreeDef:
    if x == "*":
        return PyTreeDef.from_node_data_and_children(default_registry, None, [])
    if x is None:
        return PyTreeDef.from_node_data_and_children(default_registry, (type(None), None), [])
    name, children, *aux = x
    node = (_node_type(name), _aux(aux[0]) if aux else None)
    return PyTreeDef.from_node_data_and_children(default_registry, node, [_tree(c) for c in children])


def _node_type(name: str) -> type:
    """A node type by name: a builtin container or a class of graph/ or models/; nothing else."""
    module, _, qualname = str(name).partition(":")
    if module == "builtins" and qualname in _BUILTIN_NODES:
        return _BUILTIN_NODES[qualname]
    if module.split(".")[0] not in _NODE_PACKAGES or not qualname.isidentifier():
        raise BadExecutableError(f"pytree node {name!r} is not a builtin container or from {_NODE_PACKAGES}")
    try:
        kind = getattr(importlib.import_module(module), qualname, None)
    except ImportError:
        kind = None
    if not isinstance(kind, type):
        raise BadExecutableError(f"pytree node {name!r} is not a class")
    return kind


def _aux_json(aux: Any) -> Any:
    """Node aux data (dict keys, namedtuple and dataclass metadata): JSON scalars, lists and tuples."""
    if aux is None or isinstance(aux, str | int | float | bool):
        return aux
    if isinstance(aux, tuple):
        return {"tuple": [_aux_json(a) for a in aux]}
    if isinstance(aux, list):
        return [_aux_json(a) for a in aux]
    raise BadExecutableError(f"pytree aux data {aux!r} cannot be described")


def _aux(x: Any) -> Any:
    if isinstance(x, dict):
        return tuple(_aux(a) for a in x["tuple"])
    if isinstance(x, list):
        return [_aux(a) for a in x]
    return x
