"""Log-probabilities in the two OpenAI formats, and the text and bytes of single tokens.

Chat: a list of `{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}`.
Completions (legacy): parallel lists `tokens`, `token_logprobs`, `top_logprobs` (a dict token ->
logprob that also holds the chosen token) and `text_offset`.

A token's bytes are its exact UTF-8 bytes, which for byte-level BPE may be part of a character;
its text is those bytes decoded, or `bytes:\\xe2\\x80` (as OpenAI writes it) when they are not
valid UTF-8 on their own.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from graph.api import TokenLogprob
from serving.protocol import ChatTokenLogprob, CompletionLogprobs, TopLogprob


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: printable stand-in character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _detect_kind(tokenizer: Any) -> str:
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode(" the", add_special_tokens=False))
    joined = "".join(pieces)
    if "Ġ" in joined:
        return "byte_level"
    if "▁" in joined:
        return "sentencepiece"
    return "plain"


class TokenTexts:
    """Token id -> (text, bytes), computed once per id."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._kind = _detect_kind(tokenizer)
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            raw = self._bytes(token_id)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            hit = self._cache[token_id] = (text, list(raw))
        return hit

    def _bytes(self, token_id: int) -> bytes:
        (piece,) = self._tokenizer.convert_ids_to_tokens([token_id])
        if self._kind == "byte_level":
            table = _byte_decoder()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        elif self._kind == "sentencepiece":
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                return bytes([int(piece[3:5], 16)])
            return piece.replace("▁", " ").encode()
        return self._tokenizer.decode([token_id]).encode()


def _top(texts: TokenTexts, entry: TokenLogprob) -> list[TopLogprob]:
    out = []
    for token_id, logprob in entry.top:
        text, raw = texts(token_id)
        out.append(TopLogprob(token=text, logprob=logprob, bytes=raw))
    return out


def chat_logprobs(texts: TokenTexts, entries: Sequence[TokenLogprob]) -> list[ChatTokenLogprob]:
    """Engine logprobs -> the chat format (top_logprobs holds only the alternatives asked for)."""
    out = []
    for entry in entries:
        text, raw = texts(entry.token_id)
        out.append(ChatTokenLogprob(token=text, logprob=entry.logprob, bytes=raw, top_logprobs=_top(texts, entry)))
    return out


class CompletionLogprobsBuilder:
    """Accumulates the legacy format across deltas; `text_offset` runs on from delta to delta."""

    def __init__(self, texts: TokenTexts) -> None:
        self._texts = texts
        self.offset = 0

    def build(self, token_ids: Sequence[int], entries: Sequence[TokenLogprob | None]) -> CompletionLogprobs:
        """One record per token; an entry of None (the first prompt token) has no logprob."""
        result = CompletionLogprobs()
        for token_id, entry in zip(token_ids, entries, strict=True):
            text, _ = self._texts(token_id)
            result.tokens.append(text)
            result.text_offset.append(self.offset)
            self.offset += len(text)
            if entry is None:
                result.token_logprobs.append(None)
                result.top_logprobs.append(None)
                continue
            result.token_logprobs.append(entry.logprob)
            top = {self._texts(t)[0]: lp for t, lp in entry.top}
            top.setdefault(text, entry.logprob)  # the chosen token is always listed
            result.top_logprobs.append(top)
        return result


def merge_completion_logprobs(parts: Sequence[CompletionLogprobs]) -> CompletionLogprobs:
    merged = CompletionLogprobs()
    for part in parts:
        merged.tokens += part.tokens
        merged.text_offset += part.text_offset
        merged.token_logprobs += part.token_logprobs
        merged.top_logprobs += part.top_logprobs
    return merged
