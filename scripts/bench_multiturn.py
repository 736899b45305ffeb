"""A multi-turn chat replay: 10 turns, each re-sending the whole conversation so far plus a new
user message (~50 words), streaming, greedy, 64 output tokens per turn. Prints the time to first
token of every turn; with prefix caching the history's pages are reused, so turn 10's TTFT stays
close to turn 1's instead of growing with the history. `--repeat N` replays N conversations (other
words each time) and reports each turn's median TTFT: one replay's turn is a single sample.

    .venv/bin/python scripts/bench_multiturn.py --ours "" --ours=--no-enable-prefix-caching

`--llama-server BINARY` replays the same conversations against llama.cpp's server too (one slot,
the model's own GGUF, `-t 2`, its default prompt cache: the slot keeps the previous turn's KV and
prefills only what follows the common prefix), in the same sitting: the same 1.5x bound read on a
peer. Each server's replies are its own (greedy, each its own weights' numerics), so the histories
differ a little in their words, not in their length (64 tokens a reply).
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(REPO))

from scripts.bench_vs_llamacpp import llamacpp, xlaserve  # noqa: E402

WORDS = "the sea ship wind sail north river harbour light storm calm crew deck map star night morning".split()


def turn(client: httpx.Client, model: str, messages: list[dict], max_tokens: int) -> tuple[float, str, str]:
    """-> (seconds to the first content chunk, the whole reply, "prompt tokens/cached tokens")."""
    body = {
        "model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    started, first, text, tokens = time.perf_counter(), None, "", "?"
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if usage := chunk.get("usage"):
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                tokens = f"{usage['prompt_tokens']}/{cached}"
            delta = chunk["choices"]
            content = delta[0]["delta"].get("content") if delta else None
            if content:
                first = first or time.perf_counter() - started
                text += content
    return first or float("nan"), text, tokens


def replay(url: str, turns: int, words: int, max_tokens: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    messages: list[dict] = []
    ttfts = []
    # a connection per request: llama.cpp's server drops a kept-alive one after a stream
    with httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        for _ in range(turns):
            question = " ".join(rng.choice(WORDS) for _ in range(words))
            messages.append({"role": "user", "content": f"Tell me about {question}."})
            ttft, reply, tokens = turn(client, model, messages, max_tokens)
            messages.append({"role": "assistant", "content": reply})
            ttfts.append(ttft)
            print(f"  turn {len(ttfts)}: TTFT {ttft * 1000:.0f} ms, prompt/cached tokens {tokens}", flush=True)
    return ttfts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--ours", action="append", help="xlaserve flags (repeatable: one replay per set)")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--words", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=1, help="conversations per flag set (median TTFT per turn)")
    parser.add_argument("--llama-server", help="llama.cpp's llama-server binary: replay against it as well")
    args = parser.parse_args()
    servers = [(f or "(defaults)", lambda f=f: xlaserve(args.model, shlex.split(f))) for f in args.ours or [""]]
    if args.llama_server:
        from models.loader import resolve

        gguf = resolve(args.model)[1]
        per_slot = args.turns * (args.words * 2 + args.max_tokens + 64) + 512  # the whole conversation
        servers.append(("llama.cpp", lambda: llamacpp(args.llama_server, gguf, 1, per_slot)))
    rows = []
    for name, server in servers:
        print(name, flush=True)
        with server() as url:
            replay(url, 2, args.words, args.max_tokens, seed=99)  # warm up
            runs = [replay(url, args.turns, args.words, args.max_tokens, seed=1 + i) for i in range(args.repeat)]
        ttfts = [statistics.median(turn) for turn in zip(*runs, strict=True)]
        rows.append((name, ttfts))
        print(name, json.dumps([round(t * 1000) for t in ttfts]), flush=True)
    print(f"\nmedian of {args.repeat} conversation(s) per turn")
    print(f"\n| server (xlaserve flags) | TTFT turn 1 ms | TTFT turn {args.turns} ms | ratio | every turn (ms) |")
    print("|---|---|---|---|---|")
    for flags, t in rows:
        print(f"| {flags} | {t[0] * 1000:.0f} | {t[-1] * 1000:.0f} | {t[-1] / t[0]:.2f}x | "
              f"{' '.join(str(round(x * 1000)) for x in t)} |")  # fmt: skip


if __name__ == "__main__":
    main()
