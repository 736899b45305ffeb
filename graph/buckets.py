"""Bucket sets and the one function that picks a bucket.

Every executable is compiled for one bucket: prefill chunks are `[1, tokens]` with a context of
`pages` KV pages; decode steps are `[batch, 1]` with a context of `pages`; mixed steps are a decode
batch `[batch, 1]` plus one prompt chunk `[1, mixed_tokens]`, for every batch and context bucket
(one chunk size: the largest prefill bucket that fits in `max_num_batched_tokens` beside a full
batch; by default the largest up to `DEFAULT_MIXED_CHUNK` tokens, times 1 + K with K speculative
tokens; none with `max_batch` 1). With speculative decoding
(`num_speculative_tokens` K), speculative decode steps are `[batch, 1 + K]` for the decode batch
buckets up to `speculative_max_batch`. Sizes are powers of two
between a minimum and a maximum (the maximum itself is always included, even if not a power of two);
prefill chunks also come in every multiple of `prefill_bucket_step` up to `LINEAR_STEPS` of them.
"""

from __future__ import annotations

import dataclasses
import math

from graph.api import EngineConfig
from graph.layout import int8_activations

# The default prompt chunk of a mixed step. Its cost lands on every running stream's inter-token
# gap: on the 2-core CPU, SmolLM2 int8 at concurrency 8 (docs/performance-history.md), chunks of
# 32 against 64 cut ITL p99 from 183 to 126 ms with 8% more tokens/s; 16 cut no further and lost
# 20% of the tokens/s. Chunks of 16 beside a batch of 16 only (a 40-token budget) lost too: in the
# server such a mixed step took 89-90 ms against 88-106 for a chunk of 32, there were 1.85x as many,
# and tokens/s fell by a fifth with ITL p99 no lower (two loads of 8 streams, 128 and 80 tokens out).
# With speculative decoding (K drafts) the default is (1 + K) times this: a speculative row feeds
# 1 + K tokens, so the chunk keeps its share of the steps around it, and the prompts of a closed
# loop no longer trickle in 32 tokens a step behind decode steps that each yield several tokens a
# row (SmolLM2 int8, K = 4, concurrency 16: chunks of 128 gave 25% more tokens/s than 32).
DEFAULT_MIXED_CHUNK = 32


# Prefill buckets step linearly up to this many `prefill_bucket_step`s (16: up to 128 tokens), then
# double. A step has a fixed cost, its weights' reading (SmolLM2 float32 on 2 cores: ~40 ms, what ~25
# prompt tokens cost): below 128 tokens, padding to the next power of two wastes up to 63 tokens, more
# than a second step costs, so 68 tokens went as 64 + 16 (211 ms) where one step of 80 takes 154 ms.
# Past 128 the scheduler cuts a chunk at a bucket instead of padding it far (`Scheduler._fit`), and
# the rest lands in the fine buckets. 8 steps add 4 buckets to the default set (12 executables).
LINEAR_STEPS = 8


def w8a8(c: EngineConfig) -> bool:
    """Whether the weights multiply as int8 x int8 (`--quantize int8` on CPU: graph/layout.py)."""
    return c.quantize == "int8" and int8_activations()


def powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
    """Powers of two in [lo, hi], plus hi itself: powers_of_two(3, 20) == (4, 8, 16, 20)."""
    if hi < 1 or lo > hi:
        raise ValueError(f"empty bucket range [{lo}, {hi}]")
    out = [1 << i for i in range(max(0, math.ceil(math.log2(max(lo, 1)))), hi.bit_length()) if (1 << i) <= hi]
    if not out or out[-1] != hi:
        out.append(hi)
    return tuple(out)


def prefill_sizes(lo: int, hi: int, step: int) -> tuple[int, ...]:
    """Chunk buckets in [lo, hi]: powers of two (and hi), and the multiples of `step` up to
    LINEAR_STEPS of them: prefill_sizes(16, 512, 16) == (16, 32, 48, ..., 128, 256, 512)."""
    linear = range(step, min(hi, LINEAR_STEPS * step) + 1, step) if step else ()
    return tuple(sorted({*powers_of_two(lo, hi), *(t for t in linear if t >= lo)}))


