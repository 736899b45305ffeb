"""Print a greedy continuation of a prompt: a simple loop over the model's forward pass.

    .venv/bin/python scripts/generate.py --model gemma3-270m --prompt "The capital of France is"
    .venv/bin/python scripts/generate.py --model smollm2-135m-instruct --prompt "Tell me a joke" --chat

No engine here: one prefill, then one-token decode steps on a paged KV cache, the model's
`forward` under `jax.jit`. The parity tests (`tests/test_parity_real.py`) and the offline benchmark
import the helpers below: `greedy_generate`, `prompt_logits`, and `hf_reference` (the same
dequantized weights in a `transformers` model, for comparison; needs torch).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np

from models import transformer
from models.errors import ModelLoadError
from models.layers import KVCache, kv_shape
from models.loader import LoadedModel, load_model
from models.params import Weights, prepare
from models.tokenizer import NoChatTemplateError

PAGE_SIZE = 16


@jax.jit
def _argmax_last(logits: jax.Array, last: jax.Array) -> jax.Array:
    return jnp.argmax(logits[0, last], axis=-1).astype(jnp.int32)


_forward = jax.jit(transformer.forward, static_argnums=1, donate_argnums=4)  # the KV cache is updated in place


def _weights(model: LoadedModel) -> Weights:
    """The model's weights in compute form (stacked layers, unquantized)."""
    host = jax.tree.map(np.asarray, model.params)
    return prepare(host, model.cfg, unrolled=False, quantize=None, act_quant=False)


def _bucket(n: int) -> int:
    """Prefill length padded up to a power of two (at least one page): few compilations."""
    return max(PAGE_SIZE, 1 << (n - 1).bit_length())


def _empty_cache(model: LoadedModel, prompt_len: int, max_tokens: int) -> tuple[KVCache, jax.Array]:
    """A pool for one sequence (its pages plus the scratch page 0), sized by buckets of the
    lengths so that prompts of similar length share compiled shapes."""
    cfg = model.cfg
    width = _bucket(_bucket(prompt_len) + max_tokens) // PAGE_SIZE
    shape = kv_shape(cfg, width + 1, PAGE_SIZE)
    dtype = jax.tree.leaves(model.params)[0].dtype
    page_table = jnp.arange(1, width + 1, dtype=jnp.int32)[None, :]  # [1, W]
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)), page_table


def _prefill(model: LoadedModel, weights: Weights, prompt: Sequence[int], kv: KVCache, page_table: jax.Array):
    T = _bucket(len(prompt))
    tokens = np.zeros((1, T), np.int32)
    positions = np.full((1, T), -1, np.int32)  # padding: masked, writes to the scratch page
    tokens[0, : len(prompt)] = prompt
    positions[0, : len(prompt)] = np.arange(len(prompt))
    return _forward(weights, model.cfg, jnp.asarray(tokens), jnp.asarray(positions), kv, page_table)


def greedy_tokens(
    model: LoadedModel, prompt: Sequence[int], max_tokens: int, stop_ids: Sequence[int] = ()
) -> Iterator[int]:
    """Yield up to `max_tokens` greedy tokens after `prompt` (batch 1), ending after a stop id."""
    if not prompt:
        raise ValueError("the prompt is empty")
    weights = _weights(model)
    kv, page_table = _empty_cache(model, len(prompt), max_tokens)
    logits, kv = _prefill(model, weights, prompt, kv, page_table)
    token = int(_argmax_last(logits, len(prompt) - 1))
    for position in range(len(prompt), len(prompt) + max_tokens):
        yield token
        if token in stop_ids or position == len(prompt) + max_tokens - 1:
            return
        inputs = jnp.asarray([[token]], jnp.int32), jnp.asarray([[position]], jnp.int32)
        logits, kv = _forward(weights, model.cfg, *inputs, kv, page_table)
        token = int(_argmax_last(logits, 0))


def greedy_generate(
    model: LoadedModel, prompt: Sequence[int], max_tokens: int, stop_ids: Sequence[int] = ()
) -> list[int]:
    """The greedy continuation of `prompt`: `max_tokens` ids, or fewer ending with a stop id."""
    return list(greedy_tokens(model, prompt, max_tokens, stop_ids))


def prompt_logits(model: LoadedModel, prompt: Sequence[int], max_tokens: int = 0) -> np.ndarray:
    """float32 logits [T, V] of every prompt position, from one prefill through the paged cache
    (sized as `greedy_generate(..., max_tokens)` sizes it: the same compiled prefill)."""
    kv, page_table = _empty_cache(model, len(prompt), max_tokens)
    logits, _ = _prefill(model, _weights(model), prompt, kv, page_table)
    return np.asarray(logits[0, : len(prompt)])


