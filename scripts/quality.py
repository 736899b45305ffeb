"""Quality of the non-default numeric paths against float32: perplexity of a fixed text
(tests/data/quality_text.txt, teacher-forced through the engine's prompt logprobs) and top-1
next-token agreement with float32.

    .venv/bin/python scripts/quality.py --model smollm2-135m-instruct --paths int8 bfloat16
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from graph.api import EngineConfig, SamplingParams
from graph.offline import LLM
from models.loader import load_model

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "quality_text.txt"
PATHS = {"float32": {}, "bfloat16": {"dtype": "bfloat16"}, "int8": {"quantize": "int8"}}


def score(model_name: str, path: str) -> tuple[float, list[int]]:
    """(perplexity, top-1 predicted id at every position) of the fixed text on one numeric path."""
    options = PATHS[path]
    model = load_model(model_name, options.get("dtype", "float32"))
    ids = model.tokenizer.encode(TEXT.read_text())
    seq = -(-(len(ids) + 1) // 256) * 256
    config = EngineConfig(
        max_batch=1, max_seq_len=seq, min_prefill_tokens=512, max_prefill_tokens=512, min_context_tokens=seq,
        kv_pages=seq // 16 + 1, **options,
    )  # fmt: skip
    llm = LLM(model, config)
    try:
        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1)
        lps = llm.generate([ids], params)[0].prompt_logprobs[1:]
    finally:
        llm.shutdown()
    return math.exp(-sum(lp.logprob for lp in lps) / len(lps)), [lp.top[0][0] for lp in lps]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--paths", nargs="+", default=["int8", "bfloat16"], choices=sorted(PATHS))
    args = parser.parse_args()
    ref_ppl, ref_top = score(args.model, "float32")
    print(f"{args.model} float32: perplexity {ref_ppl:.3f} over {len(ref_top)} tokens")
    for path in args.paths:
        ppl, top = score(args.model, path)
        agree = sum(a == b for a, b in zip(top, ref_top, strict=True)) / len(top)
        print(f"{args.model} {path}: perplexity {ppl:.3f} ({ppl / ref_ppl - 1:+.2%}), top-1 agreement {agree:.1%}")


if __name__ == "__main__":
    main()
