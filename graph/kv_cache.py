"""The host side of the paged KV cache: the page allocator and the sizing of the pool.

The pool itself is two device arrays `[layers, pages, page_size, kv_heads, head_dim]` (see
`models/layers.py`), made by a compiled `init_kv` executable and donated to every step.
Page 0 is scratch (padding tokens write there), so it is never handed out.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from graph.api import EngineConfig
from graph.buckets import Buckets
from graph.executables import lower
from models.config import ModelConfig
from models.params import DTYPES

if TYPE_CHECKING:
    from models.loader import LoadedModel

log = logging.getLogger("graph.kv_cache")


class PageAllocator:
    """Free list plus reference counts (ready for pages shared between sequences)."""

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError("the pool needs at least one page besides the scratch page")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low pages first
        self._refs = [0] * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - 1 - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"{n} pages requested, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._refs[p] = 1
        return pages

    def share(self, pages: list[int]) -> None:
        for p in pages:
            self._refs[p] += 1

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if self._refs[p] <= 0:
                raise RuntimeError(f"page {p} freed twice")
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(p)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """What the KV pool may take. `available` is what the device (or, on CPU, the host) has free
    after the weights; `temp` the largest executable's temporaries (by its memory analysis)."""

    available: int
    temp: int
    temp_owner: str  # the executable whose temporaries `temp` are
    fraction: float  # of `available` minus `temp` the pool may take
    cap: int | None = None  # never more than this (CPU: what the decode batch can use)

    @property
    def budget(self) -> int:
        budget = int(self.fraction * (self.available - self.temp))
        return budget if self.cap is None else min(budget, self.cap)


def memory_plan(config: EngineConfig, weights_bytes: int, temp: int, temp_owner: str, full_batch_bytes: int):
    """The budget of the pool: `--kv-memory-gb` if given, else `kv_memory_fraction` of the memory
    the device has left after the weights and the executables' temporaries. On CPU that memory is
    the host's (MemAvailable, with the weights already loaded into it), shared with everything
    else, so the pool there takes no more than the decode batch can use: `max_batch` sequences of
    `max_seq_len` tokens."""
    if config.kv_memory_gb is not None:
        return MemoryPlan(int(config.kv_memory_gb * 2**30), 0, temp_owner, 1.0)
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        available = stats["bytes_limit"] - max(stats.get("bytes_in_use", 0), weights_bytes)
        return MemoryPlan(available, temp, temp_owner, config.kv_memory_fraction)
    return MemoryPlan(host_available_bytes(), temp, temp_owner, config.kv_memory_fraction, cap=full_batch_bytes)


def host_available_bytes() -> int:
    """The host's available memory (Linux MemAvailable; elsewhere the physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def plan_pages(plan: MemoryPlan, bytes_per_page: int, max_pages_per_seq: int) -> int:
    """Pages in the pool (incl. scratch); at least one full-length sequence must fit."""
    pages = max(plan.budget, 0) // bytes_per_page
    need = max_pages_per_seq + 1
    if pages < need:
        smallest = need * bytes_per_page / 2**30
        raise ValueError(
            f"the KV pool needs at least {need} pages of {bytes_per_page / 2**20:.2f} MiB (one sequence of "
            f"max_seq_len, plus scratch) but its budget holds {pages}: {plan.fraction:g} of "
            f"{plan.available / 2**20:.0f} MiB available after the weights, less {plan.temp / 2**20:.0f} MiB of "
            f"temporaries of the largest executable ({plan.temp_owner}). Pass --kv-memory-gb {smallest:.2f} "
            "or more, or lower --max-seq-len or --max-prefill-tokens"
        )
    return int(pages)


def plan_num_pages(model: LoadedModel, config: EngineConfig, buckets: Buckets) -> int:
    """Size the pool: the budget from `memory_plan`, with the temporaries of the largest executable
    from its own memory analysis (compiled once with a minimal pool, which does not change them)."""
    if config.kv_pages is not None:
        return plan_pages(MemoryPlan(config.kv_pages, 0, "", 1.0), 1, buckets.max_pages)
    largest_prefill = max(buckets.prefill_keys(), key=lambda k: (k[2], k[3]))
    probes = lower(model.cfg, model.dtype, config, buckets.max_pages + 1, largest_prefill)
    temps = {n: _temp_bytes(p.compile()) for n, p in probes.items()}
    owner = max(temps, key=temps.get)
    temp = temps[owner]
    per_page = kv_bytes_per_page(model.cfg, config.page_size, model.dtype)
    full_batch = (config.max_batch * buckets.max_pages + 1) * per_page
    weights = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(model.params))
    plan = memory_plan(config, weights, temp, owner, full_batch)
    pages = plan_pages(plan, per_page, buckets.max_pages)
    log.info(
        "KV pool: %d pages (%.0f MiB); %.0f MiB available, %.0f MiB of temporaries (%s)",
        pages, pages * per_page / 2**20, plan.available / 2**20, temp / 2**20, plan.temp_owner,
    )  # fmt: skip
    return pages


def _temp_bytes(compiled: Any) -> int:
    analysis = compiled.memory_analysis()
    return int(getattr(analysis, "temp_size_in_bytes", 0) or 0) if analysis is not None else 0


def kv_bytes_per_page(cfg: ModelConfig, page_size: int, dtype: str) -> int:
    return 2 * cfg.num_layers * page_size * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(DTYPES[dtype]).itemsize
