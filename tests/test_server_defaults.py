"""Every documented way to start the server works: each bundled model, started exactly as the
README says (`make serve`, with only `--port 0` added so tests never collide), compiles its default
bucket set, plans its KV pool, and answers a greedy completion identical to the model's own greedy
continuation (tests/forward_loop.py, parity-tested against transformers). The session runs these
servers from its start, one after the other at the lowest CPU priority (tests/conftest.py `early`):
their compiles use the core the rest of the suite leaves idle, and each test finds its answer ready
or nearly so."""

from __future__ import annotations

import functools
import re
import shlex
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.server_fixtures import REPO, make_serve

pytestmark = pytest.mark.slow  # the default bucket set of each bundled model, compiled at start

PROMPT = "The capital of France is"
REFERENCE = {"smollm2-135m-instruct": "smol_model", "gemma3-270m": "gemma3_model"}  # tests/conftest.py
TOKENS = 8
CASES = {"smollm2-default": ("smollm2-135m-instruct", None), "gemma3": ("gemma3-270m", "gemma3-270m")}


def _readme_serve_args(model: str | None) -> list[str]:
    """The README's `make serve` command for `model` (None: the plain one), as server arguments."""
    readme = (REPO / "README.md").read_text()
    if model is None:
        assert re.search(r"^make serve\s", readme, re.MULTILINE), "the README no longer shows `make serve`"
        return []
    m = re.search(rf'make serve ARGS="(--model {re.escape(model)}[^"]*)"', readme)
    assert m, f"the README no longer shows how to serve {model}"
    args = shlex.split(m[1])
    if "--port" in args:  # any free port
        del args[args.index("--port") : args.index("--port") + 2]
    return args


def _serve_and_complete(model: str, readme_model: str | None, log_dir: Path, nice: bool = False) -> str:
    """Start the server as the README says, ask for the greedy completion, stop it: the text."""
    with make_serve([*_readme_serve_args(readme_model), "--port", "0"], log_dir / f"{model}.log", nice) as proc:
        url = proc.wait_ready(timeout=1500)
        body = {"model": model, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True}
        response = httpx.post(url + "/v1/completions", json=body, timeout=300)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]


def early_jobs(items: list[pytest.Item]) -> dict[str, Callable[[Path], str]]:
    """The servers of this module's selected tests, for the session to run from its start."""
    cases = [item.callspec.id for item in items if hasattr(item, "callspec")]
    return {case: functools.partial(_serve_and_complete, *CASES[case], nice=True) for case in cases}


@pytest.mark.parametrize("case", list(CASES))
def test_bundled_model_serves_with_default_flags(case, tmp_path, request, early):
    from tests.forward_loop import greedy_generate

    model, readme_model = CASES[case]
    text = early.result(case, functools.partial(_serve_and_complete, model, readme_model), tmp_path)
    reference = request.getfixturevalue(REFERENCE[model])  # the model loaded in this process
    ids = reference.tokenizer.encode(PROMPT)
    assert text == reference.tokenizer.decode(greedy_generate(reference, ids, TOKENS))
