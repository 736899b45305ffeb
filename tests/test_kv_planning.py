"""Sizing the KV pool: from the memory the device (on CPU: the host) has left after the weights
and the largest executable's temporaries, never a fixed constant a model can exceed; and a budget
too small for one sequence says what took the memory and the smallest `--kv-memory-gb` that works."""

from __future__ import annotations

import pytest

from graph import kv_cache
from graph.api import EngineConfig
from graph.kv_cache import MemoryPlan, memory_plan, plan_pages

GiB = 2**30
PER_PAGE = 589_824  # Gemma 3 270M float32: 2 * 18 layers * 16 tokens * 1 kv head * 256 * 4 bytes
MAX_PAGES = 128  # max_seq_len 2048


def test_cpu_plan_leaves_room_for_temporaries_over_1_gib(monkeypatch):
    """The regression behind `--model gemma3-270m` not starting: 1026 MiB of temporaries used to
    exceed a fixed 1 GiB CPU budget. Planned from the host's memory, the pool fits beside them."""
    monkeypatch.setattr(kv_cache, "host_available_bytes", lambda: 16 * GiB)
    full_batch = (16 * MAX_PAGES + 1) * PER_PAGE
    plan = memory_plan(EngineConfig(), 600 * 2**20, int(1.5 * GiB), "prefill_b1_t512_p128", full_batch)
    assert plan.temp == int(1.5 * GiB) and plan.available == 16 * GiB
    assert plan.budget == full_batch  # 0.8 * (16 - 1.5) GiB is more than 16 full sequences need
    assert plan_pages(plan, PER_PAGE, MAX_PAGES) == 16 * MAX_PAGES + 1


def test_cpu_plan_takes_a_fraction_of_what_is_left(monkeypatch):
    monkeypatch.setattr(kv_cache, "host_available_bytes", lambda: 3 * GiB)
    plan = memory_plan(EngineConfig(kv_memory_fraction=0.5), 0, int(1.5 * GiB), "p", 100 * GiB)
    assert plan.budget == int(0.5 * 1.5 * GiB)
    assert plan_pages(plan, PER_PAGE, MAX_PAGES) == int(0.75 * GiB) // PER_PAGE


def test_an_explicit_budget_is_the_pool_size():
    plan = memory_plan(EngineConfig(kv_memory_gb=0.25), 0, 5 * GiB, "p", 100 * GiB)
    assert plan.budget == GiB // 4


def test_too_small_a_budget_names_the_temporaries_and_the_smallest_setting(monkeypatch):
    monkeypatch.setattr(kv_cache, "host_available_bytes", lambda: int(1.55 * GiB))
    plan = memory_plan(EngineConfig(), 0, int(1.5 * GiB), "prefill_b1_t512_p128", 100 * GiB)
    with pytest.raises(ValueError) as error:
        plan_pages(plan, PER_PAGE, MAX_PAGES)
    message = str(error.value)
    assert "prefill_b1_t512_p128" in message and "1536 MiB of temporaries" in message
    smallest = float(message.split("--kv-memory-gb ")[1].split()[0])
    assert smallest == pytest.approx((MAX_PAGES + 1) * PER_PAGE / GiB, abs=0.01)
    # and that setting is indeed enough
    explicit = memory_plan(EngineConfig(kv_memory_gb=smallest + 0.005), 0, int(1.5 * GiB), "p", 0)
    assert plan_pages(explicit, PER_PAGE, MAX_PAGES) >= MAX_PAGES + 1


def test_fixed_page_count_wins():
    assert plan_pages(MemoryPlan(300, 0, "", 1.0), 1, MAX_PAGES) == 300
