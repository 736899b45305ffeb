"""Quality of the non-default numeric paths against float32: perplexity of a fixed text
(tests/data/quality_text.txt, teacher-forced through the engine's prompt logprobs) and top-1
next-token agreement with float32.

    .venv/bin/python scripts/quality.py --model smollm2-135m-instruct --paths int8 bfloat16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.quality_score import PATHS, score


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
