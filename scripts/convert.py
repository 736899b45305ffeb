"""Convert a model to an orbax checkpoint of the engine's compute form, for a start that reads each
weight array straight into its place on the device mesh (`--model DIR` then serves it).

    .venv/bin/python scripts/convert.py --model smollm2-135m-instruct --out ckpt/smollm2
    .venv/bin/python scripts/convert.py --model smollm2-135m-instruct --out ckpt/smollm2-int8 --quantize int8
    .venv/bin/python -m serving.main --model ckpt/smollm2-int8 --quantize int8

The weights are prepared for the options given here (`--dtype`, `--quantize`, `--layer-loop`, and
this backend's int8 lowering), and an engine started with other options refuses the checkpoint
with the command that converts it for them (graph/checkpoint.py).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from graph.api import DTYPES, LAYER_LOOPS, EngineConfig
from graph.checkpoint import convert
from models.errors import ModelLoadError
from models.loader import load_model


def main(argv: list[str] | None = None) -> None:
    defaults = EngineConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="alias, Hugging Face directory, .gguf file or hub id")
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--dtype", default=defaults.dtype, choices=tuple(DTYPES))
    parser.add_argument("--quantize", default=defaults.quantize, choices=("none", "int8"))
    parser.add_argument("--layer-loop", default=defaults.layer_loop, choices=LAYER_LOOPS)
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it is a converted checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's step-by-step save log
    config = EngineConfig(dtype=args.dtype, quantize=args.quantize, layer_loop=args.layer_loop)
    started = time.monotonic()
    try:
        model = load_model(args.model, args.dtype)
        out = convert(model, args.out, config, overwrite=args.overwrite)
    except (ModelLoadError, ValueError, FileExistsError) as e:
        parser.exit(1, f"error: {e}\n")
    print(f"wrote {model.name} ({args.dtype}, quantize {args.quantize}) to {out} in {time.monotonic() - started:.1f}s")


if __name__ == "__main__":
    main()
