"""The two real bundled models against Hugging Face `transformers` running the same weights.

SmolLM2-135M-Instruct (Llama architecture, Q4_1) and Gemma 3 270M (Q4_K and others) are loaded
from their GGUF files with `models.loader.load_model`; the reference is a float32 `transformers`
model (eager attention) built from our GGUF reader's output, so both sides run exactly the same
dequantized weights (that those equal transformers' own GGUF loading is `tests/test_gguf.py`'s
job). Both sides decode greedily through a KV cache: ours is tests/forward_loop.py's loop (one
prefill, then one-token steps on the paged cache), theirs `generate(do_sample=False)`.

That the SmolLM2 chat template renders a multi-turn conversation exactly as transformers does is
checked in `tests/test_tokenizer.py` (`test_smollm2_chat_template_matches_transformers`); the
chat-formatted prompts below check that the model then continues them identically.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from models.loader import LoadedModel
from tests.forward_loop import greedy_generate, prompt_logits
from tests.hf_reference import hf_greedy, hf_reference, one_torch_thread

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = pytest.mark.slow  # the real models against transformers

NEW_TOKENS = 32
Prompt = str | list[dict[str, str]]  # text, or chat messages for the template
# Of equal length in tokens per model: transformers generates them as one batch without padding,
# and ours share one compiled prefill and one decode step.
PROMPTS: dict[str, list[Prompt]] = {
    "smollm2-135m-instruct": [  # an instruct model: chat-formatted, 37 tokens each
        [{"role": "user", "content": "Name three colours of the rainbow."}],
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "How do I boil an egg?"}],
    ],
    "gemma3-270m": [  # a base model without a chat template: plain text, 6 tokens each
        "The capital of France is",
        "My favourite programming language is",
        "import numpy as np\n",
    ],
}


def _ids(model: LoadedModel, prompt: Prompt) -> list[int]:
    tok = model.tokenizer
    return tok.encode(prompt) if isinstance(prompt, str) else tok.encode_chat(prompt)


@pytest.fixture(scope="module", params=list(PROMPTS))
def real(request) -> Iterator[tuple[LoadedModel, Any]]:
    """(our model, the transformers reference with the same weights); each loaded once."""
    # shared with the engine tests and the default servers' references (tests/conftest.py)
    fixture = "smol_model" if request.param == "smollm2-135m-instruct" else "gemma3_model"
    model = request.getfixturevalue(fixture)
    hf = hf_reference(model)  # the GGUF file read again for it (3.5 s for Gemma 3; a whole load takes 14 s)
    with one_torch_thread():
        yield model, hf


@functools.cache
def _hf_greedy(hf: Any, prompts: tuple[tuple[int, ...], ...]) -> list[list[int]]:
    """transformers' greedy continuations, generated once per model and shared by the tests."""
    return hf_greedy(hf, [list(p) for p in prompts], NEW_TOKENS)


def _hf_logits(hf: Any, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


def test_prompt_logits_match_transformers(real):
    model, hf = real
    ids = _ids(model, PROMPTS[model.name][0])
    ours, ref = prompt_logits(model, ids, NEW_TOKENS), _hf_logits(hf, ids)
    assert ours.shape == ref.shape
    rel_err = float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))
    assert rel_err < 1e-4, f"{model.name}: relative logits error {rel_err:.2e}"


def test_greedy_continuation_matches_transformers(real):
    model, hf = real
    prompts = [_ids(model, p) for p in PROMPTS[model.name]]
    refs = _hf_greedy(hf, tuple(map(tuple, prompts)))  # end-of-sequence stops neither side
    for prompt, ids, ref in zip(PROMPTS[model.name], prompts, refs, strict=True):
        ours = greedy_generate(model, ids, NEW_TOKENS)
        if ours != ref:
            i = next(i for i, (a, b) in enumerate(zip(ours, ref, strict=True)) if a != b)
            top2 = np.sort(_hf_logits(hf, ids + ref[:i])[-1])[-2:]
            pytest.fail(
                f"{model.name}, prompt {prompt!r}: first difference at token {i} (ours {ours[i]}, "
                f"transformers {ref[i]}; transformers' top-2 logit margin there {top2[1] - top2[0]:.2e})\n"
                f"ours:         {model.tokenizer.decode(ours)!r}\n"
                f"transformers: {model.tokenizer.decode(ref)!r}"
            )


# (the unrolled loop and unchunked prefill against transformers: every architecture in
# tests/test_parity_tiny.py; compiling Gemma 3 unrolled here took ~35 s of the suite)
@pytest.mark.parametrize(("chunk", "loop"), [(4, "auto")], ids=["chunked-default-loop"])
def test_engine_greedy_matches_transformers(real, chunk, loop):
    """Through the whole engine (paged prefill in chunks of 4 tokens, decode steps of the batch),
    with the backend's default layer loop, with and without prompt logprobs: transformers' tokens."""
    from graph.api import EngineConfig, SamplingParams
    from graph.offline import LLM

    model, hf = real
    if model.name == "smollm2-135m-instruct":
        pytest.skip("SmolLM2 through the engine: tests/test_engine.py (64 tokens, batch independence)")
    prompts = [_ids(model, p) for p in PROMPTS[model.name]]
    refs = _hf_greedy(hf, tuple(map(tuple, prompts)))
    seq = 128 if len(prompts[0]) + NEW_TOKENS <= 128 else 256
    # One prefill bucket and no mixed steps: an unrolled executable takes long to compile
    config = EngineConfig(
        max_batch=4, max_seq_len=seq, min_context_tokens=seq, min_prefill_tokens=chunk, max_prefill_tokens=chunk,
        max_num_batched_tokens=0, kv_pages=4 * seq // 16 + 1, layer_loop=loop,
    )  # fmt: skip
    llm = LLM(model, config)
    try:
        for prompt_logprobs in (None, 1):
            params = SamplingParams(
                max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, prompt_logprobs=prompt_logprobs
            )
            out = llm.generate(prompts, params)
            assert [c.token_ids for c in out] == refs, f"{model.name}, prompt_logprobs={prompt_logprobs}"
            if prompt_logprobs:  # log p(prompt[t+1] | prompt[:t+1]), from transformers' logits
                shifted = _hf_logits(hf, prompts[0]) - _hf_logits(hf, prompts[0]).max(-1, keepdims=True)
                logprobs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
                want = [logprobs[i, t] for i, t in enumerate(prompts[0][1:])]
                got = [lp.logprob for lp in out[0].prompt_logprobs[1:]]
                np.testing.assert_allclose(got, want, atol=1e-3)
    finally:
        llm.shutdown()
