"""Prometheus metrics of one app, in its own registry (several apps in one process never mix).

Request counts and latencies are recorded as requests pass (an HTTP request that ends without its
answer counts once: shed with 429, aborted, or failed); the engine's queue, batch and KV page
figures are read from `Engine.stats()` at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

_ENGINE_GAUGES = {
    "waiting": ("xlaserve_queue_waiting_requests", "Requests waiting for admission"),
    "running": ("xlaserve_batch_running_requests", "Requests in the running batch"),
    "pages_used": ("xlaserve_kv_pages_used", "KV cache pages in use"),
    "pages_free": ("xlaserve_kv_pages_free", "KV cache pages free"),
    "pages_total": ("xlaserve_kv_pages_total", "KV cache pages in the pool"),
    "pages_cached": ("xlaserve_kv_pages_cached", "KV cache pages held only by the prefix cache (reusable, evictable)"),
    "prompt_tokens": ("xlaserve_prefix_cache_queried_tokens", "Prompt tokens of admitted requests"),
    "prefix_cached_tokens": ("xlaserve_prefix_cache_hit_tokens", "Prompt tokens taken from the prefix cache"),
}
_ENGINE_COUNTERS = {
    "steps": ("xlaserve_engine_steps", "Engine steps run"),
    "preemptions": (
        "xlaserve_num_preemptions",
        "Requests preempted: their KV pages went to older requests, and they resume by prefilling again",
    ),
    "steps_looked_ahead": (
        "xlaserve_engine_steps_looked_ahead",
        "Engine steps dispatched before the step in flight was read (pipelining)",
    ),
    "step_host_seconds": (
        "xlaserve_engine_step_host_seconds",
        "Step thread time spent building, dispatching and reading steps (the host's share of a step)",
    ),
    "step_wait_seconds": ("xlaserve_engine_step_wait_seconds", "Step thread time spent waiting for the device"),
    "spec_draft_tokens": ("xlaserve_spec_decode_draft_tokens", "Speculative decoding: draft tokens verified"),
    "spec_accepted_tokens": (
        "xlaserve_spec_decode_accepted_tokens",
        "Speculative decoding: draft tokens kept (each one a token without a step of its own)",
    ),
    "grammar_mask_seconds": ("xlaserve_grammar_mask_seconds", "Host time spent on structured-output token masks"),
}

# engine steps by kind: prefill, decode, speculative (a decode step with drafts), mixed
_BY_KIND = (
    ("steps_by_kind", "xlaserve_engine_steps_by_kind", "Engine steps by kind"),
    (
        "step_seconds_by_kind",
        "xlaserve_engine_step_seconds_by_kind",
        "Engine step time by kind, from dispatch to its tokens handed out",
    ),
)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, float] | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        if stats is None:  # still loading
            return
        for key, (name, doc) in _ENGINE_GAUGES.items():
            yield GaugeMetricFamily(name, doc, value=stats[key])
        for key, (name, doc) in _ENGINE_COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=stats[key])
        for key, name, doc in _BY_KIND:
            family = CounterMetricFamily(name, doc, labels=["kind"])
            for kind, value in sorted(stats[key].items()):
                family.add_metric([kind], value)
            yield family
        rate = stats["prefix_cached_tokens"] / stats["prompt_tokens"] if stats["prompt_tokens"] else 0.0
        yield GaugeMetricFamily(
            "xlaserve_prefix_cache_hit_rate", "Prompt tokens taken from the prefix cache / prompt tokens", value=rate
        )


class Metrics:
    """The metrics of one server; `stats` returns the engine's figures (None while loading)."""

    def __init__(self, stats: Callable[[], dict[str, float] | None]) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter(
            "xlaserve_requests", "HTTP requests by route and status", ["route", "status"], registry=reg
        )
        self.ttft = Histogram(
            "xlaserve_time_to_first_token_seconds",
            "Request arrival to first token",
            buckets=_TTFT_BUCKETS,
            registry=reg,
        )
        self.itl = Histogram(
            "xlaserve_inter_token_latency_seconds", "Time between output tokens", buckets=_LATENCY_BUCKETS, registry=reg
        )
        self.prompt_tokens = Counter("xlaserve_prompt_tokens", "Prompt tokens of finished requests", registry=reg)
        self.generation_tokens = Counter("xlaserve_generation_tokens", "Generated tokens", registry=reg)
        self.queue_wait = Histogram(
            "xlaserve_queue_wait_seconds",
            "Engine request submitted to its first step",
            buckets=_QUEUE_BUCKETS,
            registry=reg,
        )
        self.shed = Counter(
            "xlaserve_requests_shed", "Requests refused with 429: queue full, or expected wait too long", registry=reg
        )
        self.aborted = Counter(
            "xlaserve_requests_aborted",
            "Requests ended early: the client went away, or the server shut down",
            registry=reg,
        )
        self.failed = Counter("xlaserve_requests_failed", "Requests ended by a failed engine step", registry=reg)
        reg.register(_EngineCollector(stats))

    def render(self) -> tuple[bytes, str]:
        """-> (the exposition text, its content type)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
