"""xlaserve against llama.cpp's server, side by side in one sitting, with the same load generator
(../shared/bench/load.py): 128-word prompts, 128 output tokens, streaming /v1/completions, greedy
with end-of-sequence ignored, at several concurrencies. The servers run one after the other, each
alone on the machine; the table gives each side's output tokens/s, ITL and TTFT and the ratio.

    ../shared/bench/build_llamacpp.sh /tmp/llamacpp
    .venv/bin/python scripts/bench_vs_llamacpp.py --ours "--quantize int8" --concurrency 1 8 16 32

llama.cpp serves the model's own GGUF file (SmolLM2's Q4_1, Gemma's Q4_K_M) with `-t 2`, one slot
per concurrent request, each slot with room for a whole request; its prompt cache is its default
one (`cache_prompt` on: each slot reuses the prefix its previous request shares with the next).
`--ours` may be given several times: each flag set is a row of the table (e.g. `--ours ""
--ours=--no-enable-prefix-caching`; a single flag needs the `=` form). `--shared-prefix-words N`
gives every prompt the same first N words (load.py), the workload prefix caching is for.
`--rounds N` measures both servers N times, alternating, and gives every round's numbers and the
median ratio: a shared machine's speed drifts between one server's run and the other's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(REPO))

LOAD = REPO.parent / "shared" / "bench" / "load.py"
READY = re.compile(r"Server ready on (http://\S+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llamacpp(binary: str, gguf: Path, slots: int, per_slot: int) -> Iterator[str]:
    port = free_port()
    command = [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", "2",
               "-np", str(slots), "-c", str(per_slot * slots), "--log-disable"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("llama-server did not start")
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


@contextlib.contextmanager
def xlaserve(model: str, extra: list[str]) -> Iterator[str]:
    command = [sys.executable, "-m", "serving.main", "--model", model, "--port", "0", *extra]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if m := READY.search(line):
                yield m[1]
                break
        else:
            raise RuntimeError(f"xlaserve exited with {proc.wait()}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)


def run_load(url: str, concurrency: int, requests: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, str(LOAD), "--base-url", url, "--endpoint", "completions", "--json",
               "--concurrency", str(concurrency), "--num-requests", str(requests), "--prompt-tokens",
               str(args.prompt_tokens), "--max-tokens", str(args.max_tokens), "--ignore-eos",
               "--warmup", "1", "--shared-prefix-words", str(args.shared_prefix_words)]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    return json.loads(out.stdout.strip().splitlines()[-1])


COUNTERS = ("xlaserve_engine_steps_total", "xlaserve_engine_step_host_seconds_total",
            "xlaserve_engine_step_wait_seconds_total", "xlaserve_engine_steps_looked_ahead_total",
            "xlaserve_spec_decode_draft_tokens_total", "xlaserve_spec_decode_accepted_tokens_total")  # fmt: skip


def counters(url: str) -> dict[str, float]:
    """The engine's step counters from /metrics."""
    import httpx

    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=30).text
    found = {n: float(line.split()[-1]) for line in text.splitlines() for n in COUNTERS if line.startswith(n + " ")}
    for line in text.splitlines():  # by kind: 'steps prefill', 'seconds prefill', ...
        if m := re.match(r'xlaserve_engine_step(s|_seconds)_by_kind_total\{kind="(\w+)"\} (\S+)$', line):
            found[f"{'steps' if m[1] == 's' else 'seconds'} {m[2]}"] = float(m[3])
    return found


def split(before: dict[str, float], after: dict[str, float]) -> str:
    """Per step of a run: the step thread's host time and its wait for the device, in ms."""
    steps = after[COUNTERS[0]] - before[COUNTERS[0]]
    host, wait, ahead, drafts, kept = ((after[n] - before[n]) for n in COUNTERS[1:])
    kinds = sorted(k.split()[1] for k in after if k.startswith("steps "))
    by_kind = ", ".join(
        f"{kind} {n:.0f} x {1000 * (after[f'seconds {kind}'] - before.get(f'seconds {kind}', 0)) / n:.0f} ms"
        for kind in kinds
        if (n := after[f"steps {kind}"] - before.get(f"steps {kind}", 0))
    )
    return (f"{steps:.0f} steps ({by_kind}), host {1000 * host / steps:.1f} ms/step, waiting for the device "
            f"{1000 * wait / steps:.1f} ms/step, {100 * ahead / steps:.0f}% dispatched ahead, "
            f"{kept:.0f} of {drafts:.0f} draft tokens kept")  # fmt: skip


