"""What the structured-output mask costs: one server, `--concurrency` chat requests in a closed
loop, first unconstrained, then each with a JSON schema in `response_format` (an object with at
least forty facts: longer than `--max-tokens`). Both runs produce exactly `--max-tokens` tokens per
request (`ignore_eos` for the first, the length cut for the second), so they schedule the same
steps and the difference is what the mask costs: computing it on the host, sending it, applying it.

    .venv/bin/python scripts/bench_structured.py --concurrency 16 --requests 48
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(REPO))

from scripts.bench_vs_llamacpp import xlaserve  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "facts": {"type": "array", "items": {"type": "string", "maxLength": 40}, "minItems": 40},
    },
    "required": ["city", "facts"],
}


async def run(url: str, model: str, concurrency: int, requests: int, max_tokens: int, constrained: bool) -> dict:
    cities = ["Paris", "Lima", "Oslo", "Cairo", "Kyoto", "Quito", "Perth", "Accra"]
    todo = list(range(requests))
    tokens, latencies = 0, []

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        while todo:
            i = todo.pop()
            body = {
                "model": model,
                "messages": [{"role": "user", "content": f"Give forty facts about {cities[i % len(cities)]}."}],
                "max_tokens": max_tokens,
                "temperature": 0.7,
                "seed": i,
            }
            if constrained:
                body["response_format"] = {"type": "json_schema", "json_schema": {"name": "facts", "schema": SCHEMA}}
            else:
                body["ignore_eos"] = True
            started = time.perf_counter()
            response = await client.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            tokens += response.json()["usage"]["completion_tokens"]
            latencies.append(time.perf_counter() - started)

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"tok_s": tokens / elapsed, "tokens": tokens, "seconds": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--ours", default="", help="extra xlaserve flags")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    with xlaserve(args.model, args.ours.split()) as url:
        asyncio.run(run(url, args.model, args.concurrency, args.concurrency, 8, False))  # warm up
        plain = asyncio.run(run(url, args.model, args.concurrency, args.requests, args.max_tokens, False))
        constrained = asyncio.run(run(url, args.model, args.concurrency, args.requests, args.max_tokens, True))
        metrics = httpx.get(url + "/metrics").text
    print(json.dumps({"unconstrained": plain, "json_schema": constrained}))
    print(f"output tok/s: unconstrained {plain['tok_s']:.1f}, JSON schema {constrained['tok_s']:.1f} "
          f"({constrained['tok_s'] / plain['tok_s'] - 1:+.1%})")  # fmt: skip
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line[:1] not in ("#", "")}
    steps, mask = values["xlaserve_engine_steps_total"], values["xlaserve_grammar_mask_seconds_total"]
    print(f"grammar masks: {mask:.2f} s of host time over {steps:.0f} steps ({1000 * mask / steps:.2f} ms a step)")


if __name__ == "__main__":
    main()
