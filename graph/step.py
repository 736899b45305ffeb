"""The step function compiled into every executable: model forward over the paged KV cache,
logits of each row's last real token, on-device sampling, and (prefill only) prompt logprobs.

Prompt logprobs need the full-vocabulary logits of every token of a chunk: `[T, V]` float32 is
512 MiB for a 512-token chunk of Gemma's 262k vocabulary. They are computed in slices of
`PROMPT_LOGPROB_SLICE` tokens under `lax.map`, inside a `lax.cond` on whether the step wants them,
so an executable's temporaries hold one slice's logits, not the chunk's.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from graph.api import MAX_TOP_LOGPROBS
from graph.sampling import MAX_LOGIT_BIAS, MAX_SUPPRESS, SampleOut, SamplingArrays, sample, top_alternatives
from models import transformer
from models.config import ModelConfig
from models.layers import KVCache, flatten, unembed, unflatten
from models.params import Weights

Key = tuple[str, int, int, int]  # a bucket: (phase, batch, tokens, context pages); see `segments_of`
PROMPT_LOGPROB_SLICE = 16  # tokens whose full-vocabulary logits exist at once
PACKED_ROWS = 4  # the most prompts one prefill chunk carries (packed): its head samples this many


class StepInputs(NamedTuple):
    """One segment's inputs: `[B, T]` tokens, and `R` sampled rows (R = B * T for a decode batch,
    T = 1 but for speculative steps; `PACKED_ROWS` for a prefill chunk, whose row holds up to that
    many prompts one after another)."""

    tokens: jax.Array  # i32 [B, T]
    positions: jax.Array  # i32 [B, T]; -1 = padding
    base: jax.Array | None  # i32 [B, T]: where the token's sequence starts in its page-table row (prefill)
    page_table: jax.Array  # i32 [B, W]
    last_index: jax.Array  # i32 [R]: the token (flat index into B * T) whose logits give a row's next token
    sampling: SamplingArrays  # [R]
    mask: jax.Array  # u32 [R, ceil(V/32)]: the tokens each row may sample (bit t % 32 of word t // 32)
    history: jax.Array  # i32 [R, H]: prompt + output tokens so far, -1 padded (penalties)
    prompt_len: jax.Array  # i32 [R]
    next_tokens: jax.Array  # i32 [B, T]: the token after each position (prompt logprobs), -1 none
    want_prompt_logprobs: jax.Array  # bool []
    carry_from: jax.Array | None  # i32 [B] (decode): row b's token is `State.sampled[carry_from[b]]`, -1: tokens[b]


class State(NamedTuple):
    """What stays on the device from step to step: the KV page pool, and the tokens the last step
    sampled (`sampled`, [carry_size]: a decode segment's rows from 0, a prefill chunk's in the last
    PACKED_ROWS), which the next step can feed without their coming back to the host first (the
    engine's look-ahead: it dispatches step n+1 before it reads step n)."""

    kv: KVCache
    sampled: jax.Array  # i32 [carry_size]


def carry_size(max_decode_batch: int) -> int:
    return max_decode_batch + PACKED_ROWS


def carry_offset(phase: str, size: int) -> int:
    """Where a segment's sampled rows go in `State.sampled`."""
    return size - PACKED_ROWS if phase == "prefill" else 0


def fed_tokens(tokens: jax.Array, sampled: jax.Array, carry_from: jax.Array | None) -> jax.Array:
    """A segment's tokens [B, T], its decode rows' taken from the last step's samples where asked."""
    if carry_from is None:
        return tokens
    carried = sampled[jnp.maximum(carry_from, 0)]
    first = jnp.arange(tokens.shape[1]) == 0  # a row's pending token (a speculative row's drafts follow it)
    return jnp.where((carry_from >= 0)[:, None] & first[None, :], carried[:, None], tokens)


def keep_sampled(sampled: jax.Array, out: StepOutputs, phase: str, tokens: int) -> jax.Array:
    if phase == "decode" and tokens > 1:  # a speculative step: its tokens are checked on the host first
        return sampled
    at = carry_offset(phase, sampled.shape[0])
    return jax.lax.dynamic_update_slice(sampled, out.sample.token.astype(jnp.int32), (at,))


def rows_of(phase: str, batch: int, tokens: int = 1) -> int:
    """Sampled rows of a segment: a prefill chunk's PACKED_ROWS, a decode batch's every token (a
    speculative row's pending token and drafts each give the token after them)."""
    return PACKED_ROWS if phase == "prefill" else batch * tokens


def abstract_inputs(key: Key, max_seq_len: int, vocab_size: int) -> StepInputs:
    phase, B, T, W = key
    R = rows_of(phase, B, T)
    i32, f32 = jnp.int32, jnp.float32

    def a(shape, dtype=i32):
        return jax.ShapeDtypeStruct(shape, dtype)

    return StepInputs(
        tokens=a((B, T)),
        positions=a((B, T)),
        base=a((B, T)) if phase == "prefill" else None,
        page_table=a((B, W)),
        last_index=a((R,)),
        sampling=SamplingArrays(
            temperature=a((R,), f32),
            top_k=a((R,)),
            top_p=a((R,), f32),
            min_p=a((R,), f32),
            presence=a((R,), f32),
            frequency=a((R,), f32),
            repetition=a((R,), f32),
            bias_ids=a((R, MAX_LOGIT_BIAS)),
            bias_values=a((R, MAX_LOGIT_BIAS), f32),
            suppress_ids=a((R, MAX_SUPPRESS)),
            seed=a((R,), jnp.uint32),
            want_top=a((R,), jnp.bool_),
        ),
        mask=a((R, -(-vocab_size // 32)), jnp.uint32),
        history=a((R, max_seq_len)),
        prompt_len=a((R,)),
        next_tokens=a((B, T)),
        want_prompt_logprobs=a((), jnp.bool_),
        carry_from=a((B,)) if phase == "decode" else None,
    )


class PromptLogprobs(NamedTuple):
    logprob: jax.Array  # f32 [B, T]: log p(next_tokens[b, t] | tokens[b, :t+1])
    top_ids: jax.Array  # i32 [B, T, MAX_TOP_LOGPROBS]
    top_logprobs: jax.Array  # f32 [B, T, MAX_TOP_LOGPROBS]


class StepOutputs(NamedTuple):
    sample: SampleOut
    prompt: PromptLogprobs | None  # prefill executables only


def _prompt_logprobs(w: Weights, cfg: ModelConfig, h: jax.Array, next_tokens: jax.Array) -> PromptLogprobs:
    """h [B, T, D], next_tokens [B, T] -> logprobs of each next token, in slices of the chunk."""
    B, T, D = h.shape
    n = min(PROMPT_LOGPROB_SLICE, T)
    pad = -T % n
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(B, -1, n, D).swapaxes(0, 1)  # [T/n, B, n, D]
    nxt = jnp.pad(next_tokens, ((0, 0), (0, pad))).reshape(B, -1, n).swapaxes(0, 1)

    def one(args):
        hs, ns = args
        logprobs = jax.nn.log_softmax(unembed(w, cfg, hs), axis=-1)  # [B, n, V]
        chosen = jnp.take_along_axis(logprobs, jnp.maximum(ns, 0)[..., None], axis=-1)[..., 0]
        top_lp, top_ids = top_alternatives(logprobs)
        return PromptLogprobs(chosen, top_ids, top_lp)

    def unslice(x):  # [T/n, B, n, ...] -> [B, T, ...]
        x = x.swapaxes(0, 1)
        return x.reshape(B, -1, *x.shape[3:])[:, :T]

    return jax.tree.map(unslice, jax.lax.map(one, (h, nxt)))


def last_rows(h: jax.Array, inp: StepInputs) -> tuple[jax.Array, jax.Array]:
    """The hidden states whose logits give each sampled row's next token, and that token's
    position: -> ([R, D], [R])."""
    last = h.reshape(-1, h.shape[-1])[inp.last_index]
    return last, inp.positions.reshape(-1)[inp.last_index] + 1


def sample_rows(w: Weights, last: jax.Array, sample_pos: jax.Array, inp: StepInputs, *, cfg: ModelConfig) -> SampleOut:
    """Final-normed hidden rows [R, D] -> each row's sampled token (only `inp`'s per-row fields are read)."""
    return sample(unembed(w, cfg, last), inp.sampling, sample_pos, inp.history, inp.prompt_len, inp.mask)


def prompt_logprobs(w: Weights, h: jax.Array, inp: StepInputs, *, cfg: ModelConfig) -> PromptLogprobs:
    """A chunk's prompt logprobs where the step wants them (zeros where not: nothing is computed)."""
    B, T = inp.tokens.shape
    zeros = PromptLogprobs(
        jnp.zeros((B, T), jnp.float32),
        jnp.zeros((B, T, MAX_TOP_LOGPROBS), jnp.int32),
        jnp.zeros((B, T, MAX_TOP_LOGPROBS), jnp.float32),
    )
    return jax.lax.cond(inp.want_prompt_logprobs, lambda: _prompt_logprobs(w, cfg, h, inp.next_tokens), lambda: zeros)


def back(w: Weights, h: jax.Array, inp: StepInputs, *, cfg: ModelConfig, prefill: bool) -> StepOutputs:
    """Final-normed hidden [B, T, D] -> the sampled token of each row (+ prompt logprobs)."""
    out = sample_rows(w, *last_rows(h, inp), inp, cfg=cfg)
    return StepOutputs(out, prompt_logprobs(w, h, inp, cfg=cfg) if prefill else None)


def step(w: Weights, state: State, inps: tuple[StepInputs, ...], *, cfg: ModelConfig, prefill: tuple[bool, ...]):
    """The whole step in one executable, over one segment or several (a mixed step: the decode
    rows, then a prefill chunk): -> (state, per-segment StepOutputs)."""
    hs, kv = transformer.hidden(
        w,
        cfg,
        tuple(fed_tokens(i.tokens, state.sampled, i.carry_from) for i in inps),
        tuple(i.positions for i in inps),
        state.kv,
        tuple(i.page_table for i in inps),
        tuple(i.base for i in inps),
    )
    outs = tuple(back(w, h, i, cfg=cfg, prefill=p) for h, i, p in zip(hs, inps, prefill, strict=True))
    sampled = state.sampled
    for out, p, i in zip(outs, prefill, inps, strict=True):
        sampled = keep_sampled(sampled, out, "prefill" if p else "decode", i.tokens.shape[1])
    return State(kv, sampled), outs


# The same step as a chain of executables (`layer_loop="layered"`): front per segment, then `layers`
# once per group of layers with those layers' weights (separate buffers: nothing is copied), then a
# head per segment.


def front(w: Weights, tokens: jax.Array, positions: jax.Array, sampled, carry_from, *, cfg: ModelConfig):
    """-> (h [B, T, D], (global rope, local rope))."""
    return transformer.embed(w, cfg, fed_tokens(tokens, sampled, carry_from)), transformer.ropes_for(cfg, positions)


def layers(lws, hs, kv: KVCache, index, sliding, window, page_tables, positions, bases, ropes, *, cfg):
    """A group of decoder layers over the step's segments; `index`, `sliding` and `window` are [G]
    arrays. -> (per-segment h, kv)."""
    h = flatten(hs)
    for g, lw in enumerate(lws):
        segs = transformer.segments(page_tables, positions, ropes, sliding[g], bases)
        h, kv = transformer.block(cfg, lw, h, segs, kv, index[g], window[g])
    return unflatten(h, segs), kv


def head(w: Weights, h: jax.Array, inp: StepInputs, sampled, *, cfg: ModelConfig):
    """A decode segment's head -> (StepOutputs, `sampled` with its tokens); a prefill chunk's is
    `tail` then `pick` (below)."""
    out = back(w, transformer.final_norm(w, cfg, h), inp, cfg=cfg, prefill=False)
    return out, keep_sampled(sampled, out, "decode", h.shape[1])


# A prefill chunk's head as two executables, so that the costly one (sampling) is compiled once
# for every chunk length: `tail` per chunk length (final norm, the sampled rows' hidden states,
# prompt logprobs), then `pick` on those rows (logits, sampling), whose shapes do not depend on it.


def tail(w: Weights, h: jax.Array, inp: StepInputs, *, cfg: ModelConfig):
    """-> (last rows [R, D], their next positions [R], PromptLogprobs)."""
    h = transformer.final_norm(w, cfg, h)
    return *last_rows(h, inp), prompt_logprobs(w, h, inp, cfg=cfg)


def pick(w: Weights, last: jax.Array, sample_pos: jax.Array, inp: StepInputs, sampled, *, cfg: ModelConfig):
    """A prefill chunk's rows -> (SampleOut, `sampled` with them); `inp` holds the per-row fields only."""
    out = sample_rows(w, last, sample_pos, inp, cfg=cfg)
    return out, keep_sampled(sampled, StepOutputs(out, None), "prefill", 1)


def rows_only(inputs: StepInputs) -> StepInputs:
    """A segment's per-sampled-row inputs (what `pick` reads), without those shaped by its tokens."""
    return inputs._replace(**{f: None for f in ("tokens", "positions", "base", "page_table", "last_index",
                                                 "next_tokens", "want_prompt_logprobs", "carry_from")})  # fmt: skip


def init_kv(shape: tuple[int, ...], dtype) -> KVCache:
    """The empty page pool (compiled like every step, so a start from artifacts compiles nothing;
    `State.sampled` is put on the device from the host: jax 0.10.2's XLA:CPU leaves the kernel of
    a small broadcast out of a serialized executable)."""
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
