"""Model architectures as pure JAX functions, their configs, weight loading and tokenizers."""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.config import ModelConfig


def architecture(cfg: ModelConfig) -> ModuleType:
    """The module whose `forward(params, cfg, tokens, positions, kv, page_table)` implements `cfg`."""
    from models import gemma, llama

    return gemma if cfg.family == "gemma" else llama
