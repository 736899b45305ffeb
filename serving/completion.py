"""POST /v1/completions: prompt(s) -> engine -> `text_completion` (whole, or as a stream of chunks)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from graph.api import RequestOutput
from serving.generation import sse_frame
from serving.handler import Part, Reply
from serving.logprobs import CompletionLogprobsBuilder, TokenTexts, merge_completion_logprobs
from serving.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, UsageInfo

if TYPE_CHECKING:
    from graph.engine import Engine
    from serving.state import ServerState


class _ChoiceText:
    """Turns one choice's deltas into completion text (+ logprobs), echoing the prompt first."""

    def __init__(self, prompt_ids: list[int], echo_text: str | None, texts: TokenTexts, logprobs: bool) -> None:
        self._prompt_ids = prompt_ids
        self._echo_text = echo_text
        self._builder = CompletionLogprobsBuilder(texts) if logprobs else None

    def step(self, out: RequestOutput) -> tuple[str, CompletionLogprobs | None]:
        text, parts = out.text, []
        if self._echo_text is not None:
            text = self._echo_text + text
            self._echo_text = None
            if self._builder is not None:
                entries = out.prompt_logprobs or [None] * len(self._prompt_ids)
                parts.append(self._builder.build(self._prompt_ids, entries))
        if self._builder is None:
            return text, None
        if out.logprobs:
            parts.append(self._builder.build([e.token_id for e in out.logprobs], out.logprobs))
        return text, merge_completion_logprobs(parts)


class CompletionReply(Reply):
    id_prefix = "cmpl"
    prompt_param = "prompt"
    req: CompletionRequest

    def __init__(self, req: CompletionRequest, state: ServerState, engine: Engine) -> None:
        super().__init__(req, state, engine)
        # text prompts tokenized, token prompts as given (the engine checks their ids)
        self._prompts = [engine.tokenizer.encode(p) if isinstance(p, str) else p for p in req.prompts()]
        self._choices: dict[int, _ChoiceText] = {}

    def prompts(self) -> list[list[int]]:
        return self._prompts

    def max_tokens(self, prompts: list[list[int]]) -> int:
        return 16 if self.req.max_tokens is None else self.req.max_tokens

    def logprobs(self) -> tuple[int | None, int | None]:
        return self.req.logprobs, self.req.logprobs if self.req.echo else None

    def part(self, index: int, out: RequestOutput) -> Part:
        choice = self._choices.get(index)
        if choice is None:  # its first delta: choices were submitted n per prompt, in prompt order
            choice = self._choices[index] = self._choice_text(index // (self.req.n or 1))
        text, logprobs = choice.step(out)
        return Part(text, logprobs, out.finish_reason)

    def _choice_text(self, prompt_index: int) -> _ChoiceText:
        echo = None
        if self.req.echo:  # a token prompt's text only now: the engine has checked its ids
            prompt = self.req.prompts()[prompt_index]
            echo = prompt if isinstance(prompt, str) else self.engine.tokenizer.decode(prompt)
        return _ChoiceText(self._prompts[prompt_index], echo, self.token_texts, self.req.logprobs is not None)

    def frames(self, index: int, part: Part) -> Iterator[bytes]:
        """A chunk per part that says something (the first one of a choice starts with the echo)."""
        if part.text or (part.logprobs is not None and part.logprobs.tokens) or part.finish_reason is not None:
            choice = CompletionChoice(
                index=index, text=part.text, logprobs=part.logprobs, finish_reason=part.finish_reason
            )
            yield self.chunk([choice])

    def choice(self, index: int, parts: list[Part]) -> CompletionChoice:
        logprobs = None
        if self.req.logprobs is not None:
            logprobs = merge_completion_logprobs([p.logprobs for p in parts])
        text = "".join(p.text for p in parts)
        return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=parts[-1].finish_reason)

    def response(self, choices: list[CompletionChoice], usage: UsageInfo | None) -> CompletionResponse:
        return CompletionResponse(**self.envelope(), choices=choices, usage=usage)

    def chunk(self, choices: list[CompletionChoice], usage: UsageInfo | None = None) -> bytes:
        # Unlike chat chunks, text_completion ones have no null usage: it appears in the last one only.
        return sse_frame(self.response(choices, usage), exclude=None if usage is not None else {"usage"})
