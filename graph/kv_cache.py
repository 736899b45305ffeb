"""The host side of the paged KV cache: the page allocator (with the prefix cache) and the sizing
of the pool.

The pool itself is two device arrays `[layers, kv_heads, pages, page_size, head_dim]` (see
`models/layers.py`), made by a compiled `init_kv` executable and donated to every step.
Page 0 is scratch (padding tokens write there), so it is never handed out.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import os
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from graph.api import EngineConfig
from graph.buckets import Buckets
from graph.executables import ExecutableTable
from graph.layout import abstract_device_weights, kv_dtype, mesh_of, weight_bytes, weight_bytes_per_device
from models.config import ModelConfig
from models.params import DTYPES

if TYPE_CHECKING:
    from models.loader import LoadedModel

log = logging.getLogger("graph.kv_cache")


class PageAllocator:
    """Free pages, reference counts, and the prefix cache over them.

    A page is in exactly one of three states: free (on the free list), held (reference count >= 1:
    by running sequences, several when they share a cached prefix), or cached (count 0, but its
    contents are known by their hash and kept in LRU order). `allocate` takes free pages first and
    then evicts cached ones, oldest use first, so the cache costs no capacity: cached pages count
    as free for admission.

    A full page's hash is chained over every token up to its end (`extend_hashes`), so equal hashes
    mean equal prefixes and therefore equal K/V (the pool belongs to one model, dtype and
    quantization, which salt the chain as well).
    """

    def __init__(self, num_pages: int, *, caching: bool = False):
        if num_pages < 2:
            raise ValueError("the pool needs at least one page besides the scratch page")
        self.num_pages = num_pages
        self.caching = caching
        self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low pages first
        self._refs = [0] * num_pages
        self._hash_of: dict[int, bytes] = {}  # page -> hash, for held and cached pages
        self._page_of: dict[bytes, int] = {}  # hash -> page
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, oldest first

    @property
    def num_free(self) -> int:
        """Pages `allocate` can hand out (free or evictable)."""
        return len(self._free) + len(self._lru)

    @property
    def num_used(self) -> int:
        """Pages held by sequences."""
        return self.num_pages - 1 - self.num_free

    @property
    def num_cached(self) -> int:
        """Pages held by nobody whose contents the prefix cache keeps."""
        return len(self._lru)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise MemoryError(f"{n} pages requested, {self.num_free} free")
        pages = []
        for _ in range(n):
            if self._free:
                page = self._free.pop()
            else:  # evict the least recently used cached page
                page, _ = self._lru.popitem(last=False)
                del self._page_of[self._hash_of.pop(page)]
            self._refs[page] = 1
            pages.append(page)
        return pages

    def share(self, pages: list[int]) -> None:
        for p in pages:
            if self._refs[p] == 0:
                self._lru.pop(p)  # a cached page in use again (KeyError: it was free)
            self._refs[p] += 1

    def free(self, pages: list[int]) -> None:
        """Drop one reference to each page; a page left unreferenced goes back to the free list,
        or to the cache if its contents are known."""
        for p in pages:
            if self._refs[p] <= 0:
                raise RuntimeError(f"page {p} freed twice")
            self._refs[p] -= 1
            if self._refs[p] == 0:
                if p in self._hash_of:
                    self._lru[p] = None
                else:
                    self._free.append(p)

    # ---- the prefix cache ----

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The pages holding the longest cached prefix of `hashes`, each with a new reference."""
        pages = []
        for h in hashes if self.caching else ():
            page = self._page_of.get(h)
            if page is None:
                break
            pages.append(page)
        self.share(pages)
        return pages

    def register(self, page: int, h: bytes) -> None:
        """`page` (held) is full and its contents hash to `h`: later prefixes may reuse it. A page
        whose contents are cached already under another page stays private."""
        if self.caching and h not in self._page_of and page not in self._hash_of:
            self._page_of[h] = page
            self._hash_of[page] = h

    def refs(self, page: int) -> int:
        return self._refs[page]

    def reset_cache(self) -> int:
        """Forget every cached prefix (held pages stay held); -> how many pages were freed."""
        for page in list(self._hash_of):
            if self._refs[page] == 0:
                self._lru.pop(page)
                self._free.append(page)
        self._hash_of.clear()
        self._page_of.clear()
        return self.num_free

    def check(self, holders: list[list[int]]) -> None:
        """Assert the invariants, given the page lists of every live sequence: each page's count
        equals the number of holders, and every page is exactly one of free, held or cached."""
        counts = collections.Counter(p for pages in holders for p in pages)
        assert 0 not in counts, "the scratch page is held"
        assert all(self._refs[p] == counts.get(p, 0) for p in range(1, self.num_pages)), "reference counts"
        free, cached = set(self._free), set(self._lru)
        assert len(free) == len(self._free) and not free & cached and 0 not in free | cached
        held = {p for p in range(1, self.num_pages) if self._refs[p]}
        assert free | cached | held == set(range(1, self.num_pages)) and not (free | cached) & held
        assert cached <= set(self._hash_of) and not free & set(self._hash_of)
        assert all(self._page_of[h] == p for p, h in self._hash_of.items())


