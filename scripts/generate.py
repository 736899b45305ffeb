"""Print a greedy continuation of a prompt: a simple loop over the model's forward pass.

    .venv/bin/python scripts/generate.py --model gemma3-270m --prompt "The capital of France is"
    .venv/bin/python scripts/generate.py --model smollm2-135m-instruct --prompt "Tell me a joke" --chat

No engine here: one prefill, then one-token decode steps on a paged KV cache, the model's
`forward` under `jax.jit` (tests/forward_loop.py: the loop the parity tests hold against
transformers).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.errors import ModelLoadError
from models.loader import load_model
from models.tokenizer import NoChatTemplateError
from tests.forward_loop import greedy_tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="alias, Hugging Face directory, .gguf file or hub id")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument(
        "--chat", action="store_true", help="render the prompt as a user message with the chat template"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        model = load_model(args.model, args.dtype)
        tok = model.tokenizer
        if args.chat:
            prompt = tok.encode_chat([{"role": "user", "content": args.prompt}])
        else:
            prompt = tok.encode(args.prompt)
    except (ModelLoadError, NoChatTemplateError) as e:
        raise SystemExit(f"error: {e}") from None
    if not prompt:
        raise SystemExit("error: the prompt is empty")
    started = time.monotonic()
    ids: list[int] = []
    text = ""
    for token in greedy_tokens(model, prompt, args.max_tokens, stop_ids=tok.eos_token_ids):
        ids.append(token)
        full = tok.decode(ids)
        if not full.endswith("\ufffd"):  # print whole characters as they complete
            print(full[len(text) :], end="", flush=True)
            text = full
    print(tok.decode(ids)[len(text) :], flush=True)
    elapsed = time.monotonic() - started
    print(f"[{len(prompt)} prompt tokens, {len(ids)} generated in {elapsed:.1f}s incl. compilation]", file=sys.stderr)


if __name__ == "__main__":
    main()
