"""The host side of the paged KV cache: the page allocator and the sizing of the pool.

The pool itself is two device arrays `[layers, pages, page_size, kv_heads, head_dim]` (see
`models/layers.py`), made by a compiled `init_kv` executable and donated to every step.
Page 0 is scratch (padding tokens write there), so it is never handed out.
"""

from __future__ import annotations

import logging

import jax

log = logging.getLogger("graph.kv_cache")

CPU_DEFAULT_KV_GB = 1.0


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


def kv_budget_bytes(memory_gb: float | None, fraction: float, params_bytes: int, executable_temp: int) -> int:
    """Bytes for the KV pool: an explicit budget, or on an accelerator `fraction` of what the
    device has left after the weights and the largest executable's temporaries; on CPU a fixed
    default (host memory is shared with everything else)."""
    if memory_gb is not None:
        return int(memory_gb * 2**30) - executable_temp
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if not stats or "bytes_limit" not in stats:
        return int(CPU_DEFAULT_KV_GB * 2**30) - executable_temp
    available = stats["bytes_limit"] - max(stats.get("bytes_in_use", 0), params_bytes)
    return int(fraction * available) - executable_temp


def plan_pages(budget_bytes: int, bytes_per_page: int, max_pages_per_seq: int) -> int:
    """Pages in the pool (incl. scratch); at least one full-length sequence must fit."""
    pages = budget_bytes // bytes_per_page
    if pages < max_pages_per_seq + 1:
        raise ValueError(
            f"KV memory budget of {budget_bytes / 2**20:.0f} MiB holds {pages} pages of "
            f"{bytes_per_page / 2**20:.2f} MiB, fewer than one sequence of max_seq_len needs "
            f"({max_pages_per_seq + 1}); raise --kv-memory-gb or lower --max-seq-len"
        )
    return int(pages)
