"""Throughput of the offline API against Hugging Face `transformers` `generate`, in one run.

    .venv/bin/python scripts/bench_offline.py                      # SmolLM2, batch 16 and batch 1
    .venv/bin/python scripts/bench_offline.py --batch 8 --prompt-len 64 --output-len 64 --skip-hf
    # on a mesh (here of simulated CPU devices): any EngineConfig field through --set
    XLA_FLAGS=--xla_force_host_platform_device_count=3 .venv/bin/python scripts/bench_offline.py \
        --skip-hf --set tensor_parallel=3

Both sides run the same dequantized weights (transformers: float32, eager attention, built from our
GGUF reader's output as in tests/hf_reference.py) on the same random prompt ids, greedy, with
end-of-sequence ignored so every sequence is exactly --output-len tokens long. Each side is timed
at batch 1 and at --batch, after a warm-up of the same shapes: our compile time (the engine's
start-up) is reported apart, and the timed runs count the XLA compilations they trigger (should be 0).
tokens/s = generated tokens / wall time of the whole `generate` call (prefill included).
Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import numpy as np

from graph.api import EngineConfig, SamplingParams
from graph.offline import LLM
from models.loader import DEFAULT_MODEL, LoadedModel, load_model
from tests.hf_reference import hf_greedy, hf_reference, load_with_checkpoint

log = logging.getLogger("bench_offline")


class CompileCounter:
    """Counts XLA backend compilations (jax.monitoring events) while `active`."""

    def __init__(self) -> None:
        self.active, self.count = False, 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_: Any) -> None:
        if self.active and event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


def random_prompts(model: LoadedModel, n: int, length: int, seed: int) -> list[list[int]]:
    """`n` prompts of `length` random ordinary token ids (special tokens left out)."""
    special = model.tokenizer.special_ids
    candidates = np.array([i for i in range(min(model.cfg.vocab_size, model.tokenizer.vocab_size)) if i not in special])
    rng = np.random.default_rng(seed)
    return rng.choice(candidates, size=(n, length)).tolist()


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    fields = {f.name: f for f in dataclasses.fields(EngineConfig)}
    values: dict[str, Any] = {
        "max_batch": args.max_batch or args.batch,
        "max_seq_len": args.max_seq_len or args.prompt_len + args.output_len,
        "dtype": args.dtype,
    }
    for item in args.set:
        name, _, raw = item.partition("=")
        if name not in fields:
            raise SystemExit(f"--set {item}: EngineConfig has no field {name!r} (fields: {', '.join(fields)})")
        default = fields[name].default
        values[name] = raw if default is None or isinstance(default, str) else type(default)(raw)
    return EngineConfig(**values)


def bench_ours(
    model: LoadedModel, config: EngineConfig, prompts: list[list[int]], output_len: int, batches: list[int]
) -> tuple[dict[int, float], dict[str, Any], list[int]]:
    """-> ({batch: tokens/s}, facts about the run, batch 1's generated ids)."""
    counter = CompileCounter()
    started = time.monotonic()
    llm = LLM(model, config)
    startup = time.monotonic() - started
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=output_len)
    try:
        started = time.monotonic()
        for b in batches:  # warm-up: the same shapes as the timed runs
            llm.generate(prompts[:b], params)
        warmup = time.monotonic() - started
        rates, first = {}, []
        counter.active = True
        for b in batches:
            started = time.monotonic()
            out = llm.generate(prompts[:b], params)
            elapsed = time.monotonic() - started
            lengths = {len(c.token_ids) for c in out}
            if lengths != {output_len}:
                raise RuntimeError(f"expected {output_len} tokens per sequence, got lengths {sorted(lengths)}")
            rates[b] = b * output_len / elapsed
            first = first or out[0].token_ids
            log.info("ours  batch %2d: %6.1f tokens/s (%.1fs)", b, rates[b], elapsed)
        counter.active = False
    finally:
        llm.shutdown()
    facts = {"startup_s": round(startup, 1), "warmup_s": round(warmup, 1), "compiles_while_timed": counter.count}
    return rates, facts, first


def bench_hf(
    hf: Any, prompts: list[list[int]], output_len: int, batches: list[int]
) -> tuple[dict[int, float], list[int]]:
    """-> ({batch: tokens/s}, batch 1's generated ids)."""
    for b in batches:  # warm-up (first-call allocations, oneDNN primitive caches)
        hf_greedy(hf, prompts[:b], min(output_len, 8))
    rates, first = {}, []
    for b in batches:
        started = time.monotonic()
        out = hf_greedy(hf, prompts[:b], output_len)
        elapsed = time.monotonic() - started
        rates[b] = b * output_len / elapsed
        first = first or out[0]
        log.info("transformers batch %2d: %6.1f tokens/s (%.1fs)", b, rates[b], elapsed)
    return rates, first


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="alias, Hugging Face directory, .gguf file or hub id")
    parser.add_argument("--batch", type=int, default=16, help="prompts in the large batch (batch 1 is run too)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-batch", type=int, default=None, help="engine's largest decode batch (default: --batch)")
    parser.add_argument("--max-seq-len", type=int, default=None, help="engine's context (default: prompt + output)")
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16"), help="ours; transformers: float32"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="any other EngineConfig field"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-hf", action="store_true", help="measure ours only")
    parser.add_argument("--hf-threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    config = _engine_config(args)
    if args.skip_hf:
        model, checkpoint = load_model(args.model, args.dtype), None
    else:
        model, checkpoint = load_with_checkpoint(args.model, args.dtype)
    batches = sorted({1, args.batch})
    prompts = random_prompts(model, args.batch, args.prompt_len, args.seed)
    ours, facts, ours_first = bench_ours(model, config, prompts, args.output_len, batches)

    theirs: dict[int, float] = {}
    agree = None
    if not args.skip_hf:
        import torch

        hf = hf_reference(model, checkpoint)
        del checkpoint
        if args.hf_threads:
            torch.set_num_threads(args.hf_threads)
        facts["torch_threads"] = torch.get_num_threads()
        theirs, hf_first = bench_hf(hf, prompts, args.output_len, batches)
        agree = next((i for i, (a, b) in enumerate(zip(ours_first, hf_first, strict=True)) if a != b), len(hf_first))

    print(f"\n{model.name} ({args.dtype}), prompt {args.prompt_len} + output {args.output_len} tokens, greedy")
    print(f"{'batch':>5} {'ours tok/s':>11} {'transformers':>13} {'ratio':>7}")
    for b in batches:
        hf_rate = theirs.get(b)
        ratio = f"{ours[b] / hf_rate:6.2f}x" if hf_rate else "-"
        print(f"{b:>5} {ours[b]:>11.1f} {hf_rate or float('nan'):>13.1f} {ratio:>7}")
    print(
        f"engine start-up (compilation) {facts['startup_s']}s, warm-up {facts['warmup_s']}s, "
        f"compilations while timed: {facts['compiles_while_timed']}"
    )
    if agree is not None:
        print(f"batch-1 greedy tokens identical to transformers for the first {agree}/{args.output_len}")
    result = {
        "model": model.name,
        "dtype": args.dtype,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "engine": {k: v for k, v in dataclasses.asdict(config).items() if v is not None},
        "ours_tokens_per_s": {str(b): round(r, 1) for b, r in ours.items()},
        "hf_tokens_per_s": {str(b): round(r, 1) for b, r in theirs.items()},
        "ratio": {str(b): round(ours[b] / theirs[b], 2) for b in theirs},
        "hf_agreeing_tokens_batch1": agree,
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "jax_backend": jax.default_backend(),
        **facts,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
