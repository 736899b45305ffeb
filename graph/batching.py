"""Host-side assembly of a step's inputs: a scheduler decision padded to its bucket as numpy
arrays. Padding tokens have position -1 and write only to scratch page 0; padding rows sample
nothing anyone reads. Each sampled row's token mask comes from its grammar (graph/structured.py)
when it has one and its token will be kept, else it is all ones.

The sampled rows' arrays (sampling parameters, token masks, penalty history, prompt lengths) are
the same from step to step while a segment's rows are the same sequences in the same state:
`RowReuse` then hands back the very arrays of the last step, which `StepProgram` does not send to
the device again (graph/programs.py). They are rebuilt, and sent, when a row joins or leaves, when
a row's suppressed end tokens change (min_tokens reached), and in every step for rows that need
them (penalties: the history grows; grammars: the mask follows the output).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from graph.buckets import Buckets, pick
from graph.executables import Key
from graph.sampling import host_arrays
from graph.scheduler import Decode, Mixed, Prefill, Sequence, uses_penalties
from graph.step import PACKED_ROWS, StepInputs

Suppressed = Callable[[Sequence], tuple[int, ...]]
# (grammar, output so far) of each sampled row, None if unconstrained -> uint32 [rows, ceil(V/32)]
Masks = Callable[[list[tuple[Any, list[int]] | None]], np.ndarray]


class RowReuse:
    """The sampled-row arrays last built for each segment shape, and what they were built from."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, int, int], tuple[tuple, tuple]] = {}

    def rows(self, phase: str, seqs: list[Sequence], R: int, H: int, rules: tuple[Suppressed, Masks], kept: list[bool]):
        """The sampled rows' arrays (of the rows whose token is kept: `kept`): penalty history,
        prompt lengths, sampling parameters and token masks; each one the last step's where
        nothing it holds can have changed."""
        suppressed, masks = rules
        key = (tuple(seqs), tuple(suppressed(s) for s in seqs), tuple(kept))
        last = self._last.get((phase, R, H))
        if last is not None and last[0] == key:
            history, prompt_len, sampling, mask = last[1]
        else:
            history = mask = None
            prompt_len = np.zeros(R, np.int32)
            prompt_len[: len(seqs)] = [len(s.prompt) for s in seqs]
            sampling = host_arrays([(s.params, s.seed, suppressed(s)) for s in seqs] + [None] * (R - len(seqs)), R)
        if history is None or any(uses_penalties(s) for s in seqs):  # it grows with every token
            history = np.full((R, H), -1, np.int32)
            for r, seq in enumerate(seqs):
                if uses_penalties(seq):
                    tokens = seq.tokens
                    history[r, : len(tokens)] = tokens
        if mask is None or any(s.grammar is not None for s in seqs):  # it follows the output
            rows = zip(seqs, kept, strict=True)
            grammars = [(s.grammar, s.output) if s.grammar is not None and k else None for s, k in rows]
            mask = masks(grammars + [None] * (R - len(seqs)))
        arrays = (history, prompt_len, sampling, mask)
        self._last[(phase, R, H)] = (key, arrays)
        return arrays


def padding_step(key: Key, page_size: int, max_seq_len: int, masks: Masks) -> tuple[StepInputs, ...]:
    """The inputs of step `key` with no sequence in it: every token padding (position -1, writes
    to scratch page 0), no row read; what the engine runs once per shape at start-up."""
    phase, B, T, W = key
    rules, reuse = ((lambda seq: ()), masks), RowReuse()
    if phase == "decode":
        return (_decode(Decode([]), B, T, W, max_seq_len, rules, reuse),)
    prefill = _prefill(Prefill(()), T, W, page_size, max_seq_len, rules, reuse)
    return (prefill,) if phase == "prefill" else (_decode(Decode([]), B, 1, W, max_seq_len, rules, reuse), prefill)


