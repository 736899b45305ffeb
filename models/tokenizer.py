"""Tokenizers: loading one, rendering chat templates, and turning generated ids back into text.

`load_tokenizer` takes a Hugging Face directory (via `transformers.AutoTokenizer`) or a `.gguf`
file, whose metadata (`tokenizer.ggml.*`) describes the tokenizer: we read it with our own header
parser (`models.gguf.read_gguf_metadata`) and build the fast tokenizer with transformers' GGUF
converters, which need no torch (transformers' own `from_pretrained(gguf_file=...)` does).

Streaming output goes through two small steps, each fed the previous one's output:

    detok = IncrementalDetokenizer(tokenizer)        stops = StopMatcher(["\\n\\n"])
    for token_id in generated:
        text, stopped = stops.feed(detok.feed(token_id))   # -> send `text`; end if `stopped`
    text = stops.feed(detok.flush())[0] + stops.flush()    # finished for another reason

`IncrementalDetokenizer` never emits half a UTF-8 character, and the concatenation of its output
equals `tokenizer.decode(all_ids)`; `StopMatcher` holds back text that may still become a stop
string and cuts the output before the first one.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.errors import ModelLoadError

if TYPE_CHECKING:
    from models.gguf import GGUFMetadata

log = logging.getLogger("models.tokenizer")

_REPLACEMENT = "\ufffd"  # what a decoder makes of an incomplete UTF-8 sequence
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class ChatTemplateError(ValueError):
    """The chat template could not render these messages (it raised, e.g. on roles out of order)."""


class NoChatTemplateError(ChatTemplateError):
    """The tokenizer has no chat template, so chat messages cannot be rendered."""


class Tokenizer:
    """A transformers tokenizer with the few operations the server needs."""

    def __init__(self, hf_tokenizer: Any, *, eos_token_ids: Iterable[int] = (), name: str = ""):
        self.hf = hf_tokenizer
        self.name = name or getattr(hf_tokenizer, "name_or_path", "")
        eos = [hf_tokenizer.eos_token_id, *eos_token_ids]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(int(e) for e in eos if e is not None))

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return len(self.hf)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def save(self, directory: str | Path) -> None:
        """Write the tokenizer (tokenizer.json, its config, the chat template) so `load_tokenizer`
        reads it back with the same ids, special tokens and template, whatever it was loaded from."""
        self.hf.save_pretrained(str(directory))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return list(self.hf.convert_ids_to_tokens(list(ids)))

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids that `decode(..., skip_special_tokens=True)` leaves out."""
        return frozenset(i for i, t in self.hf.added_tokens_decoder.items() if t.special)

    @functools.cached_property
    def byte_fallback_ids(self) -> frozenset[int]:
        """Ids of `<0xNN>` byte tokens, if the decoder assembles them (SentencePiece byte fallback).

        Such a decoder turns a whole run of byte tokens into text at once, and every byte of a run
        that is not valid UTF-8 into U+FFFD: a later byte can change how earlier ones decode.
        """
        decoder = getattr(getattr(self.hf, "backend_tokenizer", None), "decoder", None)
        if decoder is None or b'"ByteFallback"' not in decoder.__getstate__():
            return frozenset()
        return frozenset(i for t, i in self.hf.get_vocab().items() if t.startswith("<0x") and _BYTE_TOKEN.fullmatch(t))

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        template: str | None = None,
    ) -> str:
        """The conversation rendered as prompt text (including any BOS the template writes), with
        `tools` (JSON schemas of functions) given to the template as transformers gives them, by
        the model's template or `template` (Jinja text) instead."""
        from jinja2 import TemplateError

        if template is None and not self.has_chat_template:
            raise NoChatTemplateError(f"{self.name or 'this model'}: the tokenizer has no chat template")
        try:
            return self.hf.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                chat_template=template,
            )
        except TemplateError as e:
            raise ChatTemplateError(f"the chat template rejected the messages: {e}") from e

    def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """Prompt ids of a conversation; special tokens come from the template only, as in transformers."""
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)