def extend_hashes(hashes: list[bytes], tokens: list[int], page_size: int, salt: bytes, n: int) -> None:
    """Extend `hashes` (chained page hashes of `tokens`) to its first `n` full pages: page i's
    hash covers tokens[: (i + 1) * page_size] and `salt`."""
    parent = hashes[-1] if hashes else salt
    for i in range(len(hashes), n):
        chunk = np.asarray(tokens[i * page_size : (i + 1) * page_size], np.int32).tobytes()
        parent = hashlib.blake2b(parent + chunk, digest_size=16).digest()
        hashes.append(parent)


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
    """The budget of the pool on each device: `--kv-memory-gb` if given, else `kv_memory_fraction`
    of the memory the device has left after its share of the weights (`weights_bytes`) and the
    executables' temporaries. On CPU (every device is the host's memory) that memory is
    the host's (MemAvailable, with the weights already loaded into it), shared with everything
    else, so the pool there takes no more than the decode batch can use: `max_batch` sequences of
    `max_seq_len` tokens."""
    if config.kv_memory_gb is not None:
        return MemoryPlan(int(config.kv_memory_gb * 2**30), 0, temp_owner, 1.0)
    devices = [d for d in mesh_of(config).devices.flat if d.process_index == jax.process_index()]
    stats = [d.memory_stats() if d.platform != "cpu" else None for d in devices]
    if all(s and "bytes_limit" in s for s in stats):  # the device with the least left decides
        available = min(s["bytes_limit"] - max(s.get("bytes_in_use", 0), weights_bytes) for s in stats)
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
    from its own memory analysis (the pool's size does not change them).

    That executable is compiled through the table (its store and jax's cache), for the pool the
    plan would give without temporaries when that pool is fixed: on CPU, where the pool is capped
    at what the decode batch can use, or with `--kv-memory-gb`, that is the pool it gets, and the
    table then finds the executable in the store instead of compiling it a second time. A start
    that has the store reads it from there instead of lowering it."""
    if config.kv_pages is not None:
        return plan_pages(MemoryPlan(config.kv_pages, 0, "", 1.0), 1, buckets.max_pages)
    per_page = kv_bytes_per_page(model.cfg, config.page_size, kv_dtype(config, model.dtype))
    full_batch = (config.max_batch * buckets.max_pages + 1) * per_page
    on_host = all(d.platform == "cpu" for d in mesh_of(config).devices.flat)
    if on_host:  # host memory: the loaded weights
        # (a converted model loads none: the compute form it restores)
        loaded = model.params if model.checkpoint is None else abstract_device_weights(model.cfg, model.dtype, config)
        weights = weight_bytes(loaded)
    else:  # one device's share of the weights, and of each page (its KV heads)
        weights = weight_bytes_per_device(model.cfg, model.dtype, config)
        per_page //= config.tensor_parallel
    try:
        guess = plan_pages(memory_plan(config, weights, 0, "", full_batch), per_page, buckets.max_pages)
    except ValueError:  # too small even so: the plan below says how
        guess = 0
    # a pool that does not follow the free memory (a fixed budget, or the CPU cap) is the same at
    # every start; any other is probed at a fixed size, so that the store keeps one probe, not one
    # a start
    fixed = guess > 0 and (config.kv_memory_gb is not None or (on_host and guess == full_batch // per_page))
    probe_pages = guess if fixed else buckets.max_pages + 1
    largest_prefill = max(buckets.prefill_keys(), key=lambda k: (k[2], k[3]))
    probe = ExecutableTable.compile(model.cfg, model.dtype, config, buckets, probe_pages, keys=[largest_prefill])
    temps = {n: m.get("temp_size_in_bytes", 0) for n, m in probe.memory.items() if n != "init_kv"}
    owner = max(temps, key=temps.get)
    temp = temps[owner]
    plan = memory_plan(config, weights, temp, owner, full_batch)
    pages = plan_pages(plan, per_page, buckets.max_pages)
    log.info(
        "KV pool: %d pages (%.0f MiB); %.0f MiB available, %.0f MiB of temporaries (%s)",
        pages, pages * per_page / 2**20, plan.available / 2**20, temp / 2**20, plan.temp_owner,
    )  # fmt: skip
    return pages


def kv_bytes_per_page(cfg: ModelConfig, page_size: int, dtype: str) -> int:
    """Bytes of one page in every layer's K and V, of values in `dtype` (packed or not: the same)."""
    return 2 * cfg.num_layers * page_size * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(DTYPES[dtype]).itemsize