def measure(args: argparse.Namespace, gguf: Path, levels: list[tuple[int, int]], runs: list[str]) -> dict[str, dict]:
    """One round: llama.cpp at every level, then each xlaserve flag set -> {side: {concurrency: summary}}."""
    results: dict[str, dict[int, dict]] = {"llama.cpp": {}}
    if not args.skip_llamacpp:
        words = args.prompt_tokens + args.shared_prefix_words
        per_slot = 256 * -(-(words * 3 // 2 + args.max_tokens + 64) // 256)
        with llamacpp(args.llama_server, gguf, max(args.concurrency), per_slot) as url:
            for c, n in levels:
                results["llama.cpp"][c] = run_load(url, c, n, args)
                print("llama.cpp", c, json.dumps(results["llama.cpp"][c]), flush=True)
    for flags in runs:
        results[flags] = {}
        with xlaserve(args.model, shlex.split(flags)) as url:
            for c, n in levels:
                before = counters(url)
                results[flags][c] = run_load(url, c, n, args)
                print("xlaserve", flags, c, json.dumps(results[flags][c]), flush=True)
                print("xlaserve", flags, c, split(before, counters(url)), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--ours", action="append", help="extra xlaserve flags, e.g. '--quantize int8' (repeatable)")
    parser.add_argument("--llama-server", default="/tmp/llamacpp/build/bin/llama-server")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--shared-prefix-words", type=int, default=0)
    # each level runs max(8, this x concurrency) requests: more give a steadier ITL p99 (with 2, the
    # p99 of 8 streams is about the 3rd slowest of 250 steps)
    parser.add_argument("--requests-per-client", type=int, default=2)
    # rounds alternate the servers (llama.cpp, ours, llama.cpp, ours, ...): a shared 2-core machine's
    # speed drifts by a third within minutes, so one server measured after the other compares moments
    # as much as servers; the table gives each round's ratio and the median
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--skip-llamacpp", action="store_true")
    args = parser.parse_args()
    from models.loader import resolve

    gguf = resolve(args.model)[1]
    levels = [(c, max(8, args.requests_per_client * c)) for c in args.concurrency]
    runs = args.ours or [""]
    rounds = []
    for r in range(args.rounds):
        print(f"round {r + 1} of {args.rounds}", flush=True)
        rounds.append(measure(args, gguf, levels, runs))
    print(f"\n{args.model}: {args.prompt_tokens} words in ({args.shared_prefix_words} shared), {args.max_tokens} out")
    print("| xlaserve flags | concurrency | xlaserve tok/s | llama.cpp tok/s | ratio | xlaserve ITL p50/p99 ms | "
          "llama.cpp ITL p50/p99 ms | xlaserve TTFT p50 ms | llama.cpp TTFT p50 ms |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for flags in runs:
        for c, _ in levels:
            cells = [_row(results[flags][c], results["llama.cpp"].get(c)) for results in rounds]
            # one round: its numbers; several: each round's, separated by commas, then the median ratio
            joined = [", ".join(column) for column in zip(*cells, strict=True)]
            ratios = [r for results in rounds if (r := _ratio(results[flags][c], results["llama.cpp"].get(c)))]
            if len(rounds) > 1 and ratios:
                joined[2] += f" (median {statistics.median(ratios):.2f}x)"
            print(f"| {flags or '(defaults)'} | {c} | " + " | ".join(joined) + " |")


def _ratio(ours: dict, theirs: dict | None) -> float | None:
    return ours["output_tok_per_s"] / theirs["output_tok_per_s"] if theirs else None


def _row(ours: dict, theirs: dict | None) -> list[str]:
    """One round's table cells after the concurrency."""
    ratio = _ratio(ours, theirs)
    return [
        f"{ours['output_tok_per_s']:.1f}",
        f"{theirs['output_tok_per_s']:.1f}" if theirs else "-",
        f"{ratio:.2f}x" if ratio else "-",
        f"{ours['itl_ms_p50']:.0f} / {ours['itl_ms_p99']:.0f}",
        f"{theirs['itl_ms_p50']:.0f} / {theirs['itl_ms_p99']:.0f}" if theirs else "-",
        f"{ours['ttft_ms_p50']:.0f}",
        f"{theirs['ttft_ms_p50']:.0f}" if theirs else "-",
    ]


if __name__ == "__main__":
    main()
