"""One owner per rule. The engine alone checks what needs the model or its limits (an empty prompt,
token ids and logit_bias against the vocabulary, min_tokens against max_tokens, the seed's range,
the context length) and refuses with a typed error naming the parameter, before anything is
queued; the server answers it with a 400. A seed is used whole or refused, never cut to 32 bits.
`--max-n` is the only bound on `n`. Chat template rendering makes a 400 of the template's own
refusal only: any other error is a 500 with its trace in the log. `--kv-pages` and `--kv-memory-gb`
with `--aot-dir` apply (the artifact's own page count) or stop the server with one clear line."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import subprocess
import sys

import pytest

from graph.api import MAX_SEED, ArtifactMismatchError, InvalidRequestError, RequestTooLargeError, SamplingParams
from tests.server_fixtures import MODEL, REPO, SMALL_ENGINE, cache_args, serve

pytest_plugins = ("tests.server_fixtures",)

VOCAB = 49152  # SmolLM2's
P = SamplingParams(max_tokens=4)
HI = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    ("prompt", "params", "error", "param", "words"),
    [
        ([], P, InvalidRequestError, None, "empty"),
        ([1, VOCAB], P, InvalidRequestError, None, "outside the vocabulary (0..49151)"),
        ([1], dataclasses.replace(P, logit_bias=((VOCAB, 1.0),)), InvalidRequestError, "logit_bias", "outside"),
        (
            [1],
            dataclasses.replace(P, logit_bias=tuple((t, 1.0) for t in range(301))),
            InvalidRequestError,
            "logit_bias",
            "300",
        ),
        ([1], dataclasses.replace(P, min_tokens=5), InvalidRequestError, "min_tokens", "larger than max_tokens (4)"),
        ([1], dataclasses.replace(P, seed=MAX_SEED + 1), InvalidRequestError, "seed", "between 0 and 4294967295"),
        ([1], dataclasses.replace(P, seed=-1), InvalidRequestError, "seed", "between 0 and 4294967295"),
        ([1] * 500, dataclasses.replace(P, max_tokens=13), RequestTooLargeError, None, "maximum context length is 512"),
    ],
    ids=["empty", "prompt-id", "bias-id", "bias-count", "min-tokens", "seed-2^32", "seed-negative", "context"],
)
def test_the_engine_refuses_what_it_cannot_serve_naming_the_parameter(aot_engine, prompt, params, error, param, words):
    async def submit() -> None:
        aot_engine.submit(prompt, params)

    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")) as raised:
        asyncio.run(submit())
    assert raised.value.param == param
    assert isinstance(raised.value, ValueError)  # what the offline API raised for bad input before
    assert aot_engine.stats()["waiting"] == 0 and aot_engine.stats()["running"] == 0


def test_the_largest_seed_is_used_and_choices_count_on_from_it_modulo_2_32(aot_engine):
    import openai

    with serve(aot_engine) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)

        def texts(seed: int, n: int) -> list[str]:
            response = client.completions.create(
                model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=seed, n=n
            )
            return [c.text for c in sorted(response.choices, key=lambda c: c.index)]

        top = texts(MAX_SEED, 2)
        assert top == texts(MAX_SEED, 2)  # the whole seed, every time
        assert top[1] == texts(0, 1)[0]  # choice i samples with seed + i (mod 2^32)
        assert texts(MAX_SEED - 1, 1)[0] != top[0]  # nearby seeds are other streams
        with pytest.raises(openai.BadRequestError, match="4294967295") as raised:
            texts(MAX_SEED + 1, 1)  # never folded onto seed 0
        assert raised.value.body["param"] == "seed"


def test_max_n_is_the_only_bound_on_n(aot_engine):
    import openai

    from serving.config import ServerConfig

    with serve(aot_engine, ServerConfig(max_n=130)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        response = client.completions.create(model=MODEL, prompt="Hi", max_tokens=1, n=130)  # over 128
        assert sorted(c.index for c in response.choices) == list(range(130))
        with pytest.raises(openai.BadRequestError, match="at most 130") as raised:
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=1, n=131)
        assert raised.value.body["param"] == "n"


TEMPLATE = (
    "{% if messages[0]['content'] == 'reject' %}{{ raise_exception('no rejects here') }}{% endif %}"
    "{% if messages[0]['content'] == 'crash' %}{{ 1 // 0 }}{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "<|im_start|>assistant\n"
)


def test_a_template_refusal_is_400_and_any_other_template_error_a_logged_500(aot_engine, monkeypatch, caplog):
    import openai

    monkeypatch.setattr(aot_engine.tokenizer.hf, "chat_template", TEMPLATE)  # the real tokenizer, another template
    with serve(aot_engine) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)

        def chat(content: str):
            messages = [{"role": "user", "content": content}]
            return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)

        with pytest.raises(openai.BadRequestError, match="no rejects here") as raised:
            chat("reject")
        assert raised.value.body["param"] == "messages"
        with caplog.at_level(logging.ERROR, logger="serving.app"), pytest.raises(openai.InternalServerError):
            chat("crash")
        [record] = [r for r in caplog.records if r.name == "serving.app"]
        assert "internal error on POST /v1/chat/completions" in record.getMessage()
        assert record.exc_info is not None and record.exc_info[0] is ZeroDivisionError
        assert chat("Hi").choices[0].finish_reason in ("stop", "length")  # and it serves on


def _without_kv_pages() -> list[str]:
    i = SMALL_ENGINE.index("--kv-pages")
    return [*SMALL_ENGINE[:i], *SMALL_ENGINE[i + 2 :]]


def test_kv_pool_options_with_an_artifact_apply_or_are_refused(aot_dir, smol_model):
    from graph.buckets import Buckets
    from graph.executables import ExecutableTable
    from serving.config import parse_args

    def load(argv: list[str]) -> ExecutableTable:
        config = parse_args([*argv, "--aot-dir", str(aot_dir)]).engine
        return ExecutableTable.load(
            aot_dir, smol_model.cfg, smol_model.dtype, config, Buckets.from_config(config), smol_model.fingerprint
        )

    assert load(list(SMALL_ENGINE)).num_pages == 256  # --kv-pages 256, the artifact's own: applies
    assert load(_without_kv_pages()).num_pages == 256  # no option: the artifact's pool
    with pytest.raises(ArtifactMismatchError, match="has 256 pages, fixed when it was compiled, not --kv-pages 100"):
        load([*_without_kv_pages(), "--kv-pages", "100"])
    with pytest.raises(ArtifactMismatchError, match=r"--kv-memory-gb cannot resize the artifact's KV pool \(256 pages"):
        load([*_without_kv_pages(), "--kv-memory-gb", "1"])


def test_a_server_given_a_kv_pool_option_its_artifact_cannot_take_exits_with_one_line(aot_dir):
    command = [sys.executable, "-m", "serving.main", "--port", "0", *cache_args(), *_without_kv_pages()]
    command += ["--aot-dir", str(aot_dir), "--kv-memory-gb", "1"]
    server = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    errors = [line for line in server.stderr.splitlines() if " ERROR " in line]
    assert server.returncode == 1
    assert len(errors) == 1 and "--kv-memory-gb cannot resize" in errors[0], server.stderr[-3000:]
    assert "Traceback" not in server.stderr
