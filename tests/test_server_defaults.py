"""Every documented way to start the server works: each bundled model, started exactly as the
README says (`make serve`, with only `--port 0` added so tests never collide), compiles its default
bucket set, plans its KV pool, and answers a greedy completion identical to the model's own greedy
continuation (tests/forward_loop.py, parity-tested against transformers)."""

from __future__ import annotations

import os
import re
import shlex
import signal

import httpx
import pytest

from tests.server_fixtures import REPO, start_make_serve

pytestmark = pytest.mark.slow  # the default bucket set of each bundled model, compiled at start

PROMPT = "The capital of France is"
REFERENCE = {"smollm2-135m-instruct": "smol_model", "gemma3-270m": "gemma3_model"}  # tests/conftest.py
TOKENS = 8


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


@pytest.mark.parametrize(
    ("model", "readme_model"),
    [
        pytest.param("smollm2-135m-instruct", None, id="smollm2-default"),
        pytest.param("gemma3-270m", "gemma3-270m", id="gemma3"),
    ],
)
def test_bundled_model_serves_with_default_flags(model, readme_model, tmp_path, request):
    from tests.forward_loop import greedy_generate

    proc = start_make_serve([*_readme_serve_args(readme_model), "--port", "0"], tmp_path / "serve.log")
    try:
        url = proc.wait_ready(timeout=1500)
        body = {"model": model, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True}
        response = httpx.post(url + "/v1/completions", json=body, timeout=300)
        assert response.status_code == 200, response.text
        text = response.json()["choices"][0]["text"]
    finally:
        os.killpg(proc.proc.pid, signal.SIGTERM)  # make and the server it started
        proc.proc.wait(timeout=120)
    reference = request.getfixturevalue(REFERENCE[model])  # the model loaded in this process
    ids = reference.tokenizer.encode(PROMPT)
    assert text == reference.tokenizer.decode(greedy_generate(reference, ids, TOKENS))
