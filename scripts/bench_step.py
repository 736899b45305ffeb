"""Time one compiled decode step (and optionally a prefill chunk) of the real engine executables,
for several weight layouts, in one process: milliseconds per step and decode tokens/s.

    .venv/bin/python scripts/bench_step.py --batch 1 16 --variants unroll unroll:int8 scan

A variant is `LOOP[:QUANTIZE]`. Every variant runs the same inputs: `--context` tokens already in
the cache of every row (random pages of a pool sized for the batch), greedy sampling.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import numpy as np

from graph.api import EngineConfig, SamplingParams
from graph.buckets import Buckets
from graph.executables import ExecutableTable
from graph.layout import device_weights
from graph.sampling import host_arrays
from graph.step import StepInputs, abstract_inputs
from models.loader import load_model


def step_inputs(key, config: EngineConfig, context: int, num_pages: int, rng) -> StepInputs:
    _, B, T, W = key
    abstract = abstract_inputs(key, config.max_seq_len)
    arrays = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
    pages = rng.permutation(np.arange(1, num_pages))[: B * W].reshape(B, W).astype(np.int32)
    positions = np.full((B, T), context, np.int32) + np.arange(T, dtype=np.int32)
    rows = [(SamplingParams(temperature=0), 0, ())] * B
    return arrays._replace(
        tokens=rng.integers(0, 1000, (B, T)).astype(np.int32),
        positions=positions,
        page_table=pages,
        last_index=np.full(B, T - 1, np.int32),
        sampling=host_arrays(rows, B),
        history=np.full((B, config.max_seq_len), -1, np.int32),
    )


def time_variant(model, variant: str, batches: list[int], args) -> None:
    loop, _, quantize = variant.partition(":")
    config = EngineConfig(
        max_batch=max(batches), max_seq_len=args.max_seq_len, layer_loop=loop, quantize=quantize or "none",
        dtype=model.dtype,
    )  # fmt: skip
    buckets = Buckets.from_config(config)
    W = buckets.context_for(args.context + 1)
    num_pages = max(batches) * W + 1
    weights = device_weights(model.params, model.cfg, config)
    rng = np.random.default_rng(0)
    only = dataclasses.replace(buckets, prefill_tokens=(), decode_batch=tuple(batches), context_pages=(W,))
    started = time.perf_counter()
    table = ExecutableTable.compile(model.cfg, model.dtype, config, only, num_pages)
    print(f"{variant:>14} compiled {len(table.executables)} executables in {time.perf_counter() - started:.1f}s")
    for B in batches:
        key = ("decode", B, 1, W)
        compiled, kv = table.get(key), table.init_kv()
        inputs = jax.device_put((step_inputs(key, config, args.context, num_pages, rng),))
        for _ in range(3):
            kv, out = compiled(weights, kv, inputs)
        jax.block_until_ready(out)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            kv, out = compiled(weights, kv, inputs)
            jax.block_until_ready(out)
            times.append(time.perf_counter() - t0)
        ms = 1000 * float(np.median(times))
        print(
            f"{variant:>14} batch {B:3d} ctx {W * 16:5d}: {ms:7.1f} ms/step  {B / ms * 1000:7.1f} tokens/s", flush=True
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--variants", nargs="+", default=["scan", "unroll", "unroll:int8"])
    parser.add_argument("--context", type=int, default=200, help="tokens already in each row's cache")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    model = load_model(args.model, args.dtype)
    for variant in args.variants:
        time_variant(model, variant, args.batch, args)


if __name__ == "__main__":
    main()
