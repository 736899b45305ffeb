"""Failing safe, in the engine: a step that raises ends only its own requests and the engine serves
on with correct output and every page free; a pool that cannot be rebuilt leaves a broken engine
that says so (/health 503); overload is refused by expected wait (QueueFullError with a Retry-After
estimate); a request aborted while it waits never runs. On the tiny random model, alternating
prefill and decode steps, so that a prefill step leaves running requests out."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Iterator

import httpx
import pytest

from graph.api import EngineBrokenError, QueueFullError, RequestOutput, SamplingParams
from graph.engine import Engine
from graph.offline import LLM
from graph.shedding import Queue, WaitEstimator
from tests.server_fixtures import TINY, serve

CONFIG = dataclasses.replace(TINY, max_num_batched_tokens=0)
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
# Two short prompts that decode after one chunk, and a long one that needs two.
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [20, 21, 22, 23, 24, 25, 26, 27], list(range(100, 200))]


@pytest.fixture(scope="module")
def clean(tiny_model) -> list[list[int]]:
    """Each prompt's greedy tokens on an engine that never fails."""
    llm = LLM(tiny_model, CONFIG)
    try:
        return [c.token_ids for c in llm.generate(PROMPTS, GREEDY)]
    finally:
        llm.shutdown()


@contextlib.contextmanager
def engine_with(tiny_model, **changes) -> Iterator[Engine]:
    engine = Engine.create(tiny_model, dataclasses.replace(CONFIG, **changes))
    try:
        yield engine
    finally:
        engine.shutdown(timeout=0)


