"""Speculative decoding by prompt lookup (n-gram drafts, as vLLM's `ngram` method).

A decoding sequence's draft is what followed the latest earlier occurrence of its last n tokens
(n from `prompt_lookup_max` down to `prompt_lookup_min`) in its prompt and output. A speculative
decode step feeds each row its pending token and its K drafts `[t, d1 .. dK]` and samples the
token after every one of them (graph/step.py: a decode segment of 1 + K tokens per row). The host
keeps the samples `s0 .. sK` while each draft matches the sample before it: `s0` always, `s(i)`
while `s(i-1) == d(i)`. Every kept sample is the token the sequence would have drawn without
speculation: its logits saw the same tokens before it, and a sampled row's draw is keyed by its
seed and its position (graph/sampling.py), not by the step. So outputs are the same with and
without speculation, greedy or seeded; only the number of steps changes. (That holds as far as the
step's shapes leave the logits bit for bit: in float32 they do; with `--quantize int8` the outputs
already depend on the batch's shape, a rounding of the activations' scales away, and a speculative
step is one more shape.) The K/V written for rejected drafts sits past the sequence's length,
where nothing reads it before it is overwritten.

A sequence whose drafts all failed m steps in a row drafts again only after 2**m - 1 steps (at
most 15): on text that does not repeat itself, few steps pay for drafts that will not stand.

Not speculated: sequences whose next token's inputs depend on the token before it on the host (a
grammar's mask, penalties over the history), and batches larger than `speculative_max_batch` (a
row costs 1 + K tokens of compute: on a compute-bound batch, verification costs more than the
steps it saves). Before `min_tokens`, a draft stops where
end tokens stop being suppressed, so that every sample of a step has the same rule.
"""

from __future__ import annotations

from collections.abc import Sequence as Tokens

import numpy as np


def propose(tokens: Tokens[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Up to `k` draft tokens for the sequence `tokens`: find the latest earlier occurrence of
    its last n tokens (longest n first) and copy what followed it; where that runs into the end,
    the copy goes on through the draft itself (so a loop of period p continues past p tokens).
    [] where no n-gram of the last n_min.. tokens occurred before."""
    arr = np.asarray(tokens, dtype=np.int64)
    L = len(arr)
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)  # start j in [0, L - n - 1]
        hits = np.flatnonzero((windows == arr[L - n :]).all(axis=1))
        if hits.size:
            src = int(hits[-1]) + n  # the token after the occurrence
            out: list[int] = []
            for i in range(k):
                at = src + i
                out.append(int(arr[at]) if at < L else out[at - L])
            return out
    return []


def accepted(samples: Tokens[int], draft: Tokens[int]) -> int:
    """How many leading drafts the samples confirm: d(i) stands while s(i-1) == d(i)."""
    n = 0
    for s, d in zip(samples, draft, strict=False):
        if int(s) != d:
            break
        n += 1
    return n
