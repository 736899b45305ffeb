"""Load shedding: how long a new request would wait for its first step, estimated from measured
step times and the work queued ahead of it. The engine refuses a request whose estimate exceeds
`EngineConfig.max_queue_wait` (QueueFullError: HTTP 429 with Retry-After), so that under overload
clients hear at once that they should back off instead of waiting minutes in the queue.

The model is simple on purpose. A request starts when both of these allow it:
- Prefill: the prompt tokens still to prefill ahead of it (the rest of running prompts, all of the
  queued ones) go through the steps one chunk at a time: ceil(tokens / chunk) steps. The chunk is
  `mixed_tokens` in steps that also decode, `max_prefill_tokens` otherwise; without mixed steps a
  decode step follows each chunk while anything decodes.
- A batch slot: with `free` slots and `ahead` requests queued before it, k = ahead + 1 - free
  running requests must finish first. The batch finishes `max_batch` requests per (mean output
  length x decode step time), so that takes k / max_batch of it.
The estimate is the larger of the two (they overlap in time). Step times (per step kind) and the
mean output length are exponential moving averages of what the engine measured, so until it has
measured a kind of step, that kind counts as free. Left out: free KV pages (preemption makes waits
longer) and prefix-cache hits (they make them shorter).
"""

from __future__ import annotations

import dataclasses

SMOOTHING = 0.2  # weight of the newest measurement: the averages follow a change of load in ~10 steps


@dataclasses.dataclass(frozen=True)
class Queue:
    """The work ahead of a new request."""

    prefill_tokens: int = 0  # prompt tokens still to prefill
    running: int = 0
    waiting: int = 0
    decoding: bool = False  # whether any running request decodes


class WaitEstimator:
    def __init__(self, max_batch: int, prefill_chunk: int, mixed_chunk: int) -> None:
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.mixed_chunk = mixed_chunk  # 0: no mixed steps
        self.step_seconds: dict[str, float] = {}  # by step kind: prefill | decode | mixed
        self.output_tokens = 0.0  # of requests that finished

    def step(self, kind: str, seconds: float) -> None:
        self.step_seconds[kind] = _average(self.step_seconds.get(kind), seconds)

    def finished(self, output_tokens: int) -> None:
        self.output_tokens = _average(self.output_tokens or None, output_tokens)

    def wait(self, queue: Queue) -> float:
        """Expected seconds until a request queued behind `queue` gets its first step."""
        t = self.step_seconds
        decode = t.get("decode", t.get("mixed", 0.0))
        if queue.decoding and self.mixed_chunk:
            chunk, per_chunk = self.mixed_chunk, t.get("mixed", t.get("prefill", 0.0))
        else:
            chunk, per_chunk = self.prefill_chunk, t.get("prefill", 0.0) + (decode if queue.decoding else 0.0)
        prefill = -(-queue.prefill_tokens // chunk) * per_chunk
        finishing = queue.waiting + 1 - (self.max_batch - queue.running)
        slot = max(0, finishing) / self.max_batch * self.output_tokens * decode
        return max(prefill, slot)


def _average(old: float | None, new: float) -> float:
    return new if old is None else old + SMOOTHING * (new - old)