async def run(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[list[RequestOutput]]:
    """Every delta of each prompt's request, all submitted at once."""

    async def collect(stream) -> list[RequestOutput]:
        return [out async for out in stream]

    streams = [engine.submit(p, params) for p in prompts]
    return list(await asyncio.gather(*(collect(s) for s in streams)))


def record_steps(engine: Engine) -> list[tuple[set[str], dict[str, int]]]:
    """From now on, each step's requests and the output length of every running request then."""
    steps: list[tuple[set[str], dict[str, int]]] = []
    schedule = engine.scheduler.schedule

    def recording(**kwargs):
        decision = schedule(**kwargs)
        if decision is not None:
            running = {s.request_id: len(s.output) for s in engine.scheduler.running}
            steps.append(({s.request_id for s in decision.seqs}, running))
        return decision

    engine.scheduler.schedule = recording
    return steps


def assert_all_pages_free(engine: Engine) -> None:
    engine.allocator.check([])  # no sequence holds a page, and every page is free or cached
    assert engine.allocator.num_free == engine.allocator.num_pages - 1


def test_a_failed_step_ends_its_requests_and_the_others_finish_unchanged(tiny_model, clean):
    fail = 3  # after the first chunk and a decode step: a prefill step while the short ones decode
    with engine_with(tiny_model, debug_fail_step=fail) as engine:
        steps = record_steps(engine)
        outs = asyncio.run(run(engine, PROMPTS, GREEDY))
        in_step, running = steps[fail - 1]
        ids = [o[-1].request_id for o in outs]
        requeued = [i for i in running if i not in in_step]
        assert in_step and any(running[i] for i in requeued), "no running request with output was left out"
        for request_id, deltas, expected in zip(ids, outs, clean, strict=True):
            tokens = [t for d in deltas for t in d.token_ids]
            if request_id in in_step:
                assert deltas[-1].finish_reason == "error" and "debug_fail_step" in deltas[-1].error
                assert tokens == expected[: len(tokens)]
            else:  # started over on the new pool: nothing it streamed is repeated or changed
                assert deltas[-1].finish_reason == "length" and tokens == expected
            assert deltas[0].queue_wait is not None and all(d.queue_wait is None for d in deltas[1:])
        assert engine.scheduler.preemptions == len(requeued)
        assert_all_pages_free(engine)
        again = asyncio.run(run(engine, PROMPTS, GREEDY))
        assert [[t for d in deltas for t in d.token_ids] for deltas in again] == clean
        assert_all_pages_free(engine)


def test_an_engine_that_cannot_rebuild_its_pool_is_broken_and_says_so(tiny_model, monkeypatch):
    with engine_with(tiny_model, debug_fail_step=2) as engine, serve(engine) as url:
        assert httpx.get(url + "/health", timeout=60).status_code == 200

        def no_memory():
            raise MemoryError("out of device memory")

        monkeypatch.setattr(engine.table, "init_kv", no_memory)
        outs = asyncio.run(run(engine, PROMPTS[:2], GREEDY))
        assert [o[-1].finish_reason for o in outs] == ["error", "error"]
        assert "out of device memory" in engine.broken
        with pytest.raises(EngineBrokenError):
            asyncio.run(run(engine, PROMPTS[:1], GREEDY))
        for path in ("/health", "/v1/models"):
            response = httpx.get(url + path, timeout=60)
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "engine_unavailable", response.json()


def test_expected_wait_worked_out_by_hand():
    est = WaitEstimator(max_batch=4, prefill_chunk=64, mixed_chunk=32)
    assert est.wait(Queue(prefill_tokens=1000, running=4, waiting=10)) == 0  # nothing measured yet
    est.step("prefill", 0.5)
    est.step("decode", 0.1)
    est.step("mixed", 0.2)
    est.finished(40)
    assert est.wait(Queue(prefill_tokens=130, running=1)) == pytest.approx(3 * 0.5)  # 3 chunks of 64
    assert est.wait(Queue(prefill_tokens=130, running=1, decoding=True)) == pytest.approx(5 * 0.2)  # 5 of 32
    # a full batch and 2 waiting: 3 must finish, at 4 per 40 tokens x 0.1 s
    assert est.wait(Queue(running=4, waiting=2, decoding=True)) == pytest.approx(3 / 4 * 40 * 0.1)
    alternating = WaitEstimator(max_batch=4, prefill_chunk=64, mixed_chunk=0)
    alternating.step("prefill", 0.5)
    alternating.step("decode", 0.1)
    assert alternating.wait(Queue(prefill_tokens=64, running=1, decoding=True)) == pytest.approx(0.6)
    est.step("prefill", 1.5)  # the average moves by a fifth of the difference
    assert est.step_seconds["prefill"] == pytest.approx(0.7)


def test_a_request_expected_to_wait_too_long_is_refused(tiny_model):
    # Each step sleeps 0.05 s, so a step with a chunk of 64 prompt tokens takes at least that: a
    # queue of 100-token prompts holds more than 1 s of prefill before it is 15 long.
    async def burst(engine: Engine) -> tuple[int, QueueFullError | None]:
        streams, refused = [], None
        for i in range(40):
            try:
                streams.append(engine.submit(list(range(1 + i, 101 + i)), GREEDY))
            except QueueFullError as e:
                refused = e
                break
        for stream in streams:
            await stream.aclose()
        while engine.stats()["waiting"] or engine.stats()["running"]:  # until the aborts are applied
            await asyncio.sleep(0.01)
        return len(streams), refused

    with engine_with(tiny_model, debug_step_delay=0.05, max_queue_wait=1.0) as engine:
        asyncio.run(run(engine, PROMPTS[:1], GREEDY))  # measures prefill and decode steps
        accepted, refused = asyncio.run(burst(engine))
        assert accepted >= 1 and refused is not None, accepted
        assert "expected wait" in str(refused) and refused.retry_after >= 1
        assert asyncio.run(run(engine, PROMPTS[:1], GREEDY))[0][-1].finish_reason == "length"  # taken again
        assert_all_pages_free(engine)


def test_a_request_aborted_while_it_waits_never_runs(tiny_model):
    long = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)

    async def scenario(engine: Engine) -> list[RequestOutput]:
        batch = [engine.submit(p, long) for p in (PROMPTS[0], PROMPTS[1], [1, 2, 3], [4, 5, 6])]
        for stream in batch:  # the batch of 4 is full and decoding
            await anext(stream)
        queued = engine.submit(PROMPTS[2], GREEDY)
        await queued.aclose()  # its client is gone
        while engine.stats()["waiting"]:
            await asyncio.sleep(0.01)
        for stream in batch:  # free the batch: a request still queued would be admitted now
            await stream.aclose()
        while engine.stats()["running"]:
            await asyncio.sleep(0.01)
        return [out async for out in queued]

    with engine_with(tiny_model, debug_step_delay=0.02) as engine:
        before = engine.stats()["prompt_tokens"]  # counted when a request is admitted
        assert asyncio.run(scenario(engine)) == []
        assert engine.stats()["prompt_tokens"] - before == len(PROMPTS[0]) + len(PROMPTS[1]) + 6
        assert_all_pages_free(engine)