def pick(buckets: tuple[int, ...], n: int) -> int:
    """The smallest bucket >= n; a ValueError if n exceeds the largest (a caller bug)."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


@dataclasses.dataclass(frozen=True)
class Buckets:
    prefill_tokens: tuple[int, ...]  # chunk lengths
    decode_batch: tuple[int, ...]  # decode batch sizes
    context_pages: tuple[int, ...]  # KV pages a step may attend to (page-table width)
    page_size: int
    mixed_tokens: int = 0  # prompt chunk of a mixed step (0: no mixed steps)
    verify_tokens: int = 0  # tokens per row of a speculative decode step: 1 + K drafts (0: none)
    verify_batch: tuple[int, ...] = ()  # the decode batch buckets that have speculative steps

    @classmethod
    def from_config(cls, c: EngineConfig) -> Buckets:
        if c.max_seq_len % c.page_size:
            raise ValueError(f"max_seq_len {c.max_seq_len} must be a multiple of page_size {c.page_size}")
        max_pages = c.max_seq_len // c.page_size
        max_chunk = min(c.max_prefill_tokens, c.max_seq_len)
        if c.min_context_tokens is None:  # one bucket: the whole context
            min_pages = max_pages
        else:
            min_pages = min(max(1, c.min_context_tokens // c.page_size), max_pages)
        prefill_tokens = prefill_sizes(min(c.min_prefill_tokens, max_chunk), max_chunk, c.prefill_bucket_step)
        if c.max_batch == 1:  # one sequence is either prefilling or decoding: never both
            mixed = 0
        elif c.max_num_batched_tokens is None:  # default: the largest bucket up to the default chunk, else the smallest
            default = DEFAULT_MIXED_CHUNK * (1 + c.num_speculative_tokens)
            mixed = max([t for t in prefill_tokens if t <= default] or prefill_tokens[:1])
        elif c.max_num_batched_tokens == 0:
            mixed = 0
        else:
            fits = [t for t in prefill_tokens if t <= c.max_num_batched_tokens - c.max_batch]
            if not fits:
                raise ValueError(
                    f"max_num_batched_tokens {c.max_num_batched_tokens} leaves no room for a prompt chunk beside "
                    f"a batch of {c.max_batch}: use at least {c.max_batch + prefill_tokens[0]}, or 0 for no "
                    "mixed steps"
                )
            mixed = max(fits)
        # data parallel: the smallest decode batch gives every data shard a row (D = 2: 2, 4, 8, ...).
        # int8 x int8 (int8 on CPU): a one-row step's float code rounds a few values differently
        # (XLA:CPU emits other loops for one row), int8 rounding turns that into other text, and a
        # second row costs ~1% (`models/quant.py` pads one row to two anyway): batches start at 2.
        smallest = max(c.data_parallel, 2 if w8a8(c) else 1)
        batches = powers_of_two(min(smallest, c.max_batch), c.max_batch)
        return cls(
            prefill_tokens=prefill_tokens,
            decode_batch=batches,
            context_pages=powers_of_two(min_pages, max_pages),
            page_size=c.page_size,
            mixed_tokens=mixed,
            verify_tokens=1 + c.num_speculative_tokens if c.num_speculative_tokens else 0,
            verify_batch=tuple(b for b in batches if b <= pick(batches, min(c.speculative_max_batch, c.max_batch)))
            if c.num_speculative_tokens
            else (),
        )

    @property
    def max_pages(self) -> int:
        return self.context_pages[-1]

    def context_for(self, tokens: int) -> int:
        """Context bucket (in pages) holding `tokens` tokens."""
        return pick(self.context_pages, -(-tokens // self.page_size))

    def prefill_keys(self) -> list[tuple[str, int, int, int]]:
        """(phase, batch, tokens, pages) of every prefill executable: a chunk padded to T tokens
        has more real tokens than the next smaller bucket, and its context must hold those."""
        return [
            ("prefill", 1, t, p)
            for i, t in enumerate(self.prefill_tokens)
            for p in self.context_pages
            if p * self.page_size > (self.prefill_tokens[i - 1] if i else 0)
        ]

    def decode_keys(self) -> list[tuple[str, int, int, int]]:
        return [("decode", b, 1, p) for b in self.decode_batch for p in self.context_pages]

    def verify_keys(self) -> list[tuple[str, int, int, int]]:
        """Speculative decode steps: each row its pending token and up to K drafts."""
        return [("decode", b, self.verify_tokens, p) for b in self.verify_batch for p in self.context_pages]

    def mixed_keys(self) -> list[tuple[str, int, int, int]]:
        if not self.mixed_tokens:
            return []
        return [("mixed", b, self.mixed_tokens, p) for b in self.decode_batch for p in self.context_pages]

    def all_keys(self) -> list[tuple[str, int, int, int]]:
        return self.prefill_keys() + self.decode_keys() + self.mixed_keys() + self.verify_keys()
