"""The offline Python API: generate a batch of prompts without HTTP.

llm = LLM("smollm2-135m-instruct", EngineConfig(max_batch=8, max_seq_len=512))
[c.text for c in llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))]

A batch is queued at once and nobody would retry a refusal, so the engine of the offline API does
not shed requests by expected wait (`max_queue_wait` is the server's bound).
"""

from __future__ import annotations

import asyncio
import dataclasses

from graph.api import EngineConfig, RequestOutput, SamplingParams, TokenLogprob
from graph.engine import Engine
from models.loader import LoadedModel, load_model


@dataclasses.dataclass
class Completion:
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


class LLM:
    def __init__(self, model: str | LoadedModel | None = None, config: EngineConfig | None = None):
        config = dataclasses.replace(config or EngineConfig(), max_queue_wait=0)
        self.model = (
            model if isinstance(model, LoadedModel) else load_model(model, config.dtype, config.tokenizer_cache())
        )
        self.engine = Engine.create(self.model, config)

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def generate(
        self, prompts: list[str] | list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[Completion]:
        """Run every prompt (text, or token ids) to completion; results in prompt order."""
        params = params or SamplingParams()
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        ids = [p if isinstance(p, list) else self.tokenizer.encode(p) for p in prompts]
        return asyncio.run(self._run(ids, per_prompt))

    async def _run(self, ids: list[list[int]], params: list[SamplingParams]) -> list[Completion]:
        with self.engine.together():
            streams = [self.engine.submit(i, p) for i, p in zip(ids, params, strict=True)]
        return list(await asyncio.gather(*(_collect(i, s) for i, s in zip(ids, streams, strict=True))))

    def shutdown(self) -> None:
        self.engine.shutdown(timeout=0)


async def _collect(prompt_ids: list[int], stream) -> Completion:
    c = Completion(prompt_ids, "", [], None)
    out: RequestOutput
    async for out in stream:
        c.text += out.text
        c.token_ids += out.token_ids
        if out.logprobs is not None:
            c.logprobs = (c.logprobs or []) + out.logprobs
        if out.prompt_logprobs is not None:
            c.prompt_logprobs = out.prompt_logprobs
        c.finish_reason = out.finish_reason
        if out.error:
            raise RuntimeError(out.error)
    return c
