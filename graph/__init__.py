"""The compiled engine: buckets, the executable table, AOT artifacts, KV pages, on-device sampling
and the continuous-batching scheduler (see each module's docstring).

Importing `graph` adds the XLA flags the engine measured faster to `XLA_FLAGS` (flags the user
set already win), so they are in place before the backend starts; the artifact identity records
`XLA_FLAGS`, so an artifact compiled under other flags is refused.
- `--xla_cpu_enable_concurrency_optimized_scheduler=false`: XLA:CPU's default scheduler hoists
  independent ops (the per-layer KV gathers, the int8 activation quantization) and grows each
  call's temporaries; without it a SmolLM2 int8 decode step took 31 ms instead of 37 at batch 1
  (`scripts/bench_step.py`). It has no effect on other backends.
"""

from __future__ import annotations

import os

ENGINE_XLA_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


def _add_engine_xla_flags() -> None:
    flags = os.environ.get("XLA_FLAGS", "").split()
    names = {f.split("=")[0] for f in flags}
    flags += [f for f in ENGINE_XLA_FLAGS if f.split("=")[0] not in names]
    os.environ["XLA_FLAGS"] = " ".join(flags)


_add_engine_xla_flags()
