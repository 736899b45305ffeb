"""Structured outputs: a request's grammar (JSON schema, regex, choice, Lark) as a token mask.

The grammar engine is llguidance: `Grammars.compile` turns a `StructuredSpec` into a matcher on
the caller's thread, at submit (a spec that does not compile is an `InvalidRequestError` there and
nothing is queued). Before each step the step thread asks each constrained row's matcher for the
tokens it allows, as a packed bitmask `[R, ceil(V/32)]` uint32 (bit `t % 32` of word `t // 32`:
token `t` allowed), which every executable applies to the logits before sampling and before the
logprobs (graph/sampling.py); unconstrained rows get all ones, so no shape changes. Each sampled
token then advances the row's matcher; a grammar that can take no more tokens ends the request.

The matcher follows the request's output tokens, which preemption keeps: a preempted request
carries its matcher to its re-prefill unchanged. A matcher that has seen another number of tokens
than the output holds (a step that failed between sampling and acceptance) is rebuilt from the
output before its next mask.
"""

from __future__ import annotations

import collections
import json
import threading
from collections.abc import Sequence

import llguidance
import llguidance.hf
import numpy as np
from llguidance.gbnf_to_lark import any_to_lark
from llguidance.numpy import fill_next_token_bitmask_par

from graph.api import InvalidRequestError, StructuredSpec
from models.tokenizer import Tokenizer

PARAM = "structured"  # the SamplingParams field an invalid spec is blamed on
ALL_ALLOWED = np.uint32(0xFFFFFFFF)
_CACHED_GRAMMARS = 64
# JSON as a person writes it on one line: a model that may put whitespace anywhere tends to
# spend its tokens on it (small models at some temperature loop on newlines)
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_text(spec: StructuredSpec) -> str:
    """The llguidance grammar of a spec (not checked yet); ValueError for a schema that is not JSON."""
    if spec.kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
    if spec.kind == "json_schema":
        try:
            schema = json.loads(spec.spec) if isinstance(spec.spec, str) else None
        except json.JSONDecodeError as e:
            raise ValueError(f"the JSON schema is not valid JSON: {e}") from e
        if not isinstance(schema, dict | bool):
            raise ValueError("the JSON schema must be a JSON object")
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(str(spec.spec))
    if spec.kind == "choice":
        choices = (spec.spec,) if isinstance(spec.spec, str) else spec.spec
        if not choices:
            raise ValueError("the choice needs at least one string")
        lark = "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
        return llguidance.LLMatcher.grammar_from_lark(lark)
    # a Lark grammar, or a GBNF one (llama.cpp's, as xgrammar takes it), which is converted
    return llguidance.LLMatcher.grammar_from_lark(any_to_lark(str(spec.spec)))


class Grammar:
    """One request's matcher, in step with its output tokens."""

    def __init__(self, compiled: llguidance.LLMatcher) -> None:
        self._compiled = compiled  # never advanced: the start state to rebuild from
        self._matcher = compiled.deep_copy()
        self._consumed = 0

    def sync(self, output: Sequence[int]) -> llguidance.LLMatcher:
        """The matcher, rebuilt from `output` if it has seen another number of tokens."""
        if self._consumed != len(output):
            self._matcher = self._compiled.deep_copy()
            self._matcher.consume_tokens(list(output))
            self._consumed = len(output)
        return self._matcher

    def accept(self, output: Sequence[int]) -> tuple[str | None, str | None]:
        """Advance over the newest token of `output` -> (finish reason, error): "stop" when the
        grammar takes no more tokens, "error" if the token broke it (a masked token was sampled)."""
        m = self.sync(output[:-1])
        m.consume_token(output[-1])
        self._consumed += 1
        if m.is_error():
            return "error", f"the output left its grammar: {m.get_error()}"
        return ("stop", None) if m.is_stopped() else (None, None)


class Grammars:
    """The engine's grammar compiler and mask writer: llguidance's view of the tokenizer (built on
    first use, about a second) and the compiled grammars of recent specs (n choices of a request,
    or clients that send the same schema each time, compile it once)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: Sequence[int]) -> None:
        self.words = -(-vocab_size // 32)
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos = sorted(eos_ids)
        self._lock = threading.Lock()
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._cache: collections.OrderedDict[StructuredSpec, llguidance.LLMatcher] = collections.OrderedDict()
        self._executor: llguidance.LLExecutor | None = None

    def _ll(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self._tokenizer.hf, n_vocab=self._vocab_size, eos_token=self._eos
                )
            return self._ll_tokenizer

    def compile(self, spec: StructuredSpec) -> Grammar:
        """A fresh matcher for `spec`; InvalidRequestError (param "structured") if it does not compile."""
        with self._lock:
            compiled = self._cache.get(spec)
            if compiled is not None:
                self._cache.move_to_end(spec)
        if compiled is None:
            ll = self._ll()
            try:
                text = grammar_text(spec)
            except ValueError as e:
                raise InvalidRequestError(f"Invalid {spec.kind.replace('_', ' ')}: {e}", PARAM) from e
            error = llguidance.LLMatcher.validate_grammar(text, ll)
            compiled = llguidance.LLMatcher(ll, text, log_level=0) if not error else None
            if compiled is None or compiled.is_error():
                error = error or (compiled.get_error() if compiled is not None else "")
                raise InvalidRequestError(f"Invalid {spec.kind.replace('_', ' ')}: {error.strip()}", PARAM)
            with self._lock:
                self._cache[spec] = compiled
                while len(self._cache) > _CACHED_GRAMMARS:
                    self._cache.popitem(last=False)
        return Grammar(compiled)

    def masks(self, rows: Sequence[tuple[Grammar, Sequence[int]] | None]) -> np.ndarray:
        """uint32 [len(rows), words]: each constrained row's allowed tokens after its output so far
        ((grammar, output)), all ones for None (unconstrained or padding rows)."""
        mask = np.full((len(rows), self.words), ALL_ALLOWED, np.uint32)
        todo = [(row[0].sync(row[1]), r) for r, row in enumerate(rows) if row is not None]
        if todo:
            if self._executor is None:
                self._executor = llguidance.LLExecutor()
            fill_next_token_bitmask_par(self._executor, todo, mask.view(np.int32))
        return mask
