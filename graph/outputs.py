"""From sampled token ids to `RequestOutput` deltas: finish conditions (end tokens, stop token
ids, stop strings, a complete grammar, max_tokens, context length), incremental detokenization
that never splits a UTF-8 character, stop strings that are never shown, and logprobs.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from graph.api import RequestOutput, TokenLogprob
from graph.scheduler import Chunk, Sequence
from models.config import ModelConfig
from models.tokenizer import IncrementalDetokenizer, StopMatcher, Tokenizer


@dataclasses.dataclass
class _State:
    detok: IncrementalDetokenizer
    stop: StopMatcher
    prompt_logprobs: list[TokenLogprob | None] | None = None
    first_sent: bool = False


def _logprob(token: int, logprob: float, top_ids: np.ndarray, top_lps: np.ndarray, k: int) -> TokenLogprob:
    top = tuple((int(i), float(lp)) for i, lp in zip(top_ids[:k], top_lps[:k], strict=True))
    return TokenLogprob(int(token), float(logprob), top)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, cfg: ModelConfig, max_seq_len: int):
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(tokenizer.eos_token_ids) | frozenset(cfg.eos_token_ids)
        self.max_seq_len = max_seq_len

    def _state(self, seq: Sequence) -> _State:
        if seq.state is None:
            p = seq.params
            detok = IncrementalDetokenizer(self.tokenizer, seq.prompt, skip_special_tokens=p.skip_special_tokens)
            seq.state = _State(detok, StopMatcher(p.stop))
        return seq.state

    def suppressed(self, seq: Sequence) -> tuple[int, ...]:
        """End tokens the sampler must not pick yet (before min_tokens)."""
        if len(seq.output) >= seq.params.min_tokens:
            return ()
        return tuple(sorted(self.eos_ids | set(seq.params.stop_token_ids)))

    def prompt_logprobs(self, seq: Sequence, step: Chunk, prompt, at: int) -> None:
        """Collect the prompt logprobs a prefill chunk computed, its tokens from `at` on in the
        step's row (the first token of a prompt has none)."""
        k = seq.params.prompt_logprobs
        if k is None:  # a preempted request's prefill again fills (and overwrites) what it had
            return
        state = self._state(seq)
        if state.prompt_logprobs is None:
            state.prompt_logprobs = [None] * len(seq.prompt)
        for i in range(step.length):
            pos = step.start + i + 1
            if pos < len(seq.prompt):
                state.prompt_logprobs[pos] = _logprob(
                    seq.prompt[pos], prompt.logprob[0, at + i], prompt.top_ids[0, at + i],
                    prompt.top_logprobs[0, at + i], k,
                )  # fmt: skip

    def accept(self, seq: Sequence, sample, row: int) -> RequestOutput:
        """Resolve the sequence's oldest unresolved token as the one sampled for `row` and return
        the request's delta; a finish drops the tokens sampled after it (steps in flight)."""
        p, state = seq.params, self._state(seq)
        if p.max_tokens == 0:  # echo-only scoring: nothing is generated
            return self._delta(seq, state, "", [], None, "length")
        token = int(sample.token[row])
        known = seq.resolve(token)
        logprobs = None
        if p.logprobs is not None:
            logprobs = [_logprob(token, sample.logprob[row], sample.top_ids[row], sample.top_logprobs[row], p.logprobs)]
        finish, text, error = None, "", None
        if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            finish = "stop"  # the end token itself is not shown
        else:
            text, stopped = state.stop.feed(state.detok.feed(token))
            finish = "stop" if stopped else None
            if finish is None and seq.grammar is not None:  # its mask let only allowed tokens through
                finish, error = seq.grammar.accept(seq.output[:known])
        if finish is None and (known >= p.max_tokens or len(seq.prompt) + known >= self.max_seq_len):
            finish = "length"
        if finish is not None:
            seq.forget_unresolved()
        if finish is not None and not state.stop.stopped:
            tail, stopped = state.stop.feed(state.detok.flush())
            text += tail + ("" if stopped else state.stop.flush())
        out = self._delta(seq, state, text, [token], logprobs, finish)
        out.error = error
        return out

    def _delta(self, seq, state: _State, text, tokens, logprobs, finish) -> RequestOutput:
        out = RequestOutput(
            request_id=seq.request_id,
            text=text,
            token_ids=tokens,
            logprobs=logprobs,
            finish_reason=finish,
            prompt_tokens=len(seq.prompt),
            cached_tokens=seq.cached,
            completion_tokens=len(seq.output) - seq.unresolved,
        )
        if not state.first_sent:
            state.first_sent = True
            out.prompt_logprobs = state.prompt_logprobs
        return out

    def final(self, seq: Sequence, reason: str, error: str | None) -> RequestOutput:
        """The closing delta of a request ended from outside (shutdown, engine error)."""
        out = self._delta(seq, self._state(seq), "", [], None, reason)
        out.error = error
        return out


def merged(deltas: list[RequestOutput]) -> RequestOutput:
    """Consecutive deltas of one request as one (a speculative step's tokens)."""
    if len(deltas) == 1:
        return deltas[0]
    first, last = deltas[0], deltas[-1]
    return dataclasses.replace(
        last,
        text="".join(d.text for d in deltas),
        token_ids=[t for d in deltas for t in d.token_ids],
        logprobs=None if first.logprobs is None else [e for d in deltas for e in d.logprobs or ()],
        prompt_logprobs=first.prompt_logprobs,
    )
