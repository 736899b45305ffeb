"""Reading a GGUF file: its metadata as a Hugging Face config, its weights as Hugging Face tensors.

A GGUF file is a header (magic, version, key/value metadata, a table of tensors) followed by the
tensor data, aligned. We parse the header ourselves (the `gguf` package's `GGUFReader` walks every
element of every array as a separate Python object, which takes ~20 s on a 262k-token vocabulary)
and leave only the dequantization to `gguf.quants.dequantize`.

llama.cpp's converter changes a few things on the way into GGUF, which `read_gguf` undoes so that
the result is exactly what a Hugging Face checkpoint of the same model holds:

- names: `blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight` (see `_LAYER_NAMES`);
- shapes: GGUF lists dimensions fastest-varying first, numpy the other way round;
- Llama-type Q and K projections: rows permuted per head from Hugging Face's rotate-half rotary
  layout to llama.cpp's interleaved one (`_unpermute_qk`);
- Gemma RMSNorm weights: stored as `w + 1` (Hugging Face computes `x * (1 + w)`).

The metadata also carries the tokenizer (`tokenizer.ggml.*`), which `models.tokenizer` builds.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import mmap
import re
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from models.errors import ModelLoadError

log = logging.getLogger("models.gguf")
_DEQUANTIZE_ROW_BYTES = 1 << 18

# GGUF architecture -> Hugging Face model_type.
ARCHITECTURES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
}
_Q = GGMLQuantizationType
SUPPORTED_TYPES = frozenset(
    (_Q.F32, _Q.F16, _Q.BF16, _Q.Q4_0, _Q.Q4_1, _Q.Q5_0, _Q.Q5_1, _Q.Q8_0, _Q.Q2_K, _Q.Q3_K, _Q.Q4_K, _Q.Q5_K, _Q.Q6_K)
)
_GEMMA = ("gemma2", "gemma3")
_PERMUTED_QK = ("llama", "mistral")  # archs llama.cpp runs with interleaved ("normal") rotary
_MAX_COUNT = 1 << 32  # no real file has more keys, tensors or array elements: a corrupt header does

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GEMMA_LAYER_NAMES = _LAYER_NAMES | {  # Gemma 2/3 have a norm before and after both blocks
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_SKIPPED = {"rope_freqs.weight"}  # llama3 rotary factors: folded into the config instead


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table: where the tensor is and how it is stored."""

    name: str
    shape: tuple[int, ...]  # numpy order (slowest-varying first)
    qtype: GGMLQuantizationType
    start: int  # absolute byte offset in the file
    nbytes: int


@dataclasses.dataclass(frozen=True)
class GGUFMetadata:
    """A GGUF file's header: all key/value metadata (arrays as lists) and the tensor table."""

    path: Path
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]

    @property
    def tokenizer_metadata(self) -> dict[str, Any]:
        """The `tokenizer.*` keys, which `models.tokenizer.load_tokenizer` builds a tokenizer from."""
        return {k: v for k, v in self.metadata.items() if k.startswith("tokenizer.")}


@dataclasses.dataclass(frozen=True)
class GGUFCheckpoint:
    """A whole GGUF model: Hugging Face config dict, float32 tensors by Hugging Face name, header."""

    hf_config: dict[str, Any]
    tensors: dict[str, np.ndarray]
    header: GGUFMetadata

    @property
    def tokenizer_metadata(self) -> dict[str, Any]:
        return self.header.tokenizer_metadata


