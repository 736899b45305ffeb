"""Engine throughput on random weights of a named model shape: for accelerators and shapes whose
real weights are not at hand. Prompts are random token ids; generation ignores end tokens.

    python scripts/bench_decode.py --shape smollm2-135m --batches 1,16 --dtype float32
    python scripts/bench_decode.py --shape llama-1b --batches 1,16,64 --dtype bfloat16 --tokenizer DIR

The tokenizer (only used to detokenize) comes from --tokenizer (a Hugging Face tokenizer
directory) or the bundled SmolLM2; the shape's vocabulary is cut to the tokenizer's size.
Prints one JSON line per batch size.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import numpy as np

from graph.api import EngineConfig, SamplingParams
from graph.offline import LLM
from models.config import ModelConfig
from models.loader import LoadedModel
from models.params import DTYPES, init_params
from models.tokenizer import load_tokenizer

SHAPES = {  # Hugging Face config fields of public models
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, rope_theta=500000.0),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, tie_word_embeddings=False, rope_theta=500000.0),
}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=SHAPES, default="smollm2-135m")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--layer-loop", choices=("scan", "unroll"), default="scan")
    ap.add_argument("--tokenizer", default=None)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    else:
        from models.loader import ALIASES

        tokenizer = load_tokenizer(ALIASES["smollm2-135m-instruct"]())
    hf = {"model_type": "llama", "vocab_size": tokenizer.vocab_size, **SHAPES[args.shape]}
    cfg = ModelConfig.from_hf(hf)
    t0 = time.monotonic()
    params = init_params(cfg, dtype=DTYPES[args.dtype])
    model = LoadedModel(args.shape, cfg, params, tokenizer, args.dtype, f"random-{args.shape}", Path("."))
    config = EngineConfig(
        max_batch=max(batches), max_seq_len=args.max_seq_len, max_prefill_tokens=args.prompt_len,
        min_context_tokens=args.max_seq_len, dtype=args.dtype, layer_loop=args.layer_loop,
    )  # fmt: skip
    llm = LLM(model, config)
    startup = time.monotonic() - t0
    rng = np.random.default_rng(0)
    params_out = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    for batch in batches:
        prompts = rng.integers(100, cfg.vocab_size - 100, size=(batch, args.prompt_len)).tolist()
        llm.generate(prompts, dataclasses.replace(params_out, max_tokens=4))  # warm-up
        t0 = time.monotonic()
        out = llm.generate(prompts, params_out)
        seconds = time.monotonic() - t0
        tokens = sum(len(c.token_ids) for c in out)
        print(json.dumps({
            "shape": args.shape, "dtype": args.dtype, "device": jax.devices()[0].device_kind,
            "layer_loop": args.layer_loop, "batch": batch, "prompt_len": args.prompt_len,
            "output_len": args.output_len, "tokens_per_s": round(tokens / seconds, 1),
            "seconds": round(seconds, 2), "startup_s": round(startup, 1),
        }), flush=True)  # fmt: skip
    llm.shutdown()


if __name__ == "__main__":
    main()
