"""The README's serve command, `make serve`, reaches "Server ready" and answers."""

from __future__ import annotations

import os
import re
import signal

import httpx

from tests.server_fixtures import MODEL, REPO, SMALL_ENGINE, start_make_serve

# aot_dir (the session's compiled bucket set)
pytest_plugins = ("tests.server_fixtures",)


def test_readme_serve_command_reaches_ready(aot_dir, tmp_path):
    readme = (REPO / "README.md").read_text()
    assert re.search(r"^make serve\b", readme, re.MULTILINE), "the README no longer shows `make serve`"
    args = ["--port", "0", *SMALL_ENGINE, "--aot-dir", str(aot_dir)]
    proc = start_make_serve(args, tmp_path / "make-serve.log")
    try:
        url = proc.wait_ready(timeout=300)
        assert httpx.get(url + "/health", timeout=30).json() == {"status": "ok"}
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=120).status_code == 200
    finally:
        os.killpg(proc.proc.pid, signal.SIGTERM)  # make and the server it started
        proc.proc.wait(timeout=60)