def row_pages(step: Prefill, page_size: int) -> int:
    """Page-table entries of a chunk's row: each prompt's pages up to the end of its chunk."""
    return sum(-(-(c.start + c.length) // page_size) for c in step.chunks)


def _prefill(
    step: Prefill, T: int, W: int, S: int, max_seq_len: int, rules: tuple[Suppressed, Masks], reuse: RowReuse
) -> StepInputs:
    """The chunks one after another in one row; each prompt's pages start at a page boundary of
    the row (`base`, in tokens), and its chunk's last token gives its sampled row."""
    tokens = np.zeros((1, T), np.int32)
    positions = np.full((1, T), -1, np.int32)
    base = np.zeros((1, T), np.int32)
    page_table = np.zeros((1, W), np.int32)
    next_tokens = np.full((1, T), -1, np.int32)
    last_index = np.zeros(PACKED_ROWS, np.int32)
    at = page = 0  # the row's next token and next page
    want = False
    for r, c in enumerate(step.chunks):
        seq, start, n = c.seq, c.start, c.length
        pages = seq.pages[: -(-(start + n) // S)]
        page_table[0, page : page + len(pages)] = pages
        tokens[0, at : at + n] = seq.tokens[start : start + n]
        positions[0, at : at + n] = np.arange(start, start + n)
        base[0, at : at + n] = page * S
        last_index[r] = at + n - 1
        following = seq.prompt[start + 1 : start + n + 1]
        next_tokens[0, at : at + len(following)] = following
        want |= seq.params.prompt_logprobs is not None and len(following) > 0
        at, page = at + n, page + len(pages)
    seqs, final = [c.seq for c in step.chunks], [c.final for c in step.chunks]
    history, prompt_len, sampling, mask = reuse.rows("prefill", seqs, PACKED_ROWS, max_seq_len, rules, final)
    return StepInputs(
        tokens, positions, base, page_table, last_index, sampling, mask, history, prompt_len, next_tokens,
        np.bool_(want), None,
    )  # fmt: skip


def _decode(
    step: Decode, B: int, T: int, W: int, max_seq_len: int, rules: tuple[Suppressed, Masks], reuse: RowReuse
) -> StepInputs:
    """Row b: its sequence's pending token, then (a speculative step, T > 1) its drafts; every
    token's logits give a sampled row, b * T + t."""
    seqs, drafts = step.seqs, step.row_drafts
    tokens = np.zeros((B, T), np.int32)
    positions = np.full((B, T), -1, np.int32)
    page_table = np.zeros((B, W), np.int32)
    carry_from = np.full(B, -1, np.int32)
    for b, (seq, draft) in enumerate(zip(seqs, drafts, strict=True)):
        if seq.unresolved:  # sampled by the step in flight: the device has it
            carry_from[b] = seq.carried
        else:
            tokens[b, 0] = seq.output[-1] if seq.output else seq.prompt[-1]  # the one pending token (the last)
        tokens[b, 1 : 1 + len(draft)] = draft
        positions[b, : 1 + len(draft)] = np.arange(seq.computed, seq.computed + 1 + len(draft))
        pages = seq.pages[:W]
        page_table[b, : len(pages)] = pages
    rows = [seq for seq in seqs for _ in range(T)]
    kept = [t <= len(draft) for draft in drafts for t in range(T)]
    history, prompt_len, sampling, mask = reuse.rows("decode", rows, B * T, max_seq_len, rules, kept)
    return StepInputs(
        tokens, positions, None, page_table, np.arange(B * T, dtype=np.int32), sampling, mask, history, prompt_len,
        np.full((B, T), -1, np.int32), np.bool_(False), carry_from,
    )  # fmt: skip


def build_step(
    step: Prefill | Decode | Mixed,
    buckets: Buckets,
    max_seq_len: int,
    suppressed: Suppressed,
    masks: Masks,
    reuse: RowReuse | None = None,
) -> tuple[Key, tuple[StepInputs, ...]]:
    """A decision -> its bucket and the inputs of each of its segments (graph/programs.py); with
    `reuse` (kept from step to step), unchanged sampled-row arrays are the last step's."""
    S, rules, reuse = buckets.page_size, (suppressed, masks), reuse or RowReuse()
    if isinstance(step, Prefill):
        T = pick(buckets.prefill_tokens, step.tokens)
        W = pick(buckets.context_pages, row_pages(step, S))
        return ("prefill", 1, T, W), (_prefill(step, T, W, S, max_seq_len, rules, reuse),)
    decode = step.decode if isinstance(step, Mixed) else step
    B = pick(buckets.decode_batch, len(decode.seqs))
    context = max(s.computed + 1 + len(d) for s, d in zip(decode.seqs, decode.row_drafts, strict=True))
    if isinstance(step, Decode):
        W = buckets.context_for(context)
        T = buckets.verify_tokens if step.drafts else 1
        return ("decode", B, T, W), (_decode(step, B, T, W, max_seq_len, rules, reuse),)
    T, chunk = buckets.mixed_tokens, step.prefill
    W = pick(buckets.context_pages, max(-(-context // S), row_pages(chunk, S)))
    inputs = (
        _decode(decode, B, 1, W, max_seq_len, rules, reuse),
        _prefill(chunk, T, W, S, max_seq_len, rules, reuse),
    )
    return ("mixed", B, T, W), inputs
