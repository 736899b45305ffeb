"""Tokenizers from GGUF metadata, chat templates, incremental detokenization and stop strings.

Our GGUF tokenizers must encode, decode and render chat templates exactly as transformers' own
GGUF tokenizers do, and load without torch. The incremental detokenizer's deltas must add up to
`decode(all ids)` whatever the ids, and the stop matcher must never leak any part of a stop string.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from models.errors import ModelLoadError
from models.tokenizer import (
    ChatTemplateError,
    IncrementalDetokenizer,
    NoChatTemplateError,
    StopMatcher,
    Tokenizer,
    load_tokenizer,
)

# the real models and transformers' view of them: smollm2_gguf, gemma3_gguf, hf_smollm2, hf_gemma3
pytest_plugins = ("tests.fixtures_models",)

TRICKY = [
    "Hello world",
    "",
    " leading space",
    "trailing spaces   ",
    "multiple    spaces\tand\ttabs",
    "new\nlines\n\n\nand\r\nCRLF",
    "héllo wörld, ñ, Ω, ß, ẞ, ﬁ, ①",
    "e\u0301 combining, \u200b zero width, \ufeff BOM",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇯🇵",
    "日本語のテキスト、中文，한국어",
    "code: def f(x):\n    return x**2  # 12345 3.14159",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "<bos><eos><start_of_turn>user\nhi<end_of_turn>",
    "<|im_start|>",
    "   ",
]
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi! 😀"},
    {"role": "assistant", "content": "Hello.\nHow can I help?"},
    {"role": "user", "content": "What is 2+2?"},
]


@pytest.fixture(scope="module")
def tokenizer_cache(tmp_path_factory) -> Path:
    """Where the module's tokenizers keep their conversions (each model's first load converts)."""
    return tmp_path_factory.mktemp("tokenizers")


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf, tokenizer_cache) -> Tokenizer:
    return load_tokenizer(smollm2_gguf, eos_token_ids=(2,), cache_dir=tokenizer_cache)


@pytest.fixture(scope="module")
def gemma3(gemma3_gguf, tokenizer_cache) -> Tokenizer:
    return load_tokenizer(gemma3_gguf, eos_token_ids=(1, 106), cache_dir=tokenizer_cache)


MODELS = ["smollm2", "gemma3"]


# --- against transformers ---------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_encode_and_decode_match_transformers(model, request):
    ours, ref = request.getfixturevalue(model), request.getfixturevalue(f"hf_{model}").tokenizer
    for text in TRICKY:
        for special in (True, False):
            expected = ref.encode(text, add_special_tokens=special)
            assert ours.encode(text, add_special_tokens=special) == expected, (text, special)
        ids = ref.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert ours.vocab_size == len(ref)
    assert ours.bos_token_id == ref.bos_token_id


def test_smollm2_chat_template_matches_transformers(smollm2, hf_smollm2):
    assert smollm2.has_chat_template
    for generation_prompt in (True, False):
        expected = hf_smollm2.tokenizer.apply_chat_template(
            CONVERSATION, tokenize=False, add_generation_prompt=generation_prompt
        )
        assert smollm2.apply_chat_template(CONVERSATION, add_generation_prompt=generation_prompt) == expected
    rendered = smollm2.apply_chat_template(CONVERSATION)
    assert rendered.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")
    assert rendered.endswith("<|im_start|>assistant\n")
    assert smollm2.encode_chat(CONVERSATION) == smollm2.encode(rendered, add_special_tokens=False)


def test_gemma3_base_has_no_chat_template(gemma3):
    assert not gemma3.has_chat_template
    with pytest.raises(NoChatTemplateError, match="no chat template") as info:
        gemma3.apply_chat_template(CONVERSATION)
    assert isinstance(info.value, ValueError)


def test_template_errors_are_value_errors(smollm2):
    template = smollm2.hf.chat_template
    smollm2.hf.chat_template = "{{ raise_exception('roles must alternate user/assistant') }}"
    try:
        with pytest.raises(ChatTemplateError, match="roles must alternate") as info:
            smollm2.apply_chat_template(CONVERSATION)
        assert isinstance(info.value, ValueError)
    finally:
        smollm2.hf.chat_template = template


def test_special_ids(smollm2, gemma3):
    assert smollm2.eos_token_ids == (2,)  # <|im_end|>: the file's eos, and the config's
    assert smollm2.bos_token_id == 1
    assert smollm2.encode("Hi") == smollm2.encode("Hi", add_special_tokens=False)  # no BOS for SmolLM2
    assert gemma3.eos_token_ids == (1, 106)  # <eos>, then the extra id passed in
    assert gemma3.encode("Hi")[0] == gemma3.bos_token_id == 2  # Gemma adds BOS
    assert gemma3.convert_ids_to_tokens([2, 1]) == ["<bos>", "<eos>"]


def test_gguf_tokenizers_load_without_torch(smollm2_gguf, gemma3_gguf, smollm2, gemma3):
    script = (
        "import json, sys\n"
        "sys.modules['torch'] = None  # any `import torch` now fails\n"
        "from models.tokenizer import load_tokenizer\n"
        "out = [load_tokenizer(p).encode(sys.argv[3]) for p in sys.argv[1:3]]\n"
        "assert 'transformers.modeling_utils' not in sys.modules\n"
        "print(json.dumps(out))\n"
    )
    text = "Streaming 😀 日本語 tokens"
    result = subprocess.run(
        [sys.executable, "-c", script, str(smollm2_gguf), str(gemma3_gguf), text],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == [smollm2.encode(text), gemma3.encode(text)]


@pytest.mark.parametrize("model", MODELS)
def test_gguf_tokenizer_cache_gives_the_same_tokenizer(model, request, tokenizer_cache, caplog):
    """A GGUF tokenizer read back from its cache (any load after the fixture's, which converted the
    file and kept the result) is the converted one: same ids, text, special tokens and template."""
    converted = request.getfixturevalue(model)
    with caplog.at_level("INFO", logger="models.tokenizer"):
        tok = load_tokenizer(converted.name, eos_token_ids=converted.eos_token_ids, cache_dir=tokenizer_cache)
    assert "converted tokenizer from" in caplog.text
    for text in TRICKY:
        ids = converted.encode(text)
        assert tok.encode(text) == ids and tok.decode(ids) == converted.decode(ids), text
        assert tok.encode(text, add_special_tokens=False) == converted.encode(text, add_special_tokens=False)
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_ids) == (
        converted.vocab_size, converted.bos_token_id, converted.eos_token_ids
    )  # fmt: skip
    assert tok.special_ids == converted.special_ids and tok.byte_fallback_ids == converted.byte_fallback_ids
    assert tok.hf.chat_template == converted.hf.chat_template
    if converted.has_chat_template:
        assert tok.apply_chat_template(CONVERSATION) == converted.apply_chat_template(CONVERSATION)


def test_damaged_gguf_tokenizer_cache_is_converted_again(smollm2, tmp_path, caplog):
    cache = tmp_path / "tokenizers"
    load_tokenizer(smollm2.name, cache_dir=cache)
    (entry,) = cache.iterdir()
    (entry / "tokenizer.json").write_text("{not json")
    with caplog.at_level("INFO", logger="models.tokenizer"):
        for _ in range(2):  # converted again and written back, then read back
            assert load_tokenizer(smollm2.name, cache_dir=cache).encode(TRICKY[6]) == smollm2.encode(TRICKY[6])
    assert caplog.text.count("does not read back") == 1 and caplog.text.count("converted tokenizer from") == 1
    assert [e.name for e in cache.iterdir()] == [entry.name]  # in place, nothing left over


def test_hugging_face_directory(tmp_path, smollm2):
    smollm2.hf.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    for text in TRICKY:
        assert loaded.encode(text) == smollm2.encode(text)
    assert loaded.apply_chat_template(CONVERSATION) == smollm2.apply_chat_template(CONVERSATION)


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(ModelLoadError, match="file not found") as info:
        load_tokenizer(tmp_path / "missing.gguf")
    assert str(tmp_path / "missing.gguf") in str(info.value)


# --- incremental detokenization ---------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int], rng: random.Random, skip: bool = True, prompt=()) -> list[str]:
    """Feed `ids` in chunks of 1-3; every delta, and the final flush, in order."""
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt, skip_special_tokens=skip)
    deltas, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 3)
        deltas.append(detok.feed(ids[i : i + n] if n > 1 else ids[i]))
        assert not deltas[-1].endswith("\ufffd")  # never half a character
        i += n
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("model", MODELS)
def test_deltas_add_up_to_decode_for_random_ids(model, request):
    tok: Tokenizer = request.getfixturevalue(model)
    rng = random.Random(model)
    byte_ids = sorted(tok.byte_fallback_ids)
    special = sorted(tok.special_ids)
    for trial in range(100):
        n = rng.randint(1, 30)
        if trial % 3 == 2 and byte_ids:  # mostly byte tokens: valid and invalid UTF-8 runs
            ids = [rng.choice(byte_ids) if rng.random() < 0.7 else rng.randrange(tok.vocab_size) for _ in range(n)]
        else:
            ids = [rng.choice(special) if rng.random() < 0.1 else rng.randrange(tok.vocab_size) for _ in range(n)]
        for skip in (True, False):
            assert "".join(_stream(tok, ids, rng, skip)) == tok.decode(ids, skip_special_tokens=skip), ids


@pytest.mark.parametrize("model", MODELS)
def test_deltas_of_emoji_and_cjk_text(model, request):
    tok: Tokenizer = request.getfixturevalue(model)
    rng = random.Random(0)
    for text in [*TRICKY, " ".join(TRICKY) * 3]:
        ids = tok.encode(text)
        deltas = _stream(tok, ids, rng)
        assert "".join(deltas) == tok.decode(ids)
    # a 4-byte character split over several tokens comes out whole, never in pieces
    ids = tok.encode("🦩", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.feed(i) for i in ids] + [detok.feed(tok.encode(" ok", add_special_tokens=False))]
    if model == "gemma3":  # 4 byte-fallback tokens, held until a token that is not a byte ends the run
        assert all(i in tok.byte_fallback_ids for i in ids) and len(ids) == 4
        assert deltas == ["", "", "", "", "🦩 ok"]
    else:  # SmolLM2's byte-level BPE: 3 tokens, given out as soon as the character is complete
        assert not tok.byte_fallback_ids and len(ids) == 3
        assert deltas == ["", "", "🦩", " ok"]


@pytest.mark.parametrize("model", MODELS)
def test_prompt_gives_context(model, request):
    tok: Tokenizer = request.getfixturevalue(model)
    prompt = tok.encode("The answer is")
    generated = tok.encode(" forty-two, 四十二 🎉.", add_special_tokens=False)
    deltas = _stream(tok, generated, random.Random(1), prompt=prompt)
    full, head = tok.decode(prompt + generated), tok.decode(prompt)
    assert "".join(deltas) == full[len(head) :]


def test_detokenizer_decodes_a_small_window(smollm2):
    """Each step decodes a few recent ids, not the whole sequence (which would be quadratic)."""
    lengths = []

    class Counting(Tokenizer):
        def decode(self, ids, skip_special_tokens=True):
            lengths.append(len(ids))
            return super().decode(ids, skip_special_tokens)

    tok = Counting(smollm2.hf)
    ids = smollm2.encode("Stream me, please: 日本語 😀 " * 60)
    detok = IncrementalDetokenizer(tok)
    text = "".join(detok.feed(i) for i in ids) + detok.flush()
    assert text == smollm2.decode(ids)
    assert len(ids) > 500 and max(lengths) <= 8


# --- stop strings ------------------------------------------------------------------------------


def _run(stop: list[str], deltas: list[str]) -> tuple[list[str], bool]:
    matcher, out = StopMatcher(stop), []
    for delta in deltas:
        text, stopped = matcher.feed(delta)
        out.append(text)
        if stopped:
            return out, True
    out.append(matcher.flush())
    return out, False


def test_stop_string_split_across_deltas():
    out, stopped = _run(["STOP"], ["Hello S", "T", "OP and more"])
    assert stopped and out == ["Hello ", "", ""]


def test_stop_at_start():
    assert _run(["###"], ["###", "never"]) == ([""], True)
    assert _run(["\n\n"], ["\n", "\nafter"]) == (["", ""], True)


def test_no_stop():
    out, stopped = _run(["END"], ["a lot ", "of E", "Nd", " text E", "N"])
    assert not stopped and out == ["a lot ", "of ", "ENd", " text ", "", "EN"]  # "E", "EN" held, then flushed


def test_stop_inside_a_word_is_still_a_stop():
    out, stopped = _run(["END"], ["a lot ", "of E", "ND-less"])
    assert stopped and "".join(out) == "a lot of "


def test_multiple_stop_strings_first_occurrence_wins():
    out, stopped = _run(["world", "lo w"], ["hello world"])
    assert stopped and "".join(out) == "hel"
    out, stopped = _run(["</s>", "\nUser:"], ["Sure.\nUs", "er: hi </s>"])
    assert stopped and "".join(out) == "Sure."


def test_overlapping_prefixes_are_held_back_only_while_possible():
    matcher = StopMatcher(["abc", "bcd"])
    assert matcher.feed("xab") == ("x", False)  # "ab" may become "abc"
    assert matcher.feed("c") == ("", True)  # ... and does
    matcher = StopMatcher(["abc", "bcd"])
    assert matcher.feed("xab") == ("x", False)
    assert matcher.feed("x") == ("abx", False)  # no longer a prefix of either
    assert matcher.feed("bc") == ("", False)  # "bc" may become "bcd"
    assert matcher.flush() == "bc"
    matcher = StopMatcher(["aab"])
    assert matcher.feed("aaa") == ("a", False)  # keeps "aa": the longest suffix that can start "aab"
    assert matcher.feed("b") == ("", True)


def test_after_a_stop_nothing_more_comes_out():
    matcher = StopMatcher(["x"])
    assert matcher.feed("abxcd") == ("ab", True)
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""


def test_empty_stop_list_passes_everything_through():
    matcher = StopMatcher(["", ""])
    assert matcher.feed("anything") == ("anything", False)
    assert matcher.flush() == ""


def test_detokenizer_and_stop_matcher_together(smollm2):
    ids = smollm2.encode("The capital of France is Paris.\n\nQuestion: and of Japan?")
    detok, stops, out = IncrementalDetokenizer(smollm2), StopMatcher(["\n\nQuestion:"]), []
    for token_id in ids:
        text, stopped = stops.feed(detok.feed(token_id))
        out.append(text)
        if stopped:
            break
    assert stopped and "".join(out) == "The capital of France is Paris."
