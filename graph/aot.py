"""`python -m graph.aot --model M --out DIR [bucket options]`: compile the whole executable table
ahead of time and write it (serialized executables + manifest.json) for `--aot-dir DIR`. Also
`xlaserve compile --model M --out DIR`. It reads and fills the compilation cache as the server does
(graph/compile_cache.py, `--compile-cache DIR|off`), but writes only fresh compilations.

The bucket options must be the ones the server will run with; the manifest records them with the
model fingerprint, dtype, backend, device kind and count, jax/jaxlib versions and the memory
analysis of every executable, and a server refuses an artifact that differs in any of them.
"""

from __future__ import annotations

import argparse
import logging
import time

from graph import compile_cache
from graph.api import DTYPES, EngineConfig
from graph.buckets import Buckets
from graph.checkpoint import check_weights
from graph.cli import add_options, build
from graph.executables import ExecutableTable
from graph.kv_cache import plan_num_pages
from graph.layout import check_mesh
from models.loader import load_model


def main(argv: list[str] | None = None, prog: str = "python -m graph.aot") -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="alias, Hugging Face directory, .gguf file or hub id")
    parser.add_argument("--out", required=True, help="artifact directory to write")
    choices = {"dtype": tuple(DTYPES), "kv_cache_dtype": ("auto", *DTYPES)}
    add_options(parser, EngineConfig, skip=("aot_dir",), choices=choices)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = build(EngineConfig, vars(args))
    started = time.monotonic()
    try:
        compile_cache.configure(config.compile_cache)
    except ValueError as e:
        parser.error(str(e))
    model = load_model(args.model, config.dtype, config.tokenizer_cache())
    try:
        check_mesh(model.cfg, config)
        check_weights(model, config)
    except ValueError as e:
        parser.error(str(e))
    buckets = Buckets.from_config(config)
    num_pages = plan_num_pages(model, config, buckets)
    table = ExecutableTable.compile(model.cfg, model.dtype, config, buckets, num_pages, serializable=True)
    table.save(args.out, model.fingerprint)
    print(f"wrote {len(table.executables)} executables to {args.out} in {time.monotonic() - started:.1f}s")


if __name__ == "__main__":
    main()
