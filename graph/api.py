"""The engine contract: what goes in (token ids + sampling parameters as values) and what comes out
(a stream of deltas: token ids, text, logprobs, finish reason). `serving/` and the offline API use
only these types and `graph.engine.Engine`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from models.params import DTYPES

MAX_TOP_LOGPROBS = 20
MAX_SEED = 2**32 - 1  # sampling keys come from 32-bit seeds (graph/sampling.py)
MAX_SPECULATIVE_TOKENS = 15  # draft tokens per sequence and step
LAYER_LOOPS = ("auto", "scan", "unroll", "layered")  # see graph/programs.py


class EngineError(Exception):
    """Base of the errors the engine raises for a request it cannot take."""


class QueueFullError(EngineError):
    """The queue is at its bound: of waiting requests, or of the expected wait for a first step.
    The client should retry in `retry_after` seconds (HTTP 429 with Retry-After)."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InvalidRequestError(EngineError, ValueError):
    """A request the engine cannot serve as given (HTTP 400). `param` names the `SamplingParams`
    field at fault, or is None when the prompt is."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class RequestTooLargeError(InvalidRequestError):
    """Prompt plus max_tokens do not fit in the context (HTTP 400)."""


class EngineStoppedError(EngineError):
    """The engine is shutting down and takes no new requests (HTTP 503)."""


class EngineBrokenError(EngineStoppedError):
    """The engine cannot run steps any more, e.g. its KV pool could not be rebuilt after a failed
    step (HTTP 503)."""


class ArtifactMismatchError(RuntimeError):
    """An AOT artifact directory made for another model, bucket set, dtype, backend or jax, or
    one with a missing, damaged or altered file, or options that would change its KV pool."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Every switch of the compiled engine. The server's CLI is generated from these fields."""

    max_batch: int = 16  # largest decode batch bucket
    max_seq_len: int = 2048  # context length (prompt + output) of one request
    page_size: int = 16  # tokens per KV page
    max_prefill_tokens: int = 512  # largest prefill chunk bucket; longer prompts are chunked
    max_num_batched_tokens: int | None = None  # batch + chunk; none: chunks of 32 (x 1+K speculating); 0: off
    enable_prefix_caching: bool = True  # reuse the KV pages of prompt prefixes seen before (LRU-evicted)
    # dispatch each step before reading the last one's tokens (one step of look-ahead): auto is on
    # except on CPU, where the host's share of a step then competes with the step for the cores
    pipeline: str = "auto"  # auto | on | off
    # speculative decoding by prompt lookup (n-gram): up to K draft tokens per decoding sequence,
    # taken from where its last tokens occurred before in its prompt or output, verified in one step
    # (graph/speculative.py); 0: off. In float32 outputs are the same as without it, greedy or seeded
    num_speculative_tokens: int = 0
    prompt_lookup_max: int = 4  # longest n-gram matched
    prompt_lookup_min: int = 1  # shortest n-gram matched
    speculative_max_batch: int = 4  # decode batches larger than this are not speculated (each row costs K+1)
    min_prefill_tokens: int = 16  # smallest prefill bucket
    # prefill buckets are powers of two and also every multiple of this up to 8 of them (16: 16, 32,
    # 48, ..., 128, 256, 512), so a short prompt pads by under 16 tokens (graph/buckets.py
    # `LINEAR_STEPS`); 0: powers of two only
    prefill_bucket_step: int = 16
    # smallest context bucket (page-table width); None: one bucket, the whole context. Attention
    # loops over only the keys a step can see, so narrower tables save little on CPU
    min_context_tokens: int | None = None
    kv_memory_gb: float | None = None  # KV pool size; default: a fraction of device memory (not with --aot-dir)
    kv_pages: int | None = None  # fixed number of KV pages (overrides the memory budget; --aot-dir: the artifact's)
    kv_memory_fraction: float = 0.8  # of what device memory the executables leave free (GPU/TPU)
    max_queue: int = 256  # waiting requests beyond this get QueueFullError
    # 60 s: a reverse proxy's default read timeout (nginx, AWS ALB) would cut a request that waits
    # longer anyway, and a minute without a first token is already a failure to a person waiting.
    max_queue_wait: float = 60.0  # seconds: a request expected to wait longer for its first step gets 429 (0: off)
    tensor_parallel: int = 1  # devices each step's heads, MLP and vocabulary are split over (graph/sharding.py)
    data_parallel: int = 1  # devices each step's batch is split over (each holds the whole KV pool)
    dtype: str = "float32"  # float32 | bfloat16
    # the KV pool's values: auto (the model's dtype) | float32 | bfloat16 (half the memory, and on
    # CPU faster decode attention: it reads half the bytes; like llama.cpp's default f16 cache)
    kv_cache_dtype: str = "auto"
    quantize: str = "none"  # none | int8: int8 weights (int8 x int8 dots on CPU, weight-only on GPU/TPU)
    layer_loop: str = "auto"  # auto (layered on CPU, else scan) | scan | unroll | layered: one executable per layer
    # run every compiled step shape once at start-up, on padding: a shape's first run is slower
    # (on CPU 60-110 ms more for SmolLM2), which would otherwise stall every stream of its first step
    warmup: bool = True
    aot_dir: str | None = None  # load executables from here instead of compiling
    compile_cache: str | None = None  # XLA compilation cache directory, or off (none: ~/.cache/xlaserve/xla)
    debug_step_delay: float = 0.0  # testing: seconds to sleep before each step (simulates a slow device)
    debug_fail_step: int = 0  # testing: step number N raises after its call, as a device error would (0: never)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in DTYPES:
            raise ValueError(f"kv_cache_dtype must be auto or one of {', '.join(DTYPES)}, not {self.kv_cache_dtype!r}")
        if self.layer_loop not in LAYER_LOOPS:
            raise ValueError(f"layer_loop must be one of {', '.join(LAYER_LOOPS)}, not {self.layer_loop!r}")
        if self.pipeline not in ("auto", "on", "off"):
            raise ValueError(f"pipeline must be auto, on or off, not {self.pipeline!r}")
        if self.quantize not in ("none", "int8"):
            raise ValueError(f"quantize must be none or int8, not {self.quantize!r}")
        if self.prefill_bucket_step < 0:
            raise ValueError("prefill_bucket_step must be 0 (powers of two only) or more")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 0:
            raise ValueError("max_num_batched_tokens must be 0 (no mixed steps) or more")
        for name in (
            "max_batch", "max_seq_len", "page_size", "max_prefill_tokens", "min_prefill_tokens", "max_queue",
            "tensor_parallel", "data_parallel",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not 0 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens must be between 0 and {MAX_SPECULATIVE_TOKENS}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("prompt_lookup_min must be at least 1 and at most prompt_lookup_max")
        if self.speculative_max_batch < 1:
            raise ValueError("speculative_max_batch must be at least 1")
        for name in ("max_queue_wait", "debug_step_delay", "debug_fail_step"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more")

    def tokenizer_cache(self) -> Path | None:
        """Where a model load for this engine keeps a GGUF file's converted tokenizer: `tokenizers`
        in the compile cache directory (graph/compile_cache.py), or None when that is off."""
        from graph import compile_cache

        return compile_cache.tokenizer_cache(self.compile_cache)


STRUCTURED_KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")


@dataclasses.dataclass(frozen=True)
class StructuredSpec:
    """A constraint on a request's output, as text: the engine compiles it into a grammar matcher
    (graph/structured.py) whose token mask enters every step. `spec` is the JSON schema's text
    (json_schema), a regular expression (regex), the choices (choice), a Lark grammar (grammar), or
    empty (json_object: any JSON object)."""

    kind: str
    spec: str | tuple[str, ...] = ""

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise ValueError(f"kind must be one of {', '.join(STRUCTURED_KINDS)}, not {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling; every field travels to the device as an array value (`structured` as
    the token mask its grammar allows at each step)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off; the whole vocabulary or more keeps every token too
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # None: off; k >= 0: chosen token's logprob plus k alternatives
    prompt_logprobs: int | None = None  # same, for every prompt token (echo + logprobs)
    skip_special_tokens: bool = True
    structured: StructuredSpec | None = None  # a grammar the output must follow (its mask: per step, on the host)


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), best first


@dataclasses.dataclass
class RequestOutput:
    """One delta of a request's stream. The last one has `finish_reason` set."""

    request_id: str
    text: str  # new text since the previous delta (never part of a stop string)
    token_ids: list[int]  # new tokens since the previous delta
    logprobs: list[TokenLogprob] | None  # one per new token when requested
    finish_reason: str | None = None  # stop | length | abort | error (stop also: a grammar is complete)
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    completion_tokens: int = 0  # total so far
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first delta only (first token: None)
    error: str | None = None
    queue_wait: float | None = None  # first delta only: seconds from submit to the first step that fed it