def load_tokenizer(
    path_or_dir: str | Path,
    *,
    eos_token_ids: Iterable[int] = (),
    gguf_header: GGUFMetadata | None = None,
    cache_dir: Path | None = None,
) -> Tokenizer:
    """The tokenizer of a Hugging Face model directory or of a `.gguf` file.

    `eos_token_ids` (usually the model config's) are added to the tokenizer's own end-of-sequence id;
    `gguf_header`: the file's `read_gguf_metadata`, if the caller has it; `cache_dir`: where a GGUF
    file's converted tokenizer is kept for the next load (`_GGUFTokenizerCache`). Raises
    `ModelLoadError` naming the path when there is no usable tokenizer.
    """
    path = Path(path_or_dir)
    if path.is_dir():
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{path}: could not load the tokenizer ({type(e).__name__}: {e})") from e
    elif path.is_file():
        hf = _gguf_tokenizer(path, gguf_header, cache_dir)
    else:
        raise ModelLoadError(f"{path}: file not found")
    return Tokenizer(hf, eos_token_ids=eos_token_ids, name=str(path))


# llama.cpp's metadata keys -> the names transformers' GGUF converters expect.
_GGUF_TOKENIZER_KEYS = {
    "model": "tokenizer_type",
    "pre": "pre_tokenizer_type",
    "tokens": "tokens",
    "scores": "scores",
    "token_type": "token_type",
    "merges": "merges",
    "precompiled_charsmap": "precompiled_charsmap",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "unknown_token_id": "unk_token_id",
    "padding_token_id": "pad_token_id",
    "add_space_prefix": "add_prefix_space",
}
_SPECIAL_TOKENS = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown", "pad_token": "padding"}


def _gguf_tokenizer(path: Path, header: GGUFMetadata | None, cache_dir: Path | None) -> Any:
    """A `PreTrainedTokenizerFast` from GGUF metadata, the way transformers builds it (without torch)."""
    from models.gguf import read_gguf_metadata

    header = header or read_gguf_metadata(path)
    md = header.metadata
    kind = md.get("tokenizer.ggml.model")
    if kind is None or "tokenizer.ggml.tokens" not in md:
        raise ModelLoadError(f"{path}: the GGUF metadata has no tokenizer (tokenizer.ggml.model/tokens)")
    spec = {name: md[f"tokenizer.ggml.{k}"] for k, name in _GGUF_TOKENIZER_KEYS.items() if f"tokenizer.ggml.{k}" in md}
    tokens = spec["tokens"]
    config: dict[str, Any] = {
        # llama.cpp adds BOS to a sentencepiece ("llama") vocabulary that does not say otherwise
        "add_bos_token": bool(md.get("tokenizer.ggml.add_bos_token", kind == "llama")),
        "add_eos_token": bool(md.get("tokenizer.ggml.add_eos_token", False)),
    }
    if md.get("tokenizer.chat_template"):
        config["chat_template"] = md["tokenizer.chat_template"]
    for name, key in _SPECIAL_TOKENS.items():
        token_id = md.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            if not 0 <= token_id < len(tokens):
                raise ModelLoadError(f"{path}: tokenizer.ggml.{key}_token_id {token_id} is out of range")
            config[name] = tokens[token_id]
    from transformers import PreTrainedTokenizerFast

    cache = _GGUFTokenizerCache(cache_dir, path) if cache_dir is not None else None
    cached = cache.read() if cache is not None else None
    if cached is not None:
        try:
            hf = PreTrainedTokenizerFast(tokenizer_file=str(cached[0]), name_or_path=str(path), **config, **cached[1])
            log.info("read %s's converted tokenizer from %s", path.name, cached[0].parent)
            return hf
        except Exception as e:  # a damaged entry: convert again, and replace it
            log.warning(
                "%s does not read back (%s: %s); converting the tokenizer again", cached[0], type(e).__name__, e
            )
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

        backend, extra = convert_gguf_tokenizer(header.architecture, spec)
    except ValueError as e:  # an unsupported tokenizer.ggml.model
        raise ModelLoadError(f"{path}: cannot build its tokenizer ({e})") from e
    if cache is not None:
        cache.write(backend, extra)
    return PreTrainedTokenizerFast(tokenizer_object=backend, name_or_path=str(path), **config, **extra)


