"""On-device sampling, per row, with every parameter an array value (never a shape or a static).

Order of operations (as vLLM): the grammar's token mask (structured outputs: a masked token gets
a -inf-like logit, so it is never drawn and has no probability in the logprobs) -> logit bias ->
repetition / frequency / presence penalties -> suppression of end tokens before min_tokens ->
greedy argmax, or temperature -> top-k -> top-p -> min-p -> a draw with the row's own key,
`fold_in(key(seed), position)`, so a row's draw never depends on its neighbours. Log-probabilities
are those of the model (the masked logits' log-softmax), as in the OpenAI API; an unconstrained
row's mask is all ones and changes nothing. Expensive parts (sorting, penalties, top alternatives)
sit under `lax.cond` and cost nothing when no row of the batch asks for them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from graph.api import MAX_TOP_LOGPROBS, SamplingParams

MAX_LOGIT_BIAS = 300  # entries of logit_bias per request
MAX_SUPPRESS = 16  # end token ids (eos + stop_token_ids) suppressed before min_tokens
_NEG = -1e30


class SamplingArrays(NamedTuple):
    """Per-row sampling inputs, [B, ...]."""

    temperature: jax.Array  # f32; 0 = greedy
    top_k: jax.Array  # i32; 0, -1 or >= vocabulary size = off
    top_p: jax.Array  # f32
    min_p: jax.Array  # f32
    presence: jax.Array  # f32
    frequency: jax.Array  # f32
    repetition: jax.Array  # f32; 1 = off
    bias_ids: jax.Array  # i32 [B, MAX_LOGIT_BIAS]; -1 = unused
    bias_values: jax.Array  # f32 [B, MAX_LOGIT_BIAS]
    suppress_ids: jax.Array  # i32 [B, MAX_SUPPRESS]; -1 = unused (host fills them while < min_tokens)
    seed: jax.Array  # u32
    want_top: jax.Array  # bool: compute top alternatives


class SampleOut(NamedTuple):
    token: jax.Array  # i32 [B]
    logprob: jax.Array  # f32 [B]
    top_ids: jax.Array  # i32 [B, MAX_TOP_LOGPROBS]
    top_logprobs: jax.Array  # f32 [B, MAX_TOP_LOGPROBS]


def host_arrays(rows: list[tuple[SamplingParams, int, tuple[int, ...]] | None], batch: int) -> SamplingArrays:
    """Numpy SamplingArrays for `batch` rows from (params, seed, ids to suppress) or None (padding)."""
    a = SamplingArrays(
        temperature=np.zeros(batch, np.float32),
        top_k=np.zeros(batch, np.int32),
        top_p=np.ones(batch, np.float32),
        min_p=np.zeros(batch, np.float32),
        presence=np.zeros(batch, np.float32),
        frequency=np.zeros(batch, np.float32),
        repetition=np.ones(batch, np.float32),
        bias_ids=np.full((batch, MAX_LOGIT_BIAS), -1, np.int32),
        bias_values=np.zeros((batch, MAX_LOGIT_BIAS), np.float32),
        suppress_ids=np.full((batch, MAX_SUPPRESS), -1, np.int32),
        seed=np.zeros(batch, np.uint32),
        want_top=np.zeros(batch, np.bool_),
    )
    for i, row in enumerate(rows):
        if row is None:
            continue
        p, seed, suppress = row
        a.temperature[i], a.top_k[i], a.top_p[i], a.min_p[i] = p.temperature, p.top_k, p.top_p, p.min_p
        a.presence[i], a.frequency[i] = p.presence_penalty, p.frequency_penalty
        a.repetition[i] = p.repetition_penalty
        for j, (tok, val) in enumerate(p.logit_bias[:MAX_LOGIT_BIAS]):
            a.bias_ids[i, j], a.bias_values[i, j] = tok, val
        a.suppress_ids[i, : len(suppress[:MAX_SUPPRESS])] = suppress[:MAX_SUPPRESS]
        a.seed[i] = seed
        a.want_top[i] = bool(p.logprobs) or bool(p.prompt_logprobs)
    return a


def _scatter_rows(x: jax.Array, ids: jax.Array, values: jax.Array, op: str) -> jax.Array:
    """Per row: x[b, ids[b, j]] (op)= values[b, j]; ids < 0 are dropped."""
    rows = jnp.broadcast_to(jnp.arange(x.shape[0])[:, None], ids.shape)
    ids = jnp.where(ids < 0, x.shape[1], ids)  # out of range -> dropped
    at = x.at[rows, ids]
    return at.add(values, mode="drop") if op == "add" else at.set(values, mode="drop")


def _penalize(logits: jax.Array, s: SamplingArrays, history: jax.Array, prompt_len: jax.Array) -> jax.Array:
    """history [B, H]: prompt then output tokens, -1 padded; prompt_len [B]."""
    is_output = (jnp.arange(history.shape[1])[None, :] >= prompt_len[:, None]) & (history >= 0)
    counts = _scatter_rows(jnp.zeros_like(logits), history, is_output.astype(jnp.float32), "add")
    seen = _scatter_rows(jnp.zeros_like(logits), history, jnp.ones_like(history, jnp.float32), "add") > 0
    rep = s.repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - s.frequency[:, None] * counts - s.presence[:, None] * (counts > 0)


def _filter(logits: jax.Array, s: SamplingArrays) -> jax.Array:
    """Top-k, top-p and min-p on temperature-scaled logits (one descending sort per row)."""
    V = logits.shape[1]
    sorted_desc = -jnp.sort(-logits, axis=-1)
    k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, V), V)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    probs = jnp.where(jnp.arange(V)[None, :] < k[:, None], probs, 0.0)
    probs = probs / jnp.sum(probs, axis=-1, keepdims=True)
    exclusive = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
    keep_sorted = exclusive < s.top_p[:, None]
    # the smallest logit still kept by top-p, as a threshold on the unsorted logits
    last = jnp.maximum(jnp.sum(keep_sorted, axis=-1) - 1, 0)
    p_thresh = jnp.take_along_axis(sorted_desc, last[:, None], axis=1)
    min_p_thresh = sorted_desc[:, :1] + jnp.log(jnp.maximum(s.min_p[:, None], 1e-38))
    thresh = jnp.maximum(jnp.maximum(kth, p_thresh), jnp.where(s.min_p[:, None] > 0, min_p_thresh, _NEG))
    return jnp.where(logits >= thresh, logits, _NEG)


def sample(
    logits: jax.Array,  # f32 [B, V]
    s: SamplingArrays,
    positions: jax.Array,  # i32 [B]: position of the token being sampled
    history: jax.Array,  # i32 [B, H]
    prompt_len: jax.Array,  # i32 [B]
    mask: jax.Array | None = None,  # u32 [B, ceil(V/32)]: allowed tokens, bit t % 32 of word t // 32
) -> SampleOut:
    if mask is not None:
        logits = jnp.where(unpack_mask(mask, logits.shape[1]), logits, _NEG)
    model_logprobs = jax.nn.log_softmax(logits, axis=-1)
    x = _scatter_rows(logits, s.bias_ids, s.bias_values, "add")
    penalized = (s.presence != 0) | (s.frequency != 0) | (s.repetition != 1)
    x = jax.lax.cond(jnp.any(penalized), lambda: _penalize(x, s, history, prompt_len), lambda: x)
    x = _scatter_rows(x, s.suppress_ids, jnp.full(s.suppress_ids.shape, _NEG, x.dtype), "set")
    greedy = first_argmax(x)

    scaled = x / jnp.maximum(s.temperature, 1e-6)[:, None]
    top_k_on = (s.top_k > 0) & (s.top_k < logits.shape[1])  # 0, -1 or the whole vocabulary: off
    filtering = top_k_on | (s.top_p < 1) | (s.min_p > 0)
    scaled = jax.lax.cond(jnp.any(filtering & (s.temperature > 0)), lambda: _filter(scaled, s), lambda: scaled)

    def draw(seed, pos, row):  # jax.random.categorical's Gumbel-max draw, with the faster argmax
        key = jax.random.fold_in(jax.random.key(seed), pos)
        return first_argmax(jax.random.gumbel(key, row.shape, row.dtype) + row)

    sampled = s.temperature > 0
    drawn = jax.lax.cond(jnp.any(sampled), lambda: jax.vmap(draw)(s.seed, positions, scaled), lambda: greedy)
    token = jnp.where(sampled, drawn, greedy)
    logprob = jnp.take_along_axis(model_logprobs, token[:, None], axis=1)[:, 0]
    top_lp, top_ids = jax.lax.cond(
        jnp.any(s.want_top), lambda: top_alternatives(model_logprobs), lambda: _no_top(logits)
    )
    return SampleOut(token, logprob, top_ids, top_lp)


def first_argmax(x: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (the first maximum; the first NaN if any), as two plain
    reductions: XLA:CPU's argmax, a reduction of (value, index) pairs, took 1.8 ms for 16 rows of
    49,152 logits (3% of an int8 SmolLM2 decode step) where a max and a min take 0.4."""
    top = jnp.max(x, axis=-1, keepdims=True)
    ids = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where((x == top) | jnp.isnan(x), ids, x.shape[-1]), axis=-1)


def unpack_mask(mask: jax.Array, vocab: int) -> jax.Array:
    """u32 [B, W] packed bits -> bool [B, vocab]."""
    bits = (mask[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1  # [B, W, 32]
    return bits.reshape(mask.shape[0], -1)[:, :vocab].astype(jnp.bool_)


def top_alternatives(logprobs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The MAX_TOP_LOGPROBS best (logprob, id) along the last axis (padded if the vocab is smaller)."""
    k = min(MAX_TOP_LOGPROBS, logprobs.shape[-1])
    lp, ids = jax.lax.top_k(logprobs, k)
    pad = [(0, 0)] * (lp.ndim - 1) + [(0, MAX_TOP_LOGPROBS - k)]
    return jnp.pad(lp, pad, constant_values=_NEG), jnp.pad(ids.astype(jnp.int32), pad)


def _no_top(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    shape = (*logits.shape[:-1], MAX_TOP_LOGPROBS)
    return jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.int32)
