"""Every implemented parameter changes the output the way the OpenAI reference says, seen through
the official `openai` client (and raw HTTP where the wire format matters)."""

from __future__ import annotations

import pytest

from tests.server_fixtures import MODEL, assert_matches_schema, engine_metrics

# server, openai_client (the official client), http (httpx), tokenizer
pytest_plugins = ("tests.server_fixtures",)

SEA = [{"role": "user", "content": "Write two sentences about the sea."}]
COUNT = "1, 2, 3, 4, 5, 6,"
SHORT = [{"role": "user", "content": "What is the capital of France?"}]  # a short natural answer


def chat(client, **kwargs):
    kwargs.setdefault("messages", SEA)
    return client.chat.completions.create(model=MODEL, **kwargs)


def complete(client, **kwargs):
    return client.completions.create(model=MODEL, **kwargs)


def text_of(response) -> str:
    return response.choices[0].message.content


@pytest.fixture(scope="module")
def greedy(openai_client) -> dict[str, str]:
    """Greedy reference outputs, computed once: SEA chat (12 tokens), COUNT completion (16 tokens)."""
    return {
        "chat": text_of(chat(openai_client, temperature=0, max_tokens=12)),
        "count": complete(openai_client, prompt=COUNT, max_tokens=16, temperature=0).choices[0].text,
    }


# ---- shapes --------------------------------------------------------------------------------------


def test_models_list_and_retrieve(openai_client, http):
    models = openai_client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert openai_client.models.retrieve(MODEL).id == MODEL
    assert_matches_schema(http.get("/v1/models").json(), "ListModelsResponse")


