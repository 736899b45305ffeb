"""Quality of a numeric path on a fixed text (tests/data/quality_text.txt, teacher-forced through
the engine's prompt logprobs): its perplexity and top-1 prediction at every position. The gate
(tests/test_quality.py) and `scripts/quality.py` compare each path with float32.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

from graph.api import EngineConfig, SamplingParams
from graph.offline import LLM
from models.loader import LoadedModel, load_model

TEXT = Path(__file__).resolve().parent / "data" / "quality_text.txt"
PATHS = {
    "float32": {},
    "bfloat16": {"dtype": "bfloat16"},
    "int8": {"quantize": "int8"},
    "kv-bfloat16": {"kv_cache_dtype": "bfloat16"},  # float32 weights and activations, a bfloat16 KV cache
}


@functools.lru_cache(maxsize=2)
def _model(model_name: str, dtype: str) -> LoadedModel:
    """A model loaded once for the paths that share its weights' dtype (float32 for the reference,
    int8 and the bfloat16 KV cache: 5-8 s a load on 2 cores)."""
    return load_model(model_name, dtype)


def score(model_name: str, path: str) -> tuple[float, list[int]]:
    """(perplexity, top-1 predicted id at every position) of the fixed text on one numeric path."""
    options = PATHS[path]
    model = _model(model_name, options.get("dtype", "float32"))
    ids = model.tokenizer.encode(TEXT.read_text())
    seq = -(-(len(ids) + 1) // 256) * 256
    # no start-up warm-up: one request, whose speed does not count
    config = EngineConfig(
        max_batch=1, max_seq_len=seq, min_prefill_tokens=512, max_prefill_tokens=512, min_context_tokens=seq,
        kv_pages=seq // 16 + 1, warmup=False, **options,
    )  # fmt: skip
    llm = LLM(model, config)
    try:
        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1)
        lps = llm.generate([ids], params)[0].prompt_logprobs[1:]
    finally:
        llm.shutdown()
    return math.exp(-sum(lp.logprob for lp in lps) / len(lps)), [lp.top[0][0] for lp in lps]
