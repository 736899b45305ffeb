"""The server's one typed configuration, and the command line generated from it.

`ServerConfig` holds the HTTP server's own switches plus an `EngineConfig` (graph/api.py). The
argument parser is built by walking the fields of both dataclasses (graph/cli.py): each field
becomes one `--kebab-case` option whose type and default come from the field and whose help text
is the comment beside it. No default is repeated here, and no environment variable changes
behaviour: the command line (or the dataclass, in tests) is the only input.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

from graph.api import DTYPES, EngineConfig
from graph.cli import add_options, build
from serving.tools import PARSERS

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Every switch of `python -m serving.main`."""

    model: str | None = None  # alias, Hugging Face directory, .gguf file or hub id (none: bundled SmolLM2)
    served_model_name: str | None = None  # the model id clients use and see (none: the model's name)
    host: str = "127.0.0.1"  # address to listen on
    port: int = 8000  # port to listen on (0: any free port, printed in the ready line)
    api_key: str | None = None  # when set, /v1 requests need `Authorization: Bearer API_KEY`
    max_body_bytes: int = 4 * 1024 * 1024  # larger request bodies get 413
    max_n: int = 128  # largest `n` (choices per prompt) a request may ask for
    shutdown_timeout: float = 30.0  # on SIGINT/SIGTERM, how long in-flight requests may run on
    log_level: str = "info"  # critical | error | warning | info | debug
    access_log: bool = False  # log one line per HTTP request
    chat_template: str | None = (
        None  # a Jinja chat template file used instead of the model's (e.g. serving/templates/hermes_tools.jinja)
    )
    tool_call_parser: str | None = (
        None  # hermes | llama3_json: how tool calls are read from the model's text (none: no tools)
    )
    coordinator: str | None = None  # HOST:PORT of process 0, to run as one of several processes (jax.distributed)
    num_processes: int = 1  # processes in all (each with its own devices; one mesh over all of them)
    process_id: int = 0  # this process: 0 serves HTTP and schedules, the others follow its steps
    # engines, each in its own process on its share of the CPU cores with its own KV pool; a request
    # goes to the least loaded (graph/replicas.py; CPU: fewer stalls at high concurrency)
    replicas: int = 1
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, not {self.log_level!r}")
        if self.max_n < 1:
            raise ValueError("max_n must be at least 1")
        if self.tool_call_parser is not None and self.tool_call_parser not in PARSERS:
            raise ValueError(f"tool_call_parser must be one of {', '.join(PARSERS)}, not {self.tool_call_parser!r}")
        if self.max_body_bytes < 1:
            raise ValueError("max_body_bytes must be at least 1")
        if self.num_processes < 1 or not 0 <= self.process_id < self.num_processes:
            raise ValueError("process_id must be at least 0 and less than num_processes")
        if self.replicas < 1:
            raise ValueError("replicas must be at least 1")
        if self.replicas > 1 and self.num_processes > 1:
            raise ValueError("--replicas and --num-processes cannot be combined")
        if self.num_processes > 1 and not self.coordinator:
            raise ValueError("--num-processes above 1 needs --coordinator HOST:PORT (process 0's address)")


def build_parser(prog: str = "python -m serving.main") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve a model over the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models).",
    )
    choices = {"dtype": tuple(DTYPES), "kv_cache_dtype": ("auto", *DTYPES)}
    add_options(parser, ServerConfig, choices={**choices, "log_level": LOG_LEVELS, "tool_call_parser": PARSERS})
    return parser


def parse_args(argv: Sequence[str] | None = None, prog: str = "python -m serving.main") -> ServerConfig:
    """The command line -> a `ServerConfig` (exits with the usage on a bad option)."""
    parser = build_parser(prog)
    namespace = parser.parse_args(argv)
    try:
        return build(ServerConfig, vars(namespace))
    except ValueError as e:
        parser.error(str(e))
        raise  # unreachable: error() exits
