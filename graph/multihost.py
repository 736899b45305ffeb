"""Several processes, one mesh: `jax.distributed` joins them, process 0 runs the HTTP server and
the scheduler, and every other process runs `follow`, calling the same executables in lock-step.

JAX's SPMD runtime is multi-controller: each process launches every executable on its own devices,
and the executables' collectives (gloo on CPU, NCCL on GPU, ICI on TPU) meet across processes. So
the followers must launch exactly what process 0 launches, in the same order, with the same
inputs. Process 0 publishes each of its device calls (the KV pool's creation, each step's bucket
and inputs, the stop) in the coordination service's key-value store that `jax.distributed` runs
anyway (`StepChannel`): a few hundred kilobytes a step, read by each follower with a blocking get.
Nothing there is compiled or traced, so "no compilation while serving" holds on every process
(`multihost_utils.broadcast_one_to_all` would compile a program per input shape).

Failures: a follower that dies makes the next step's collective fail on process 0; the engine
then ends every request with an error and breaks, and the server exits non-zero (serving/main.py).
A process that dies while nothing runs is found by the coordination service's heartbeats
(`HEARTBEAT_SECONDS`), which ends the others. Process 0 stopping (SIGTERM) publishes "stop": the
followers return and every process leaves `jax.distributed` with exit status 0.
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import jax
import numpy as np

log = logging.getLogger("graph.multihost")

HEARTBEAT_SECONDS = 10  # a process silent this long is dead: the others stop
PREFIX = "xlaserve/"
KEEP = 16  # published messages kept in the store; followers are never more than a step behind


def initialize(coordinator: str, num_processes: int, process_id: int) -> None:
    """Join the processes (before anything starts jax's backend). On CPU the collectives between
    processes go through gloo."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator, num_processes=num_processes, process_id=process_id, heartbeat_timeout_seconds=HEARTBEAT_SECONDS
    )
    log.info(
        "process %d of %d: %d local devices, %d in all", process_id, num_processes,
        jax.local_device_count(), jax.device_count(),
    )  # fmt: skip


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def fetch(tree: Any) -> Any:
    """Results to the host. A replicated array spanning other processes' devices is read from
    this process's own copy."""

    def one(a: Any) -> Any:
        if not isinstance(a, jax.Array) or a.is_fully_addressable:
            return jax.device_get(a)
        if not a.sharding.is_fully_replicated:
            raise ValueError("only replicated results can be read on one process")
        return np.asarray(a.addressable_data(0))

    return jax.tree.map(one, tree)


class StepChannel:
    """Process 0 -> followers: each device call, in order, through the key-value store."""

    def __init__(self) -> None:
        from jax._src.distributed import global_state

        if global_state.client is None:
            raise RuntimeError("jax.distributed is not initialized")
        self._client = global_state.client
        self._sent = 0
        self._received = 0

    # ---- process 0 ----

    def publish(self, kind: str, key: Any = None, inputs: Any = None, **extra: Any) -> None:
        header = json.dumps({"kind": kind, "key": key, **extra}).encode()
        body = io.BytesIO()
        leaves = jax.tree.leaves(inputs)
        np.savez(body, *[np.asarray(x) for x in leaves])
        data = len(header).to_bytes(8, "little") + header + body.getvalue()
        self._client.key_value_set_bytes(f"{PREFIX}{self._sent}", data)
        if self._sent >= KEEP:
            self._client.key_value_delete(f"{PREFIX}{self._sent - KEEP}")
        self._sent += 1

    # ---- followers ----

    def receive(self, timeout_s: float = 24 * 3600) -> tuple[dict[str, Any], list[np.ndarray]]:
        """The next message: (header, the leaves of its inputs in order)."""
        data = self._client.blocking_key_value_get_bytes(f"{PREFIX}{self._received}", int(timeout_s * 1000))
        self._received += 1
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        with np.load(io.BytesIO(data[8 + n :]), allow_pickle=False) as npz:
            leaves = [npz[f"arr_{i}"] for i in range(len(npz.files))]
        return header, leaves


def follow(model: Any, config: Any) -> int:
    """A follower's life: build the same table and weights as process 0, then run every device
    call process 0 publishes until it says stop. -> exit status."""
    from graph import compile_cache
    from graph.buckets import Buckets
    from graph.checkpoint import check_weights, load_weights
    from graph.executables import ExecutableTable
    from graph.layout import check_mesh
    from graph.programs import sharded_inputs

    # As process 0's Engine.create: the table below loads what process 0 has just compiled (its
    # setup message comes after its table), instead of compiling all of it a second time.
    compile_cache.configure(config.compile_cache)
    check_mesh(model.cfg, config)
    check_weights(model, config)
    channel = StepChannel()
    header, _ = channel.receive()  # process 0's table: its pool size decides this one's
    if header["kind"] != "setup":
        raise RuntimeError(f"expected the setup message, got {header['kind']!r}")
    buckets = Buckets.from_config(config)
    if config.aot_dir:
        table = ExecutableTable.load(config.aot_dir, model.cfg, model.dtype, config, buckets, model.fingerprint)
    else:
        table = ExecutableTable.compile(model.cfg, model.dtype, config, buckets, header["num_pages"])
    params = load_weights(model, config)
    kv = None
    steps = 0
    log.info("following process 0")
    while True:
        header, leaves = channel.receive()
        kind = header["kind"]
        if kind == "stop":
            log.info("process 0 stopped after %d steps", steps)
            return 0
        if kind == "init_kv":
            kv = None
            kv = table.init_kv()
        elif kind == "step":
            key = tuple(header["key"])
            tree = jax.tree.structure(sharded_inputs(model.cfg, config, key, config.max_seq_len))
            kv, _ = table.get(key)(params, kv, jax.tree.unflatten(tree, leaves))
            steps += 1
        else:
            raise RuntimeError(f"unknown message {kind!r} from process 0")
