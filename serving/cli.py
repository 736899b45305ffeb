"""The `xlaserve` console script: `xlaserve serve [options]` is `python -m serving.main` and
`xlaserve compile --out DIR [options]` is `python -m graph.aot`, with the same options."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

COMMANDS = {
    "serve": "load a model, compile or load its engine, and serve the OpenAI API (python -m serving.main)",
    "compile": "compile the executable table ahead of time into --out DIR, for serve --aot-dir (python -m graph.aot)",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="xlaserve",
        description="An LLM inference server: JAX models compiled ahead of time behind the OpenAI API.",
        epilog="`xlaserve COMMAND --help` lists a command's options.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        # each command parses its own options: no help or defaults of its own here
        commands.add_parser(name, help=help_text, add_help=False)
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    prog = f"xlaserve {args.command}"
    if args.command == "serve":
        from serving.main import main as serve

        return serve(rest, prog=prog)
    from graph.aot import main as compile_table

    compile_table(rest, prog=prog)
    return 0


if __name__ == "__main__":
    sys.exit(main())
