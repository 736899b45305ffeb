"""The Hugging Face `transformers` reference (needs torch): a float32 model holding the same
weights as ours, its greedy continuations, and `load_with_checkpoint`, which keeps the GGUF
checkpoint `load_model` reads so a GGUF file is dequantized once for both sides. Used by the
parity tests and by `scripts/bench_offline.py`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from models.loader import LoadedModel, load_model


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """transformers on one thread: with any other load on a 2-core machine, two OpenMP threads that
    spin-wait for each other make its small decode matmuls 2-15x slower (measured: Gemma's three
    greedy continuations took 15-71 s with two threads, 9-11 s with one; SmolLM2's 64 tokens, 17 s
    alone and 257 s beside another process)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _keep_gguf_checkpoint(kept: list) -> Iterator[None]:
    """Let `load_model` hand us the `GGUFCheckpoint` it reads, so a GGUF file is dequantized once."""
    import models.gguf

    original = models.gguf.read_gguf

    def reading(*args, **kwargs):
        kept.append(original(*args, **kwargs))
        return kept[-1]

    models.gguf.read_gguf = reading
    try:
        yield
    finally:
        models.gguf.read_gguf = original


def load_with_checkpoint(source: str, dtype: str = "float32") -> tuple[LoadedModel, Any]:
    """`load_model(source)` and, for a GGUF model, the `GGUFCheckpoint` (HF config + float32
    tensors in HF layout) its weights came from; None for a Hugging Face directory."""
    kept: list = []
    with _keep_gguf_checkpoint(kept):
        model = load_model(source, dtype)
    if model.path.is_dir():
        return model, None
    if not kept:  # the loader changed how it reads GGUF: read it again
        from models.gguf import read_gguf

        kept.append(read_gguf(model.path))
    return model, kept[-1]


def hf_reference(model: LoadedModel, checkpoint: Any = None) -> Any:
    """A float32 `transformers` model (eager attention) with the same weights as `model`.

    For a GGUF model, built from our GGUF reader's output (`checkpoint`, or the file read again):
    `AutoConfig.for_model(**hf_config)` plus its tensors, which share memory with the torch model.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    if model.path.is_dir():
        return AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.float32, attn_implementation="eager").eval()
    if checkpoint is None:
        from models.gguf import read_gguf

        checkpoint = read_gguf(model.path)
    cfg = AutoConfig.for_model(**checkpoint.hf_config)
    cfg._attn_implementation = "eager"
    with no_init_weights():  # every weight is assigned below: skip the slow random init
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    state = {name: torch.from_numpy(w) for name, w in checkpoint.tensors.items()}
    result = hf.load_state_dict(state, strict=False, assign=True)
    missing = set(result.missing_keys) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    if missing or result.unexpected_keys:
        raise ValueError(
            f"weights do not fit {type(hf).__name__}: missing {missing}, unexpected {result.unexpected_keys}"
        )
    hf.tie_weights()  # `assign` replaced the embedding: point the tied lm_head at the new one
    return hf


def hf_greedy(hf: Any, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, exactly `max_tokens` long (end-of-sequence
    neither stops nor is suppressed). Prompts of equal length run as one batch, without padding."""
    import torch

    out: dict[int, list[int]] = {}
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for rows in by_length.values():
        ids = torch.tensor([prompts[i] for i in rows])
        with torch.no_grad():
            generated = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_tokens,
                eos_token_id=None,
                pad_token_id=0,
            )[:, ids.shape[1] :]
        if generated.shape[1] != max_tokens:
            raise RuntimeError(f"transformers generated {generated.shape[1]} tokens, not {max_tokens}")
        out |= dict(zip(rows, generated.tolist(), strict=True))
    return [out[i] for i in range(len(prompts))]
