"""vLLM's /tokenize and /detokenize routes, and its small HTTP extensions the engine implements
(`stop_token_ids`, `skip_special_tokens`), and `best_of` equal to `n`."""

from __future__ import annotations

import pytest

from tests.server_fixtures import MAX_SEQ_LEN, MODEL
from tests.test_server_errors import assert_error

pytest_plugins = ("tests.server_fixtures",)

HI = [{"role": "user", "content": "Hi"}]


def test_tokenize_and_detokenize_round_trip(http, tokenizer):
    out = http.post("/tokenize", json={"model": MODEL, "prompt": "Hello world", "return_token_strs": True}).json()
    assert out["tokens"] == tokenizer.encode("Hello world") and out["count"] == len(out["tokens"])
    assert out["max_model_len"] == MAX_SEQ_LEN and len(out["token_strs"]) == out["count"]
    chat = http.post("/tokenize", json={"messages": HI}).json()
    assert chat["tokens"] == tokenizer.encode_chat(HI)
    back = http.post("/detokenize", json={"model": MODEL, "tokens": out["tokens"]}).json()
    assert back == {"prompt": "Hello world"}


@pytest.mark.parametrize(
    ("route", "body", "param", "words"),
    [
        ("/detokenize", {"tokens": [10**7]}, "tokens", "outside the vocabulary"),
        ("/tokenize", {"prompt": "x", "messages": HI}, "prompt", "either"),
        ("/tokenize", {"prompt": "x", "model": "gpt-4o"}, "model", "does not exist"),
    ],
)
def test_bad_tokenize_requests(http, route, body, param, words):
    status = 404 if param == "model" else 400
    assert_error(http.post(route, json=body), status, param, words)


def test_stop_token_ids_skip_special_tokens_and_best_of(http, tokenizer):
    body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    free = http.post("/v1/completions", json=body).json()["choices"][0]
    stop_at = tokenizer.encode(free["text"], add_special_tokens=False)[3]
    cut = http.post("/v1/completions", json={**body, "stop_token_ids": [stop_at]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and free["text"].startswith(cut["text"]) and cut["text"] != free["text"]
    special = {"model": MODEL, "messages": HI, "max_tokens": 8, "temperature": 0, "min_tokens": 0}
    hidden = http.post("/v1/chat/completions", json={**special, "logit_bias": {"1": 100}}).json()
    shown = http.post("/v1/chat/completions", json={**special, "logit_bias": {"1": 100}, "skip_special_tokens": False})
    assert hidden["choices"][0]["message"]["content"] == ""  # token 1 (<|im_start|>) is special
    assert "<|im_start|>" in shown.json()["choices"][0]["message"]["content"]
    both = http.post("/v1/completions", json={**body, "n": 2, "best_of": 2, "temperature": 0.8, "seed": 1})
    assert both.status_code == 200 and len(both.json()["choices"]) == 2
