"""What runs for one step bucket, by layer loop, and the lowering of each of its executables.

- `scan` and `unroll`: one executable, `step(weights, kv, inputs)`, the layers under `lax.scan`
  (stacked weights: the layout TPU fuses) or unrolled over per-layer buffers.
- `layered` (the CPU default): a chain of executables: `front` (embedding and rotary tables,
  per batch and token bucket), `layers` called once per group of `group_size(cfg)` layers with
  those layers' weight buffers and the KV pool donated (per batch, token and context bucket), then
  a head: for a decode batch `head` (final norm, logits, sampling; per batch and token bucket), for
  a prefill chunk `tail` (final norm, the sampled rows, prompt logprobs; per chunk length) and
  `pick` (logits and sampling of those rows, one for every chunk length: sampling is most of a
  head's compile time, 1.8 of SmolLM2's 2.5 s, where the prompt logprobs take 0.6). It
  reads each layer's weights in place as `unroll` does (XLA:CPU copies a scanned layer's slice of
  a stacked weight before using it, ~1.7x at batch 1), yet compiles one group instead of every
  layer: SmolLM2's table compiles in about the time of `scan`'s, where `unroll`'s took 3-4x
  longer. The price is one executable launch per group (a few hundred microseconds on XLA:CPU).

Each executable has a name (`units`); the table keeps them by name, so a `front` or `head` shared
by several buckets is compiled once.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from graph import sharding
from graph.api import EngineConfig
from graph.buckets import Buckets
from graph.layout import abstract_device_weights, kv_storage, layer_loop, mesh_of
from graph.step import (
    Key,
    State,
    StepInputs,
    StepOutputs,
    abstract_inputs,
    carry_size,
    front,
    head,
    init_kv,
    layers,
    pick,
    rows_of,
    rows_only,
    step,
    tail,
)
from models import transformer
from models.config import ModelConfig
from models.layers import KVCache, kv_shape
from models.params import DTYPES, Weights

INIT_KV: Key = ("init_kv", 0, 0, 0)


def segments_of(key: Key) -> list[tuple[str, int, int]]:
    """A bucket's segments, as (phase, batch, tokens): a mixed step is a decode batch of `batch`
    rows followed by a prefill chunk of `tokens`."""
    phase, b, t, _ = key
    if phase == "mixed":
        return [("decode", b, 1), ("prefill", 1, t)]
    return [(phase, b, t)]


def unit_names(key: Key, loop: str) -> list[str]:
    """The executables (by name) that make up the step of `key`."""
    phase, b, t, p = key
    if key == INIT_KV:
        return ["init_kv"]
    if loop != "layered":
        return [f"{phase}_b{b}_t{t}_p{p}"]
    segs = segments_of(key)
    return [
        *(f"front_b{sb}_t{st}" for _, sb, st in segs),
        "layers_" + "+".join(f"b{sb}_t{st}" for _, sb, st in segs) + f"_p{p}",
        *(n for seg in segs for n in head_names(*seg)),
    ]


def head_names(phase: str, b: int, t: int) -> list[str]:
    """A segment's head under the layered loop: one executable for a decode batch; for a prefill
    chunk a `tail` per chunk length and a `pick` (its sampling) that every chunk length shares."""
    if phase == "prefill":
        return [f"tail_b{b}_t{t}", f"pick_r{rows_of(phase, b, t)}"]
    return [f"head_{phase}_b{b}_t{t}"]


def group_size(cfg: ModelConfig) -> int:
    """Layers per `layers` call: the largest divisor of the depth up to 8 (30 -> 6, 18 -> 6, 32 -> 8).
    Smaller groups compile faster but launch more often: for SmolLM2 a group's executable compiles
    in 1.5 s for one layer, 2.2 s for 3, 3.6 s for 6, while one-layer groups made a batch-1 int8
    decode step 21 -> 23-27 ms and groups of 3 were within the noise of 6 (4 December 2026)."""
    return max(g for g in range(1, 9) if cfg.num_layers % g == 0)


def for_head(inputs: StepInputs) -> StepInputs:
    """The head's inputs: without the page table, whose width (the context bucket) it does not use,
    so one head serves every context bucket (nor the bases, which only the layers use)."""
    return inputs._replace(page_table=None, base=None, carry_from=None)


def without_layers(w: Weights) -> Weights:
    return dataclasses.replace(w, layers=[])


def lowerings(
    cfg: ModelConfig, dtype: str, config: EngineConfig, num_pages: int, key: Key, max_seq_len: int
) -> dict[str, Callable[[], Any]]:
    """name -> a function lowering that executable (called only for names not compiled yet)."""
    jdtype = DTYPES[dtype]
    mesh = mesh_of(config)
    rep, batch = sharding.replicated(mesh), functools.partial(sharding.batch_leading, mesh)
    kv_dtype, packed = kv_storage(config, dtype)
    shape = kv_shape(cfg, num_pages, config.page_size, packed)
    new_kv = functools.partial(init_kv, shape, kv_dtype)
    placed = State(KVCache(*(sharding.kv(mesh, shape),) * 2), rep)
    state = State(
        sharding.attach(jax.eval_shape(new_kv), placed.kv),
        jax.ShapeDtypeStruct((carry_size(Buckets.from_config(config).decode_batch[-1]),), jnp.int32, sharding=rep),
    )
    names = unit_names(key, layer_loop(config))
    if key == INIT_KV:
        return {names[0]: lambda: jax.jit(new_kv, out_shardings=placed.kv).lower()}
    weights = abstract_device_weights(cfg, dtype, config)
    segs = segments_of(key)
    inputs = sharded_inputs(cfg, config, key, max_seq_len)
    prefill = tuple(sp == "prefill" for sp, _, _ in segs)

    def precise(fn: Callable[[], Any]) -> Callable[[], Any]:
        # float32 means float32: no TF32 shortcut on GPUs (it breaks parity with the reference by ~1e-3)
        def run():
            with jax.default_matmul_precision("highest" if dtype == "float32" else "default"):
                return fn()

        return run

    if len(names) == 1:
        fn = functools.partial(step, cfg=cfg, prefill=prefill)
        jitted = jax.jit(fn, donate_argnums=(1,), out_shardings=(placed, rep))
        return {names[0]: precise(lambda: jitted.lower(weights, state, inputs))}
    n = len(segs)

    def activations(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=batch(shape))

    hs = tuple(activations((sb, st, cfg.hidden_size), jdtype) for _, sb, st in segs)
    tables = (activations((sb, st, cfg.head_dim), jnp.float32) for _, sb, st in segs)
    ropes = tuple(((r, r), (r, r)) for r in tables)  # per segment: (global, local), each (cos, sin)
    G = group_size(cfg)
    per_layer = (
        jax.ShapeDtypeStruct((G,), jnp.int32, sharding=rep),
        jax.ShapeDtypeStruct((G,), jnp.bool_, sharding=rep),
    )
    top = without_layers(weights)
    out = {}
    for name, inp, h, rope in zip(names[:n], inputs, hs, ropes, strict=True):
        out[name] = precise(
            lambda inp=inp, h=h, rope=rope: jax.jit(
                functools.partial(front, cfg=cfg), out_shardings=(h.sharding, jax.tree.map(lambda r: r.sharding, rope))
            ).lower(top, inp.tokens, inp.positions, state.sampled, inp.carry_from)
        )
    out[names[n]] = precise(
        lambda: jax.jit(
            functools.partial(layers, cfg=cfg),
            donate_argnums=(2,),
            out_shardings=(tuple(h.sharding for h in hs), placed.kv),
        ).lower(
            weights.layers[:G],
            hs,
            state.kv,
            *per_layer,
            per_layer[0],
            tuple(i.page_table for i in inputs),
            tuple(i.positions for i in inputs),
            tuple(i.base for i in inputs),
            ropes,
        )
    )
    head_fn, tail_fn, pick_fn = (functools.partial(f, cfg=cfg) for f in (head, tail, pick))
    for (sp, sb, st), h, inp in zip(segs, hs, inputs, strict=True):
        names = head_names(sp, sb, st)
        if sp != "prefill":
            out[names[0]] = precise(
                lambda h=h, inp=inp: jax.jit(head_fn, out_shardings=rep).lower(top, h, for_head(inp), state.sampled)
            )
            continue
        out[names[0]] = precise(lambda h=h, inp=inp: jax.jit(tail_fn, out_shardings=rep).lower(top, h, for_head(inp)))
        rows = jax.eval_shape(tail_fn, top, h, for_head(inp))
        last, pos, _ = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), rows)
        out[names[1]] = precise(
            lambda last=last, pos=pos, inp=inp: jax.jit(pick_fn, out_shardings=rep).lower(
                top, last, pos, rows_only(inp), state.sampled
            )
        )
    return out


# step inputs whose first dimension is the batch (split over "data"); the rest are per sampled
# row or scalars, replicated
_BATCH_INPUTS = ("tokens", "positions", "base", "page_table", "next_tokens", "carry_from")
# per sampled row and unchanged while the rows are (graph/batching.py RowReuse): kept on the device
RESIDENT = ("sampling", "mask", "history", "prompt_len")


def sharded_inputs(cfg: ModelConfig, config: EngineConfig, key: Key, max_seq_len: int) -> tuple[StepInputs, ...]:
    """The abstract inputs of each segment of `key`'s step, carrying their shardings."""
    mesh = mesh_of(config)
    segs = (abstract_inputs((sp, sb, st, key[3]), max_seq_len, cfg.vocab_size) for sp, sb, st in segments_of(key))
    return tuple(sharding.attach(a, input_shardings(mesh, a)) for a in segs)