# --- the transformers reference --------------------------------------------------------------


@contextlib.contextmanager
def _keep_gguf_checkpoint(kept: list) -> Iterator[None]:
    """Let `load_model` hand us the `GGUFCheckpoint` it reads, so a GGUF file is dequantized once."""
    import models.gguf

    original = models.gguf.read_gguf

    def reading(*args, **kwargs):
        kept.append(original(*args, **kwargs))
        return kept[-1]

    models.gguf.read_gguf = reading
    try:
        yield
    finally:
        models.gguf.read_gguf = original


def load_with_checkpoint(source: str, dtype: str = "float32") -> tuple[LoadedModel, Any]:
    """`load_model(source)` and, for a GGUF model, the `GGUFCheckpoint` (HF config + float32
    tensors in HF layout) its weights came from; None for a Hugging Face directory."""
    kept: list = []
    with _keep_gguf_checkpoint(kept):
        model = load_model(source, dtype)
    if model.path.is_dir():
        return model, None
    if not kept:  # the loader changed how it reads GGUF: read it again
        from models.gguf import read_gguf

        kept.append(read_gguf(model.path))
    return model, kept[-1]


def hf_reference(model: LoadedModel, checkpoint: Any = None) -> Any:
    """A float32 `transformers` model (eager attention) with the same weights as `model`.

    For a GGUF model, built from our GGUF reader's output (`checkpoint`, or the file read again):
    `AutoConfig.for_model(**hf_config)` plus its tensors, which share memory with the torch model.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    if model.path.is_dir():
        return AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.float32, attn_implementation="eager").eval()
    if checkpoint is None:
        from models.gguf import read_gguf

        checkpoint = read_gguf(model.path)
    cfg = AutoConfig.for_model(**checkpoint.hf_config)
    cfg._attn_implementation = "eager"
    with no_init_weights():  # every weight is assigned below: skip the slow random init
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    state = {name: torch.from_numpy(w) for name, w in checkpoint.tensors.items()}
    result = hf.load_state_dict(state, strict=False, assign=True)
    missing = set(result.missing_keys) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    if missing or result.unexpected_keys:
        raise ValueError(
            f"weights do not fit {type(hf).__name__}: missing {missing}, unexpected {result.unexpected_keys}"
        )
    hf.tie_weights()  # `assign` replaced the embedding: point the tied lm_head at the new one
    return hf


def hf_greedy(hf: Any, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, exactly `max_tokens` long (end-of-sequence
    neither stops nor is suppressed). Prompts of equal length run as one batch, without padding."""
    import torch

    out: dict[int, list[int]] = {}
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for rows in by_length.values():
        ids = torch.tensor([prompts[i] for i in rows])
        with torch.no_grad():
            generated = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_tokens,
                eos_token_id=None,
                pad_token_id=0,
            )[:, ids.shape[1] :]
        if generated.shape[1] != max_tokens:
            raise RuntimeError(f"transformers generated {generated.shape[1]} tokens, not {max_tokens}")
        out |= dict(zip(rows, generated.tolist(), strict=True))
    return [out[i] for i in range(len(prompts))]


# --- the command line ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="alias, Hugging Face directory, .gguf file or hub id")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument(
        "--chat", action="store_true", help="render the prompt as a user message with the chat template"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        model = load_model(args.model, args.dtype)
        tok = model.tokenizer
        if args.chat:
            prompt = tok.encode_chat([{"role": "user", "content": args.prompt}])
        else:
            prompt = tok.encode(args.prompt)
    except (ModelLoadError, NoChatTemplateError) as e:
        raise SystemExit(f"error: {e}") from None
    if not prompt:
        raise SystemExit("error: the prompt is empty")
    started = time.monotonic()
    ids: list[int] = []
    text = ""
    for token in greedy_tokens(model, prompt, args.max_tokens, stop_ids=tok.eos_token_ids):
        ids.append(token)
        full = tok.decode(ids)
        if not full.endswith("\ufffd"):  # print whole characters as they complete
            print(full[len(text) :], end="", flush=True)
            text = full
    print(tok.decode(ids)[len(text) :], flush=True)
    elapsed = time.monotonic() - started
    print(f"[{len(prompt)} prompt tokens, {len(ids)} generated in {elapsed:.1f}s incl. compilation]", file=sys.stderr)


if __name__ == "__main__":
    main()
