"""What the routes share: the config, the engine once it is loaded, the metrics."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING

from serving.config import ServerConfig
from serving.errors import APIError, engine_unavailable
from serving.logprobs import TokenTexts
from serving.metrics import Metrics

if TYPE_CHECKING:
    from graph.engine import Engine


_RETRY = {"Retry-After": "5"}


@dataclasses.dataclass
class ServerState:
    config: ServerConfig
    engine: Engine | None = None  # None while the model loads
    stopping: bool = False  # set on SIGINT/SIGTERM: new requests get 503
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    model_name: str = ""
    token_texts: TokenTexts | None = None
    metrics: Metrics = dataclasses.field(init=False)
    chat_template: str | None = dataclasses.field(init=False)  # --chat-template's text

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.engine_stats)
        self.chat_template = Path(self.config.chat_template).read_text() if self.config.chat_template else None

    def set_engine(self, engine: Engine) -> None:
        self.model_name = self.config.served_model_name or engine.model_name
        self.token_texts = TokenTexts(engine.tokenizer)
        self.engine = engine

    def engine_stats(self) -> dict[str, int] | None:
        return None if self.engine is None else self.engine.stats()

    def ready_engine(self) -> Engine:
        """The engine, or 503 while loading, shutting down, or when the engine is broken."""
        if self.stopping:
            raise APIError(503, "The server is shutting down and takes no new requests.", code="shutting_down")
        if self.engine is None:
            raise APIError(503, "The model is still loading; retry shortly.", code="model_loading", headers=_RETRY)
        if (reason := self.engine.broken) is not None:
            raise engine_unavailable(reason)
        return self.engine

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(
                404,
                f"The model '{model}' does not exist. This server serves '{self.model_name}'.",
                param="model",
                code="model_not_found",
            )