def input_shardings(mesh: Mesh, inputs: StepInputs) -> StepInputs:
    """Where each of a segment's step inputs sits on the mesh."""
    rep = sharding.replicated(mesh)
    return StepInputs(**{
        f: jax.tree.map(
            lambda a, f=f: sharding.batch_leading(mesh, a.shape) if f in _BATCH_INPUTS else rep, getattr(inputs, f)
        )
        for f in StepInputs._fields
    })  # fmt: skip


def _same(a: Any, b: Any) -> bool:
    """Two host arrays (or trees of them) hold the same values."""
    if a is b:
        return True
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb, strict=True)
    )


class StepProgram:
    """The callable of one bucket: `(weights, state, per-segment inputs) -> (state, per-segment StepOutputs)`.
    `units` are its executables in `unit_names` order; `inputs` the abstract inputs of its
    segments, carrying their shardings. A layered step runs as `embed`, `run_layers`, `sample`."""

    def __init__(self, cfg: ModelConfig, key: Key, units: list[Any], inputs: tuple[StepInputs, ...], mesh: Mesh):
        self.units = units
        self.input_shardings = jax.tree.map(lambda a: a.sharding, inputs)
        self._resident: dict[tuple[int, str], tuple[Any, Any]] = {}  # (segment, field) -> (host, device)
        self.calls = self.row_sends = 0  # steps, and those that sent some sampled-row array
        if len(units) > 1:  # layered: its units by part; each group's layer indices, rope kinds and windows
            segs = segments_of(key)
            self.fronts, self.layers = units[: len(segs)], units[len(segs)]
            rest = iter(units[len(segs) + 1 :])
            self.heads = [[next(rest) for _ in head_names(*seg)] for seg in segs]
            G = self.group = group_size(cfg)
            self.groups = [
                jax.device_put((
                    np.arange(i, i + G, dtype=np.int32),
                    np.asarray(cfg.sliding_flags[i : i + G]),
                    np.asarray(transformer.windows(cfg)[i : i + G], np.int32),
                ), sharding.replicated(mesh))
                for i in range(0, cfg.num_layers, G)
            ]  # fmt: skip

    def put(self, inputs: tuple[StepInputs, ...]) -> tuple[StepInputs, ...]:
        """The segments' inputs on the device, in one transfer; a sampled-row array that holds
        what this bucket's last step sent is not sent again. Usually it is the very same object
        (graph/batching.py RowReuse); the decision is by content all the same, so every process of
        a multi-host mesh, each with its own copy of the inputs, sends the same arrays."""
        kept = {}
        for i, seg in enumerate(inputs):
            for f in RESIDENT:
                last = self._resident.get((i, f))
                if last is not None and _same(last[0], new := getattr(seg, f)):
                    kept[(i, f)] = last[1]
                    # equal, not identical (a new batch's all-ones mask): the next check is by identity
                    self._resident[(i, f)] = (new, last[1])
        self.calls += 1
        self.row_sends += len(kept) < len(inputs) * len(RESIDENT)

        def unsent(tree: tuple[StepInputs, ...]) -> tuple[StepInputs, ...]:
            return tuple(seg._replace(**{f: None for f in RESIDENT if (i, f) in kept}) for i, seg in enumerate(tree))

        sent = jax.device_put(unsent(inputs), unsent(self.input_shardings))
        out = []
        for i, (seg, on_device) in enumerate(zip(inputs, sent, strict=True)):
            for f in RESIDENT:
                if (i, f) not in kept:
                    self._resident[(i, f)] = (getattr(seg, f), getattr(on_device, f))
            out.append(on_device._replace(**{f: kept[(i, f)] for f in RESIDENT if (i, f) in kept}))
        return tuple(out)

    def __call__(self, w: Weights, state: State, inputs: tuple[StepInputs, ...]):
        inputs = self.put(inputs)  # once, not once per layer
        if len(self.units) == 1:
            return self.units[0](w, state, inputs)
        top = without_layers(w)
        hs, ropes = self.embed(top, state, inputs)
        hs, kv = self.run_layers(w, hs, state.kv, inputs, ropes)
        outs, sampled = self.sample(top, hs, inputs, state.sampled)
        return State(kv, sampled), outs

    # the parts of a layered step, on inputs already on the device (scripts/bench_step.py times them)

    def embed(self, top: Weights, state: State, inputs: tuple[StepInputs, ...]):
        """-> (per-segment h, per-segment ropes)."""
        fed = [
            f(top, i.tokens, i.positions, state.sampled, i.carry_from) for f, i in zip(self.fronts, inputs, strict=True)
        ]
        return tuple(h for h, _ in fed), tuple(r for _, r in fed)

    def run_layers(self, w: Weights, hs, kv: KVCache, inputs: tuple[StepInputs, ...], ropes):
        """-> (per-segment h after the last layer, kv)."""
        page_tables = tuple(i.page_table for i in inputs)
        positions = tuple(i.positions for i in inputs)
        bases = tuple(i.base for i in inputs)
        for i, per_layer in enumerate(self.groups):
            lws = w.layers[i * self.group : (i + 1) * self.group]
            hs, kv = self.layers(lws, tuple(hs), kv, *per_layer, page_tables, positions, bases, ropes)
        return hs, kv

    def sample(self, top: Weights, hs, inputs: tuple[StepInputs, ...], sampled):
        """-> (per-segment StepOutputs, `sampled` with the step's tokens)."""
        outs = []
        for units, h, i in zip(self.heads, hs, inputs, strict=True):
            if len(units) == 1:
                out, sampled = units[0](top, h, for_head(i), sampled)
            else:  # a prefill chunk: tail, then pick
                last, pos, prompt = units[0](top, h, for_head(i))
                picked, sampled = units[1](top, last, pos, rows_only(i), sampled)
                out = StepOutputs(picked, prompt)
            outs.append(out)
        return tuple(outs), sampled
