"""Host-side assembly of a step's inputs: a scheduler decision padded to its bucket as numpy
arrays (one transfer per step). Padding rows have position -1 and write only to scratch page 0.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from graph.buckets import Buckets, pick
from graph.executables import Key
from graph.sampling import host_arrays
from graph.scheduler import Decode, Mixed, Prefill, Sequence
from graph.step import StepInputs

Suppressed = Callable[[Sequence], tuple[int, ...]]


def _uses_penalties(seq: Sequence) -> bool:
    p = seq.params
    return p.presence_penalty != 0 or p.frequency_penalty != 0 or p.repetition_penalty != 1


def _common(seqs: list[Sequence], B: int, W: int, H: int, suppressed: Suppressed):
    page_table = np.zeros((B, W), np.int32)
    history = np.full((B, H), -1, np.int32)
    prompt_len = np.zeros(B, np.int32)
    for b, seq in enumerate(seqs):
        pages = seq.pages[:W]
        page_table[b, : len(pages)] = pages
        prompt_len[b] = len(seq.prompt)
        if _uses_penalties(seq):
            tokens = seq.tokens
            history[b, : len(tokens)] = tokens
    rows = [(s.params, s.seed, suppressed(s)) for s in seqs] + [None] * (B - len(seqs))
    return page_table, history, prompt_len, host_arrays(rows, B)


def _prefill(step: Prefill, T: int, W: int, max_seq_len: int, suppressed: Suppressed) -> StepInputs:
    seq, start, n = step.seq, step.start, step.length
    tokens = np.zeros((1, T), np.int32)
    positions = np.full((1, T), -1, np.int32)
    tokens[0, :n] = seq.tokens[start : start + n]
    positions[0, :n] = np.arange(start, start + n)
    page_table, history, prompt_len, sampling = _common([seq], 1, W, max_seq_len, suppressed)
    next_tokens = np.full((1, T), -1, np.int32)
    following = seq.prompt[start + 1 : start + n + 1]
    next_tokens[0, : len(following)] = following
    want = seq.params.prompt_logprobs is not None and len(following) > 0 and seq.preemptions == 0
    return StepInputs(
        tokens, positions, page_table, np.array([n - 1], np.int32), sampling, history, prompt_len,
        next_tokens, np.bool_(want),
    )  # fmt: skip


def _decode(seqs: list[Sequence], B: int, W: int, max_seq_len: int, suppressed: Suppressed) -> StepInputs:
    tokens = np.zeros((B, 1), np.int32)
    positions = np.full((B, 1), -1, np.int32)
    for b, seq in enumerate(seqs):
        tokens[b, 0] = seq.output[-1] if seq.output else seq.prompt[-1]  # the one pending token (the last)
        positions[b, 0] = seq.computed
    page_table, history, prompt_len, sampling = _common(seqs, B, W, max_seq_len, suppressed)
    return StepInputs(
        tokens, positions, page_table, np.zeros(B, np.int32), sampling, history, prompt_len,
        np.full((B, 1), -1, np.int32), np.bool_(False),
    )  # fmt: skip


def build_step(
    step: Prefill | Decode | Mixed, buckets: Buckets, max_seq_len: int, suppressed: Suppressed
) -> tuple[Key, tuple[StepInputs, ...]]:
    """A decision -> its bucket and the inputs of each of its segments (graph/programs.py)."""
    if isinstance(step, Prefill):
        T = pick(buckets.prefill_tokens, step.length)
        W = buckets.context_for(step.start + step.length)
        return ("prefill", 1, T, W), (_prefill(step, T, W, max_seq_len, suppressed),)
    decode = step.decode if isinstance(step, Mixed) else step
    B = pick(buckets.decode_batch, len(decode.seqs))
    context = max(s.computed + 1 for s in decode.seqs)
    if isinstance(step, Decode):
        W = buckets.context_for(context)
        return ("decode", B, 1, W), (_decode(decode.seqs, B, W, max_seq_len, suppressed),)
    T, chunk = buckets.mixed_tokens, step.prefill
    W = buckets.context_for(max(context, chunk.start + chunk.length))
    inputs = (_decode(decode.seqs, B, W, max_seq_len, suppressed), _prefill(chunk, T, W, max_seq_len, suppressed))
    return ("mixed", B, T, W), inputs
