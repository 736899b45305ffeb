"""Quality gates of the non-default numeric paths: on a fixed text of over 2,000 tokens
(tests/data/quality_text.txt) run teacher-forced through the engine, each path's perplexity is
within 2% of float32's and its top-1 next-token prediction agrees with float32's at 95% or more
of the positions, for SmolLM2 and Gemma 3 270M."""

from __future__ import annotations

import functools

import pytest

from tests.quality_score import score

pytestmark = pytest.mark.slow  # 2,000 tokens through the real models on every numeric path

MODELS = [
    pytest.param("smollm2-135m-instruct", id="smollm2"),
    # 2.5 minutes of the suite: `make test-nightly` runs it, `make test` (CI) does not
    pytest.param("gemma3-270m", id="gemma3", marks=pytest.mark.nightly),
]


@functools.cache
def _reference(model: str) -> tuple[float, tuple[int, ...]]:
    ppl, top = score(model, "float32")
    return ppl, tuple(top)


@pytest.mark.parametrize("path", ["int8", "bfloat16", "kv-bfloat16"])
@pytest.mark.parametrize("model", MODELS)
def test_numeric_path_keeps_perplexity_and_top1(model, path):
    ref_ppl, ref_top = _reference(model)
    assert len(ref_top) >= 2000
    ppl, top = score(model, path)
    agreement = sum(a == b for a, b in zip(top, ref_top, strict=True)) / len(top)
    print(f"\n{model} {path}: perplexity {ppl:.3f} vs {ref_ppl:.3f} ({ppl / ref_ppl - 1:+.2%}), top-1 {agreement:.1%}")
    assert abs(ppl / ref_ppl - 1) <= 0.02
    assert agreement >= 0.95