class _GGUFTokenizerCache:
    """A GGUF file's converted tokenizer (transformers' `tokenizer.json`), kept on disk for the
    next load: building it from the file's vocabulary takes seconds (Gemma 3's 262k tokens: ~6 s on
    2 cores, mostly transformers recovering BPE merges from the scores; reading it back: ~1.5 s).

    An entry is found by the file's identity (resolved path, size, modification time, inode) and
    what the conversion depends on: the transformers and tokenizers versions and this module's
    source. Entries are written whole or not at all (a directory renamed into place); one that does
    not read back is a miss and is written again."""

    def __init__(self, root: Path, gguf: Path) -> None:
        st = gguf.stat()
        source = hashlib.blake2b(Path(__file__).read_bytes()).hexdigest()
        key = [str(gguf.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, source]
        key += [importlib.metadata.version(p) for p in ("transformers", "tokenizers")]
        digest = hashlib.blake2b(json.dumps(key).encode(), digest_size=16).hexdigest()
        self.entry = root / f"{gguf.stem}-{digest}"

    def read(self) -> tuple[Path, dict[str, Any]] | None:
        """-> the entry's tokenizer.json and transformers' extra arguments, if it has them."""
        try:
            extra = json.loads((self.entry / "extra.json").read_text())
        except (OSError, ValueError):
            return None
        file = self.entry / "tokenizer.json"
        return (file, extra) if isinstance(extra, dict) and file.is_file() else None

    def write(self, backend: Any, extra: dict[str, Any]) -> None:
        staging = None
        try:
            self.entry.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=self.entry.parent, prefix=".partial-"))
            backend.save(str(staging / "tokenizer.json"))
            (staging / "extra.json").write_text(json.dumps(extra))
            shutil.rmtree(self.entry, ignore_errors=True)  # a damaged entry
            os.replace(staging, self.entry)
        except OSError as e:  # a read-only or full disk, or another process's entry just renamed in
            log.warning("could not keep the converted tokenizer in %s: %s", self.entry, e)
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)


class IncrementalDetokenizer:
    """Turns token ids, fed a few at a time, into text deltas.

    Decodes only a window of recent ids (vLLM's prefix/read offsets): `prefix` is the text of
    ids[prefix_offset:read_offset], already emitted; the delta is what decoding from prefix_offset
    to the end adds to it. Decoding from a token before the new ones keeps context a decoder needs
    (a SentencePiece decoder drops the leading space of the first token it sees). Text is held
    while it ends in U+FFFD (an incomplete UTF-8 character) and, for byte-fallback vocabularies,
    while a run of byte tokens may still continue (a later byte can turn the run invalid, which
    the decoder then renders as U+FFFD throughout). `flush()` emits whatever is still held.
    """

    _PROMPT_CONTEXT = 5  # prompt ids kept as decoding context for the first generated tokens

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._byte_ids = tokenizer.byte_fallback_ids
        self._invisible = tokenizer.special_ids if skip_special_tokens else frozenset()
        self._ids = list(prompt_ids[-self._PROMPT_CONTEXT :])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip)

    def feed(self, token_ids: int | Iterable[int]) -> str:
        """Append ids; return the text they complete (possibly empty)."""
        self._ids.extend([token_ids] if isinstance(token_ids, int) else token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Text still held back at the end of the sequence (an incomplete character, as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        prefix = self._decode(self._prefix_offset, self._read_offset)
        text = self._decode(self._prefix_offset)
        if not final and (text.endswith(_REPLACEMENT) or self._in_byte_run()):
            return ""
        # window moves on: the new ids become the context of the next ones
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        if self._prefix_offset > 4096:  # drop ids no window can reach again
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return text[len(prefix) :]

    def _in_byte_run(self) -> bool:
        """Whether the last id that decodes to anything is a byte token: the run may go on."""
        if not self._byte_ids:
            return False
        for token_id in reversed(self._ids[self._read_offset :]):
            if token_id not in self._invisible:
                return token_id in self._byte_ids
        return False


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back text that may start one.

    `feed(delta)` returns `(text_to_emit, stopped)`. Text is emitted once no stop string can begin
    in it any more; on a match, the text before the stop string is emitted (the stop string is not)
    and `stopped` is True, after which everything is ignored. `flush()` returns what is still held
    back when the sequence ends for another reason.
    """

    def __init__(self, stop: Iterable[str]):
        self.stop = tuple(dict.fromkeys(s for s in stop if s))
        self._held = ""
        self.stopped = False

    def feed(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        text = self._held + delta
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return text[: min(hits)], True
        keep = self._partial_suffix(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        longest = max((len(s) for s in self.stop), default=1) - 1
        for n in range(min(longest, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