def test_chat_response_has_the_openai_fields(http):
    body = {"model": MODEL, "messages": SEA, "max_tokens": 8, "temperature": 0}
    data = http.post("/v1/chat/completions", json=body).json()
    assert_matches_schema(data, "CreateChatCompletionResponse")
    assert data["id"].startswith("chatcmpl-") and data["object"] == "chat.completion"
    assert data["model"] == MODEL and data["system_fingerprint"].startswith("fp_")
    choice = data["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    usage = data["usage"]
    assert usage["completion_tokens"] == 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_completion_response_has_the_openai_fields(http):
    body = {"model": MODEL, "prompt": COUNT, "max_tokens": 4, "temperature": 0, "logprobs": 2}
    data = http.post("/v1/completions", json=body).json()
    assert_matches_schema(data, "CreateCompletionResponse")
    assert data["id"].startswith("cmpl-") and data["object"] == "text_completion"
    assert data["choices"][0]["text"].startswith(" 7")  # the count goes on
    assert data["usage"]["completion_tokens"] == 4


def test_a_repeated_prompt_is_served_from_the_prefix_cache(openai_client, server):
    """The second identical request reuses every full KV page of the first (usage says how many
    prompt tokens, OpenAI's `prompt_tokens_details.cached_tokens`), answers the same, and /metrics
    counts the reuse."""
    system = "You answer in the style of a ship's log. " + " ".join(f"Rule {i}: be brief." for i in range(20))
    messages = [{"role": "system", "content": system}, *SHORT]
    before = engine_metrics(server.url)
    first, second = (chat(openai_client, messages=messages, temperature=0, max_tokens=8) for _ in range(2))
    prompt = first.usage.prompt_tokens
    assert prompt > 100 and second.usage.prompt_tokens == prompt
    assert first.usage.prompt_tokens_details.cached_tokens < 64  # at most the chat template's head
    assert second.usage.prompt_tokens_details.cached_tokens == (prompt - 1) // 16 * 16
    assert text_of(second) == text_of(first)
    after = engine_metrics(server.url)
    hits = after["xlaserve_prefix_cache_hit_tokens"] - before["xlaserve_prefix_cache_hit_tokens"]
    assert hits >= second.usage.prompt_tokens_details.cached_tokens
    assert 0 < after["xlaserve_prefix_cache_hit_rate"] <= 1
    prefills = 'xlaserve_engine_steps_by_kind_total{kind="prefill"}'
    assert after[prefills] >= before.get(prefills, 0) + 2  # each request's prompt had a step of its own
    assert after['xlaserve_engine_step_seconds_by_kind_total{kind="prefill"}'] > 0


# ---- sampling parameters -------------------------------------------------------------------------


def test_temperature_zero_is_deterministic_and_high_temperature_varies(openai_client, greedy):
    assert text_of(chat(openai_client, temperature=0, max_tokens=12)) == greedy["chat"]
    hot = {text_of(chat(openai_client, temperature=1.5, seed=s, max_tokens=8)) for s in range(3)}
    assert len(hot) == 3


def test_seed_makes_sampling_repeatable(openai_client):
    a = text_of(chat(openai_client, temperature=1.0, seed=123, max_tokens=8))
    b = text_of(chat(openai_client, temperature=1.0, seed=123, max_tokens=8))
    assert a == b


@pytest.mark.parametrize("narrowing", [{"top_p": 1e-6}, {"extra_body": {"top_k": 1}}, {"extra_body": {"min_p": 1.0}}])
def test_narrow_sampling_equals_greedy(openai_client, greedy, narrowing):
    assert text_of(chat(openai_client, temperature=1.0, seed=5, max_tokens=12, **narrowing)) == greedy["chat"]


def test_max_tokens_and_max_completion_tokens_cut_with_length(openai_client):
    for kwargs in ({"max_tokens": 5}, {"max_completion_tokens": 5}):
        response = chat(openai_client, temperature=0, **kwargs)
        assert response.usage.completion_tokens == 5
        assert response.choices[0].finish_reason == "length"


def test_stop_strings_end_the_text_before_them(openai_client, greedy):
    full = greedy["count"]
    assert " 9," in full
    for stop in (" 9", [" 9", "never"]):
        choice = complete(openai_client, prompt=COUNT, max_tokens=16, temperature=0, stop=stop).choices[0]
        assert choice.text == full[: full.index(" 9")]
        assert choice.finish_reason == "stop"


def test_n_gives_n_indexed_choices(openai_client):
    response = chat(openai_client, n=3, temperature=1.2, seed=7, max_tokens=8)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert len({c.message.content for c in response.choices}) == 3
    assert response.usage.completion_tokens == 24
    same = chat(openai_client, n=2, temperature=0, max_tokens=4)
    assert same.choices[0].message.content == same.choices[1].message.content


@pytest.mark.parametrize(
    "penalty", [{"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"extra_body": {"repetition_penalty": 1.8}}]
)
def test_penalties_change_repetitive_greedy_output(openai_client, greedy, penalty):
    penalized = complete(openai_client, prompt=COUNT, max_tokens=16, temperature=0, **penalty).choices[0].text
    assert greedy["count"].count(",") > penalized.count(",")


def test_logit_bias_bans_and_forces_tokens(openai_client, greedy, tokenizer):
    first = tokenizer.encode(greedy["count"], add_special_tokens=False)[0]
    banned = complete(openai_client, prompt=COUNT, max_tokens=1, temperature=0, logit_bias={str(first): -100})
    assert not greedy["count"].startswith(banned.choices[0].text)
    (forced_id,) = tokenizer.encode(" banana", add_special_tokens=False)
    forced = complete(openai_client, prompt=COUNT, max_tokens=3, temperature=0, logit_bias={str(forced_id): 100})
    assert forced.choices[0].text == " banana" * 3


def test_natural_end_min_tokens_and_ignore_eos(openai_client):
    natural = chat(openai_client, messages=SHORT, temperature=0)  # no max_tokens: up to the context
    n = natural.usage.completion_tokens
    assert natural.choices[0].finish_reason == "stop" and 0 < n < 20
    held = chat(openai_client, messages=SHORT, temperature=0, max_tokens=30, extra_body={"min_tokens": n + 3})
    assert held.usage.completion_tokens >= n + 3
    assert held.choices[0].message.content.startswith(natural.choices[0].message.content)
    endless = chat(openai_client, messages=SHORT, temperature=0, max_tokens=n + 3, extra_body={"ignore_eos": True})
    assert endless.usage.completion_tokens == n + 3 and endless.choices[0].finish_reason == "length"


# ---- logprobs and echo ---------------------------------------------------------------------------


def test_chat_logprobs_and_top_logprobs(openai_client):
    response = chat(openai_client, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
    content = response.choices[0].logprobs.content
    assert len(content) == 8
    assert "".join(t.token for t in content) == response.choices[0].message.content
    for t in content:
        assert bytes(t.bytes).decode() == t.token
        assert len(t.top_logprobs) == 3
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-4)  # greedy: the best one
    plain = chat(openai_client, temperature=0, max_tokens=8, logprobs=True)
    assert all(t.top_logprobs == [] for t in plain.choices[0].logprobs.content)
    assert chat(openai_client, temperature=0, max_tokens=8).choices[0].logprobs is None


def test_completion_logprobs_list_the_chosen_token_and_alternatives(openai_client):
    choice = complete(openai_client, prompt=COUNT, max_tokens=5, temperature=0, logprobs=2).choices[0]
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top[token] == logprob and len(top) == 2  # greedy: the chosen token is the best


def test_echo_with_zero_max_tokens_scores_the_prompt(openai_client):
    choice = complete(openai_client, prompt=COUNT, max_tokens=0, echo=True, logprobs=1)
    c = choice.choices[0]
    assert c.text == COUNT and c.finish_reason == "length"
    assert "".join(c.logprobs.tokens) == COUNT
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    assert all(x < 0 for x in c.logprobs.token_logprobs[1:])
    assert choice.usage.completion_tokens == 0


def test_echo_prepends_the_prompt(openai_client, greedy):
    echoed = complete(openai_client, prompt=COUNT, max_tokens=16, temperature=0, echo=True).choices[0].text
    assert echoed == COUNT + greedy["count"]


# ---- prompts and messages ------------------------------------------------------------------------


def test_every_prompt_form_gives_the_same_greedy_text(openai_client, tokenizer):
    ids = tokenizer.encode(COUNT)
    expected = complete(openai_client, prompt=COUNT, max_tokens=4, temperature=0)
    assert expected.usage.prompt_tokens == len(ids)
    text = expected.choices[0].text
    strings = complete(openai_client, prompt=[COUNT, "The sea is"], max_tokens=4, temperature=0)
    assert [c.index for c in strings.choices] == [0, 1] and strings.choices[0].text == text
    assert strings.choices[1].text != text
    assert complete(openai_client, prompt=ids, max_tokens=4, temperature=0).choices[0].text == text
    lists = complete(openai_client, prompt=[ids, ids[:-2]], max_tokens=4, temperature=0)
    assert lists.choices[0].text == text and lists.usage.prompt_tokens == 2 * len(ids) - 2
    echoed = complete(openai_client, prompt=ids, max_tokens=0, echo=True)
    assert echoed.choices[0].text == COUNT


def test_developer_role_text_parts_and_user_field(openai_client, greedy):
    system = [{"role": "system", "content": "You answer in French."}, *SEA]
    developer = [{"role": "developer", "content": "You answer in French."}, *SEA]
    parts = [
        {"role": "system", "content": [{"type": "text", "text": "You answer in French."}]},
        {"role": "user", "content": [{"type": "text", "text": SEA[0]["content"]}]},
    ]
    expected = text_of(chat(openai_client, messages=system, temperature=0, max_tokens=8))
    assert text_of(chat(openai_client, messages=developer, temperature=0, max_tokens=8, user="u-1")) == expected
    assert text_of(chat(openai_client, messages=parts, temperature=0, max_tokens=8)) == expected
    assert not greedy["chat"].startswith(expected)


def test_assistant_turns_are_part_of_the_conversation(openai_client, greedy):
    turns = [*SEA, {"role": "assistant", "content": "The sea is blue."}, {"role": "user", "content": "Again."}]
    assert not greedy["chat"].startswith(text_of(chat(openai_client, messages=turns, temperature=0, max_tokens=8)))
