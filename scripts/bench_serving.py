"""A load generator for a running server, like vLLM's `bench serve`: streams requests over HTTP
and reports time to first token, inter-token latency and throughput percentiles.

    .venv/bin/python scripts/bench_serving.py --base-url http://127.0.0.1:8000 \\
        --num-prompts 64 --concurrency 16 --input-len 128 --output-len 128 --json result.json

Prompts are random token ids (so every prompt is exactly --input-len tokens) sent to
/v1/completions; with --endpoint /v1/chat/completions they are random words instead. Generation is
greedy with end-of-sequence ignored, so each request produces exactly --output-len tokens.
Requests start as fast as --concurrency allows, or at --request-rate per second (Poisson arrivals).

- TTFT: request sent -> first chunk with text.  ITL: time between text chunks.
- TPOT: (latency - TTFT) / (output tokens - 1), per request.
- Output throughput: output tokens of all requests / wall time of the whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import statistics
import sys
import time
from typing import Any

import httpx

WORDS = "the sea sky moon sun river stone tree light wind rain cloud bird song road city night day".split()


@dataclasses.dataclass
class Result:
    ok: bool = False
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = dataclasses.field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ""


def make_prompts(args: argparse.Namespace) -> list[Any]:
    rng = random.Random(args.seed)
    low, high = args.token_range
    if args.endpoint.endswith("/chat/completions"):
        return [" ".join(rng.choice(WORDS) for _ in range(args.input_len)) for _ in range(args.num_prompts)]
    return [[rng.randrange(low, high) for _ in range(args.input_len)] for _ in range(args.num_prompts)]


def request_body(args: argparse.Namespace, model: str, prompt: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": args.output_len,
        "temperature": args.temperature,
        "ignore_eos": args.ignore_eos,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.endpoint.endswith("/chat/completions"):
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def _chunk_text(chunk: dict[str, Any]) -> str:
    choice = chunk["choices"][0]
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


async def one_request(client: httpx.AsyncClient, endpoint: str, body: dict[str, Any]) -> Result:
    result = Result()
    started = last = time.perf_counter()
    try:
        async with client.stream("POST", endpoint, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                    return result
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                elif chunk["choices"] and _chunk_text(chunk):
                    if result.ttft == 0.0:
                        result.ttft = now - started
                    else:
                        result.itl.append(now - last)
                    last = now
        result.latency = time.perf_counter() - started
        result.ok = True
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


async def run(args: argparse.Namespace, model: str, prompts: list[Any]) -> tuple[list[Result], float]:
    limits = httpx.Limits(max_connections=args.concurrency or 1000, max_keepalive_connections=args.concurrency or 1000)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    gate = asyncio.Semaphore(args.concurrency) if args.concurrency else None
    rng = random.Random(args.seed + 1)
    async with httpx.AsyncClient(base_url=args.base_url, timeout=None, limits=limits, headers=headers) as client:
        for prompt in prompts[: args.warmup]:
            await one_request(client, args.endpoint, request_body(args, model, prompt))

        async def limited(prompt: Any) -> Result:
            if gate is None:
                return await one_request(client, args.endpoint, request_body(args, model, prompt))
            async with gate:
                return await one_request(client, args.endpoint, request_body(args, model, prompt))

        started = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(limited(prompt)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - started


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    """mean, median, p90, p99 (in ms by default) of `values`."""
    if not values:
        return {"mean": 0.0, "median": 0.0, "p90": 0.0, "p99": 0.0}
    ordered = sorted(values)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] * scale

    return {
        "mean": statistics.fmean(ordered) * scale,
        "median": statistics.median(ordered) * scale,
        "p90": pct(90),
        "p99": pct(99),
    }


def summarize(args: argparse.Namespace, results: list[Result], duration: float) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    output = sum(r.output_tokens for r in done)
    prompt = sum(r.prompt_tokens for r in done)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    return {
        "endpoint": args.endpoint,
        "num_prompts": len(results),
        "concurrency": args.concurrency,
        "request_rate": None if args.request_rate == float("inf") else args.request_rate,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "request_throughput": len(done) / duration,
        "output_throughput": output / duration,
        "total_token_throughput": (prompt + output) / duration,
        "total_output_tokens": output,
        "total_prompt_tokens": prompt,
        "ttft_ms": percentiles([r.ttft for r in done]),
        "tpot_ms": percentiles(tpot),
        "itl_ms": percentiles([x for r in done for x in r.itl]),
        "latency_ms": percentiles([r.latency for r in done]),
    }


def print_table(summary: dict[str, Any]) -> None:
    print(f"{'Successful requests':<32}{summary['completed']:>12}")
    print(f"{'Failed requests':<32}{summary['failed']:>12}")
    print(f"{'Duration (s)':<32}{summary['duration_s']:>12.2f}")
    print(f"{'Request throughput (req/s)':<32}{summary['request_throughput']:>12.2f}")
    print(f"{'Output throughput (tok/s)':<32}{summary['output_throughput']:>12.2f}")
    print(f"{'Total token throughput (tok/s)':<32}{summary['total_token_throughput']:>12.2f}")
    for key, title in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("latency_ms", "E2E latency")):
        stats = summary[key]
        print(f"{title + ' (ms)':<16}" + "".join(f"{name} {stats[name]:>9.1f}  " for name in stats))
    for error in summary["errors"]:
        print(f"error: {error}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--endpoint", default="/v1/completions", choices=("/v1/completions", "/v1/chat/completions"))
    parser.add_argument("--model", default=None, help="model id (default: the server's first model)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16, help="most requests in flight (0: no limit)")
    parser.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s, Poisson (inf: all)")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens (chat: words)")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--token-range", type=int, nargs=2, default=(1000, 20000), metavar=("LOW", "HIGH"))
    parser.add_argument("--warmup", type=int, default=1, help="requests sent (one at a time) before timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the summary as JSON ('-': stdout)")
    args = parser.parse_args(argv)

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = args.model or httpx.get(args.base_url + "/v1/models", headers=headers).json()["data"][0]["id"]
    results, duration = asyncio.run(run(args, model, make_prompts(args)))
    summary = {"model": model, **summarize(args, results, duration)}
    print_table(summary)
    if args.json == "-":
        print(json.dumps(summary))
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