# --- the header ------------------------------------------------------------------------------

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?"}
_SCALARS |= {10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Sequential little-endian reads from a buffer; any read past its end raises `EOFError`."""

    def __init__(self, buf: mmap.mmap):
        self.buf, self.pos, self.size = buf, 0, len(buf)

    def unpack(self, fmt: str) -> tuple:
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise EOFError
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return out

    def count(self) -> int:
        (n,) = self.unpack("<Q")
        if n > _MAX_COUNT:
            raise ValueError(f"implausible count {n}")
        return n

    def string(self) -> str:
        n = self.count()
        if self.pos + n > self.size:
            raise EOFError
        s = self.buf[self.pos : self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])[0]
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            (etype,) = self.unpack("<I")
            n = self.count()
            if etype in _SCALARS:  # scores, token types: one numpy read instead of n struct calls
                dtype = np.dtype(_SCALARS[etype])
                if self.pos + n * dtype.itemsize > self.size:
                    raise EOFError
                arr = np.frombuffer(self.buf, dtype, n, self.pos)
                self.pos += n * dtype.itemsize
                return arr.tolist()
            return [self.value(etype) for _ in range(n)]
        raise ValueError(f"unknown metadata value type {vtype}")


def read_gguf_metadata(path: str | Path) -> GGUFMetadata:
    """Parse the header of a GGUF file (metadata and tensor table) without reading any weights.

    Raises `ModelLoadError` for a missing file, a file that is not GGUF, a corrupt header, or a
    tensor table that points past the end of the file (a truncated download).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelLoadError(f"{path}: not a GGUF file (it does not start with the GGUF magic)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                return _parse_header(path, buf)
            except (EOFError, ValueError, UnicodeDecodeError) as e:
                what = "ends inside its header" if isinstance(e, EOFError) else f"has a corrupt header ({e})"
                raise ModelLoadError(f"{path}: not a valid GGUF file: it {what}") from e


def _parse_header(path: Path, buf: mmap.mmap) -> GGUFMetadata:
    cur = _Cursor(buf)
    cur.pos = 4
    (version,) = cur.unpack("<I")
    if version not in (2, 3):
        raise ModelLoadError(f"{path}: unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors, n_kv = cur.count(), cur.count()
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        (vtype,) = cur.unpack("<I")
        metadata[key] = cur.value(vtype)
    entries = []
    for _ in range(n_tensors):
        name = cur.string()
        (n_dims,) = cur.unpack("<I")
        if n_dims > 8:
            raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
        dims = cur.unpack(f"<{n_dims}Q")
        qtype, offset = cur.unpack("<IQ")
        entries.append((name, tuple(reversed(dims)), qtype, offset))
    if "general.architecture" not in metadata:
        raise ValueError("no general.architecture key")
    alignment = int(metadata.get("general.alignment", 32))
    data_start = -(-cur.pos // alignment) * alignment
    tensors = []
    for name, shape, qtype, offset in entries:
        try:
            qtype = GGMLQuantizationType(qtype)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ModelLoadError(f"{path}: tensor {name} has unknown ggml type {qtype}") from None
        if shape and shape[-1] % block:
            raise ValueError(f"tensor {name!r}: row of {shape[-1]} is not a multiple of {qtype.name} blocks")
        nbytes = math.prod(shape) // block * type_size
        start = data_start + offset
        if start + nbytes > len(buf):
            raise ModelLoadError(
                f"{path}: truncated: tensor {name} needs bytes up to {start + nbytes}, "
                f"but the file has only {len(buf)} (an incomplete download?)"
            )
        tensors.append(TensorInfo(name, shape, qtype, start, nbytes))
    return GGUFMetadata(path, metadata, tuple(tensors))


# --- the config ------------------------------------------------------------------------------


_REQUIRED = object()


class _Keys:
    """`key("block_count")` reads `{arch}.block_count`; a uniform per-layer list reads as one value."""

    def __init__(self, header: GGUFMetadata):
        self.arch, self.md, self.path = header.architecture, header.metadata, header.path

    def raw(self, name: str, default: Any = None) -> Any:
        return self.md.get(f"{self.arch}.{name}", default)

    def __call__(self, name: str, default: Any = _REQUIRED) -> Any:
        value = self.raw(name, default)
        if value is _REQUIRED:
            raise ModelLoadError(f"{self.path}: metadata key {self.arch}.{name} is missing")
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise ModelLoadError(f"{self.path}: {self.arch}.{name} differs between layers (unsupported)")
            value = value[0]
        return value


def hf_config_from_metadata(header: GGUFMetadata) -> dict[str, Any]:
    """The Hugging Face (transformers 5) config dict that the GGUF metadata describes."""
    arch, md, path = header.architecture, header.metadata, header.path
    if arch not in ARCHITECTURES:
        raise ModelLoadError(f"{path}: unsupported architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})")

    key = _Keys(header)
    names = {t.name: t for t in header.tensors}
    if "token_embd.weight" not in names:
        raise ModelLoadError(f"{path}: no token_embd.weight tensor")
    n_heads, hidden = int(key("attention.head_count")), int(key("embedding_length"))
    head_dim = key("attention.key_length", None)
    if head_dim is None and arch in _PERMUTED_QK:
        head_dim = key("rope.dimension_count", None)
    head_dim = int(head_dim or hidden // n_heads)
    if key("attention.value_length", head_dim) != head_dim:
        raise ModelLoadError(f"{path}: attention value_length differs from key_length, which is unsupported")
    eos = [md.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    eos = list(dict.fromkeys(int(e) for e in eos if e is not None))
    cfg: dict[str, Any] = {
        "model_type": ARCHITECTURES[arch],
        "vocab_size": names["token_embd.weight"].shape[0],
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(key("attention.head_count_kv", n_heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(key("context_length")),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": md.get("tokenizer.ggml.padding_token_id"),
    }
    rope = {"rope_type": "default", "rope_theta": float(key("rope.freq_base", 10000.0))}
    rope |= _rope_scaling(header, key, rope["rope_theta"], head_dim)
    if arch == "mistral":  # transformers' MistralConfig defaults to a 4096 window: be explicit
        cfg["sliding_window"] = key("attention.sliding_window", None)
    if arch in _GEMMA:
        cfg |= _gemma_config(arch, key, cfg, rope)
    else:
        cfg["rope_parameters"] = rope
    return cfg


def _rope_scaling(header: GGUFMetadata, key: _Keys, theta: float, head_dim: int) -> dict[str, Any]:
    kind = key("rope.scaling.type", "none")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    if kind == "yarn":  # passed on as the config says; the model config decides whether it is supported
        out = {"rope_type": "yarn", "factor": float(key("rope.scaling.factor"))}
        orig = key("rope.scaling.original_context_length", None)
        return out | ({"original_max_position_embeddings": int(orig)} if orig else {})
    if kind not in ("none", None):
        raise ModelLoadError(f"{header.path}: unsupported rope scaling type {kind!r}")
    freqs = next((t for t in header.tensors if t.name == "rope_freqs.weight"), None)
    return _llama3_rope(header, freqs, theta, head_dim) if freqs is not None else {}


def _llama3_rope(header: GGUFMetadata, info: TensorInfo, theta: float, head_dim: int) -> dict[str, Any]:
    """llama.cpp stores Llama 3.1-style rope scaling as per-frequency factors, not parameters.

    Every published Llama 3.x model uses low/high frequency factors 1 and 4 over an original
    context of 8192; recover `factor` and check that these parameters reproduce the stored factors.
    """
    stored = _dequantize(header.path, info)
    factor = float(stored.max())
    params = {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    params["original_max_position_embeddings"] = 8192
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
    expected = np.where(wavelen > 8192, factor, np.where(wavelen < 8192 / 4, 1.0, 1 / ((1 - smooth) / factor + smooth)))
    if stored.shape != expected.shape or not np.allclose(stored, expected, rtol=1e-3):
        raise ModelLoadError(f"{header.path}: rope_freqs.weight does not match Llama 3 rope scaling")
    return {"rope_type": "llama3", **params}


def _gemma_config(arch: str, key: _Keys, cfg: dict[str, Any], rope: dict[str, Any]) -> dict[str, Any]:
    n_layers, head_dim = cfg["num_hidden_layers"], cfg["head_dim"]
    # llama.cpp has no key for this: it scales by hidden/heads for the 27B models (recognised by
    # depth), by head_dim otherwise, unless `attention.scale` says so.
    scale = key("attention.scale", None)
    if scale:
        scalar: float = round(1.0 / float(scale) ** 2, 4)
    elif (arch, n_layers) in (("gemma2", 46), ("gemma3", 62)):
        scalar = cfg["hidden_size"] // cfg["num_attention_heads"]
    else:
        scalar = head_dim
    flags = key.raw("attention.sliding_window_pattern")  # an interval, or per-layer "is sliding"
    if isinstance(flags, list):
        if len(flags) != n_layers:
            raise ModelLoadError(f"{key.path}: sliding_window_pattern has {len(flags)} entries for {n_layers} layers")
        sliding = [bool(f) for f in flags]
    elif arch == "gemma2":  # alternating, starting with a sliding layer
        sliding = [i % int(flags or 2) == 0 for i in range(n_layers)]
    else:  # gemma3: every 6th layer is global
        sliding = [(i + 1) % int(flags or 6) != 0 for i in range(n_layers)]
    out: dict[str, Any] = {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": scalar,
        "sliding_window": key("attention.sliding_window", None),
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
    }
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        value = key(name, None)
        if value is not None or arch == "gemma3":
            out[name] = None if value is None else float(value)
    if arch == "gemma3":
        local = {"rope_type": "default", "rope_theta": float(key("rope.freq_base_swa", 10000.0))}
        out["rope_parameters"] = {"sliding_attention": local, "full_attention": rope}
    else:
        out["rope_parameters"] = rope
    return out


# --- the tensors -----------------------------------------------------------------------------

_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_tensor_name(arch: str, name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor; None for one that has no Hugging Face counterpart."""
    if name in _SKIPPED:
        return None
    base, _, suffix = name.rpartition(".")
    if base in _GLOBAL_NAMES and suffix in ("weight", "bias"):
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    layer_names = _GEMMA_LAYER_NAMES if arch in _GEMMA else _LAYER_NAMES
    m = _LAYER.fullmatch(name)
    if m is None or m[2] not in layer_names:
        raise KeyError(name)
    return f"model.layers.{m[1]}.{layer_names[m[2]]}.{m[3]}"


def _unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of Llama-type Q/K projection rows, head by head.

    Hugging Face rotates pairs of rows (j, j + d/2) of each head (`rotate_half`); llama.cpp rotates
    adjacent pairs (2j, 2j + 1), so its converter moves HF row j to 2j and row j + d/2 to 2j + 1
    (for d = 4: GGUF rows = HF rows 0, 2, 1, 3). Here GGUF row 2j + i goes back to HF row i*d/2 + j.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(path: Path, info: TensorInfo, blob: np.ndarray | None = None) -> np.ndarray:
    """One tensor as float32 in numpy order; `blob` is the whole file mapped as bytes."""
    if info.qtype not in SUPPORTED_TYPES:
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise ModelLoadError(
            f"{path}: tensor {info.name} is stored as {info.qtype.name}, which is unsupported (supported: {supported})"
        )
    if blob is None:
        blob = np.memmap(path, np.uint8, "r")
    block, type_size = GGML_QUANT_SIZES[info.qtype]
    raw = blob[info.start : info.start + info.nbytes].view(np.ndarray)  # a memmap's slices cost ~1 µs each
    # gguf dequantizes 16 rows at a time: rows of up to 256 KiB (several rows of the tensor, which
    # are contiguous) make far fewer numpy calls than rows of a few hundred bytes (SmolLM2's file:
    # 1.6 -> 0.9 s; rows of 64 KiB or 1 MiB measured slower)
    row_bytes = max(1, info.shape[-1] // block * type_size if info.shape else info.nbytes)
    rows = info.nbytes // row_bytes
    merged = max(1, min(rows, _DEQUANTIZE_ROW_BYTES // row_bytes))
    while rows % merged:
        merged -= 1
    try:
        out = dequantize(raw.reshape(rows // merged, merged * row_bytes) if rows else raw, info.qtype)
    except (ValueError, NotImplementedError) as e:  # e.g. the file shrank since its header was read
        raise ModelLoadError(f"{path}: could not read tensor {info.name} ({e})") from e
    out = np.asarray(out, dtype=np.float32).reshape(info.shape)
    return out.copy() if np.may_share_memory(out, raw) else out  # owned, not the mmap


def read_gguf(path: str | Path, *, progress: bool = True, header: GGUFMetadata | None = None) -> GGUFCheckpoint:
    """Read a GGUF file into a Hugging Face config dict and float32 tensors in Hugging Face layout.

    `header`: the file's `read_gguf_metadata`, if the caller has it. With `progress`, logs (logger
    "models.gguf") how far dequantization is, at most once a second. Raises `ModelLoadError`
    (naming the file) for anything it cannot read.
    """
    header = header or read_gguf_metadata(path)
    cfg = hf_config_from_metadata(header)
    arch, path = header.architecture, header.path
    plan = []
    for info in header.tensors:  # check every name and type before the slow part
        try:
            hf_name = hf_tensor_name(arch, info.name)
        except KeyError:
            raise ModelLoadError(f"{path}: unexpected tensor {info.name} for architecture {arch}") from None
        if info.qtype not in SUPPORTED_TYPES:
            _dequantize(path, info)  # raises the unsupported-type error
        if hf_name is not None:
            plan.append((hf_name, info))
    blob = np.memmap(path, np.uint8, "r")
    tensors: dict[str, np.ndarray] = {}
    started = last_log = time.monotonic()
    total_bytes = 0
    for i, (hf_name, info) in enumerate(plan, 1):
        w = _dequantize(path, info, blob)
        if arch in _PERMUTED_QK and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            w = _unpermute_qk(w, cfg["num_attention_heads"])
        elif arch in _PERMUTED_QK and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            w = _unpermute_qk(w, cfg["num_key_value_heads"])
        if arch in _GEMMA and info.name.endswith("norm.weight"):
            w -= 1.0
        tensors[hf_name] = w
        total_bytes += w.nbytes
        now = time.monotonic()
        if progress and (now - last_log >= 1.0 or i == len(plan)):
            last_log = now
            log.info("dequantized %d/%d tensors (%d MB)", i, len(plan), total_bytes >> 20)
    if progress:
        log.info("read %s: %d tensors in %.1fs", path.name, len(tensors), time.monotonic() - started)
    return GGUFCheckpoint(cfg, tensors, header)
