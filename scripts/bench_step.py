"""Time compiled steps of the real engine executables, for several weight layouts, in one
process: milliseconds per decode step (and decode tokens/s), and with `--chunk T` per prefill
chunk of T tokens and per mixed step (the decode batch plus that chunk), with `--verify K` per
speculative decode step (each row its token and K drafts).

    .venv/bin/python scripts/bench_step.py --batch 1 16 --variants unroll unroll:int8 scan
    .venv/bin/python scripts/bench_step.py --batch 8 --variants layered --chunk 64 256

A variant is `LOOP[:QUANTIZE]`. Every variant runs the same inputs: `--context` tokens already in
the cache of every row (random pages of a pool sized for the batch), greedy sampling.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import numpy as np

from graph.api import EngineConfig, SamplingParams
from graph.buckets import Buckets
from graph.checkpoint import load_weights
from graph.executables import ExecutableTable
from graph.programs import segments_of, without_layers
from graph.sampling import host_arrays
from graph.step import State, abstract_inputs, rows_of
from models.loader import load_model


def segment_inputs(
    phase: str, B: int, T: int, W: int, config: EngineConfig, vocab: int, context: int, num_pages: int, rng
):
    """One segment's inputs: every row (or, for a chunk, its one prompt) at `context` tokens on,
    unconstrained (an all-ones token mask)."""
    abstract = abstract_inputs((phase, B, T, W), config.max_seq_len, vocab)
    arrays = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
    R = rows_of(phase, B, T)
    pages = rng.permutation(np.arange(1, num_pages))[: B * W].reshape(B, W).astype(np.int32)
    positions = np.full((B, T), context, np.int32) + np.arange(T, dtype=np.int32)
    last = np.arange(R, dtype=np.int32) if phase == "decode" else np.full(R, T - 1, np.int32)
    return arrays._replace(
        tokens=rng.integers(0, 1000, (B, T)).astype(np.int32),
        positions=positions,
        page_table=pages,
        last_index=last,
        sampling=host_arrays([(SamplingParams(temperature=0), 0, ())] * R, R),
        mask=np.full(abstract.mask.shape, 0xFFFFFFFF, np.uint32),
        history=np.full((R, config.max_seq_len), -1, np.int32),
        carry_from=np.full(B, -1, np.int32) if phase == "decode" else None,
    )


def keys_for(batches: list[int], chunks: list[int], W: int, verify: list[int]) -> list[tuple]:
    return [
        *(("decode", B, 1, W) for B in batches),
        *(("decode", B, 1 + k, W) for B in batches for k in verify),
        *(("prefill", 1, T, W) for T in chunks),
        *(("mixed", B, T, W) for B in batches for T in chunks),
    ]


def time_variant(model, variant: str, args) -> None:
    loop, _, quantize = variant.partition(":")
    config = EngineConfig(
        max_batch=max(args.batch), max_seq_len=args.max_seq_len, layer_loop=loop, quantize=quantize or "none",
        dtype=model.dtype, kv_cache_dtype=args.kv_cache_dtype,
    )  # fmt: skip
    buckets = Buckets.from_config(config)
    W = buckets.context_for(max(args.context + max([1, *args.chunk]), args.width))
    num_pages = max(args.batch) * W + W + 1
    weights = load_weights(model, config)  # a converted model (--model DIR): only its own variant
    rng = np.random.default_rng(0)
    keys = keys_for(args.batch, args.chunk, W, args.verify)
    started = time.perf_counter()
    table = ExecutableTable.compile(model.cfg, model.dtype, config, buckets, num_pages, keys=keys)
    print(f"{variant:>14} compiled {len(table.executables)} executables in {time.perf_counter() - started:.1f}s")
    for key in keys:
        compiled, kv = table.get(key), table.init_kv()
        inputs = tuple(
            segment_inputs(phase, B, T, W, config, model.cfg.vocab_size, args.context, num_pages, rng)
            for phase, B, T in segments_of(key)
        )
        inputs = jax.device_put(inputs)
        for _ in range(3):
            kv, out = compiled(weights, kv, inputs)
        jax.block_until_ready(out)
        times, cpu0 = [], time.process_time()
        for _ in range(args.steps):
            t0 = time.perf_counter()
            kv, out = compiled(weights, kv, inputs)
            jax.block_until_ready(out)
            times.append(time.perf_counter() - t0)
        ms = 1000 * float(np.median(times))
        cores = (time.process_time() - cpu0) / sum(times)  # CPU seconds per wall second: cores kept busy
        phase, B, T, _ = key
        rate = (
            f"{B / ms * 1000:7.1f} decode tokens/s" if phase != "prefill" else f"{T / ms * 1000:7.1f} prompt tokens/s"
        )
        where = f"{variant:>14} {phase:>7} batch {B:3d} chunk {T:4d} ctx {W * 16:5d}"
        print(f"{where}: {ms:7.1f} ms/step  {rate}  {cores:.2f} cores", flush=True)
        if args.split and len(compiled.units) > 1:
            kv = print_split(compiled, weights, kv, inputs, args.steps)


def print_split(program, weights, state, inputs, steps: int):
    """A layered step's time by part (median ms): embedding, the decoder layers (their matmuls
    and attention), the head (final norm, logits, sampling), each waited for on its own."""
    top = without_layers(weights)
    parts: dict[str, list[float]] = {"embedding": [], "layers": [], "head": []}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        parts[name].append(1000 * (time.perf_counter() - t0))
        return out

    inputs = program.put(inputs)
    for _ in range(steps):
        hs, ropes = timed("embedding", lambda s=state: program.embed(top, s, inputs))
        hs, kv = timed("layers", lambda hs=hs, s=state, r=ropes: program.run_layers(weights, hs, s.kv, inputs, r))
        _, sampled = timed("head", lambda hs=hs, s=state: program.sample(top, hs, inputs, s.sampled))
        state = State(kv, sampled)
    print("                 split: " + ", ".join(f"{k} {np.median(v):.1f} ms" for k, v in parts.items()), flush=True)
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto (the model's) | float32 | bfloat16")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--variants", nargs="+", default=["scan", "unroll", "unroll:int8"])
    parser.add_argument("--context", type=int, default=200, help="tokens already in each row's cache")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--width", type=int, default=0, help="page-table width in tokens, at least (a context bucket)")
    parser.add_argument("--chunk", type=int, nargs="*", default=[], help="prefill chunk sizes (and mixed steps)")
    parser.add_argument("--verify", type=int, nargs="*", default=[], help="speculative steps of K drafts per row")
    parser.add_argument("--split", action="store_true", help="also time a layered step's parts one by one")
    args = parser.parse_args()
    model = load_model(args.model, args.dtype)
    for variant in args.variants:
        time_variant(model, variant, args)


if __name__ == "__main__":
    main()
