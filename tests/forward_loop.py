"""Greedy generation by a plain loop over the model's forward pass, no engine: one prefill, then
one-token decode steps on a paged KV cache, `models.transformer.forward` under `jax.jit`. The
reference the parity tests (tests/test_parity_real.py) hold against transformers, and the loop of
`scripts/generate.py`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from models import transformer
from models.layers import KVCache, kv_shape
from models.loader import LoadedModel
from models.params import Weights, prepare

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
