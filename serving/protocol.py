"""The OpenAI request and response schemas of every route, as pydantic models.

Request fields are in the order of the OpenAI API reference (required ones first, then
alphabetical); this server's own extensions sit in one marked block at the end of each request.
Validation is strict: wrong JSON types are errors (no "1" -> 1), an unknown parameter is rejected
(`extra="forbid"`), and an OpenAI parameter this server does not implement is rejected with a
message that says so unless its value asks for what the server does anyway (`store: false`,
`service_tier: "auto"`, ...). Structured outputs come as `response_format` or under vLLM's
names (`structured_outputs`, `guided_*`); `structured()` turns the one a request uses into the
engine's `StructuredSpec`, and the engine compiles it. Checks that involve several fields raise
`ParamError` from the requests' `check()`. Rules that need the model or the engine's limits (context length,
vocabulary, seed range, min_tokens against max_tokens) are the engine's alone (`Engine.submit`);
the bound on `n` is the server's `--max-n` (serving/handler.py).
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from graph.api import StructuredSpec

MAX_STOP = 4
COMPLETION_MAX_LOGPROBS = 20  # OpenAI allows 5; vLLM (and this server) up to MAX_TOP_LOGPROBS


class ParamError(ValueError):
    """A request that is well typed but invalid as a whole; `param` names the culprit."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


def _not_supported(name: str, value: Any, accepted: tuple[Any, ...] = ()) -> Any:
    if value is None or any(value == a for a in accepted):
        return value
    raise ValueError(f"'{name}' is not supported by this server")


# Not implemented OpenAI parameters -> the values that ask for nothing beyond what we do anyway.
_CHAT_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "audio": (),
    "function_call": ("none",),
    "functions": (),
    "metadata": ({},),
    "modalities": (["text"],),
    "moderation": (),
    "prediction": (),
    "prompt_cache_key": (),
    "prompt_cache_options": (),
    "prompt_cache_retention": (),
    "reasoning_effort": (),
    "service_tier": ("auto", "default"),
    "store": (False,),
    "verbosity": (),
    "web_search_options": (),
}
_COMPLETION_UNSUPPORTED: dict[str, tuple[Any, ...]] = {"suffix": ("",)}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None

    @field_validator("include_obfuscation")
    @classmethod
    def _no_obfuscation(cls, v: bool | None) -> bool | None:
        return _not_supported("stream_options.include_obfuscation", v, (False,))


class ContentPart(_Strict):
    """One part of a message's content; only `text` parts are implemented."""

    type: str
    text: str | None = None
    image_url: Any = None
    input_audio: Any = None
    file: Any = None
    refusal: Any = None

    @field_validator("type")
    @classmethod
    def _text_only(cls, v: str) -> str:
        if v in ("image_url", "input_audio", "file", "refusal"):
            raise ValueError(f"content parts of type '{v}' are not supported by this server (only 'text')")
        if v != "text":
            raise ValueError(f"unknown content part type '{v}' (expected 'text')")
        return v

    @model_validator(mode="after")
    def _has_text(self) -> ContentPart:
        if self.text is None:
            raise ValueError("a 'text' content part needs a 'text' string")
        return self


ROLES = ("system", "user", "assistant", "developer", "tool")


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: str
    tool_calls: list[ToolCall] | None = None  # assistant (before content, whose check reads it)
    content: str | list[ContentPart] | None = Field(default=None, validate_default=True)
    name: str | None = None
    tool_call_id: str | None = Field(default=None, validate_default=True)  # tool
    # Message fields of the reference that this server does not implement.
    refusal: Any = None
    function_call: Any = None
    audio: Any = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, v: str) -> str:
        if v == "function":
            raise ValueError("messages with role 'function' are not supported by this server (use 'tool')")
        if v not in ROLES:
            raise ValueError(f"unknown role '{v}' (expected one of: {', '.join(ROLES)})")
        return v

    @field_validator("content")
    @classmethod
    def _content_given(cls, v: str | list[ContentPart] | None, info: Any) -> str | list[ContentPart] | None:
        if v is None and not info.data.get("tool_calls"):
            raise ValueError("every message needs 'content' (a string or a list of text parts)")
        if isinstance(v, list) and not v:
            raise ValueError("'content' must not be an empty list")
        return v

    @field_validator("tool_call_id")
    @classmethod
    def _tool_call_id(cls, v: str | None, info: Any) -> str | None:
        if (info.data.get("role") == "tool") != (v is not None):
            raise ValueError("a 'tool' message needs 'tool_call_id', and only a 'tool' message takes it")
        return v

    @model_validator(mode="after")
    def _tool_calls_of_assistant(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only an 'assistant' message has 'tool_calls'")
        return self

    @field_validator("refusal", "function_call", "audio")
    @classmethod
    def _unsupported(cls, v: Any, info: Any) -> Any:
        return _not_supported(f"message {info.field_name}", v)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text or "" for part in self.content or ())


def _stop_list(v: str | list[str] | None) -> str | list[str] | None:
    if isinstance(v, list) and len(v) > MAX_STOP:
        raise ValueError(f"'stop' takes at most {MAX_STOP} sequences, not {len(v)}")
    if (isinstance(v, list) and any(s == "" for s in v)) or v == "":
        raise ValueError("'stop' sequences must not be empty strings")
    return v


def _logit_bias(v: dict[str, float] | None) -> dict[str, float] | None:
    for key, bias in (v or {}).items():
        if not key.isdigit():
            raise ValueError(f"'logit_bias' keys must be token ids, not {key!r}")
        if not -100 <= bias <= 100:
            raise ValueError(f"'logit_bias' values must be between -100 and 100 (token {key}: {bias})")
    return v


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # the parameters are enforced with tool_choice required or named


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(_Strict):
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # the schema is always enforced


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("'json_schema' is required with type 'json_schema', and only allowed with it")
        return self


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs`: exactly one of these."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


def _schema_text(schema: dict[str, Any] | str) -> str:
    return schema if isinstance(schema, str) else json.dumps(schema)


class _SamplingRequest(_Strict):
    """What chat and completion requests share: the sampling fields, their validation and the
    structured-output fields' meaning."""

    frequency_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    n: int | None = Field(default=1, ge=1)  # at most --max-n
    presence_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    response_format: ResponseFormat | None = None  # of chat; an extension of completions, as in vLLM
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(default=1.0, gt=0.0, le=1.0)
    user: str | None = None

    # ---- xlaserve extensions (named as in vLLM) ----------------------------------------------
    top_k: int | None = Field(default=None, ge=-1)  # -1 or 0: off
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    min_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # ---- end of extensions --------------------------------------------------------------------

    _stop = field_validator("stop")(_stop_list)
    _bias = field_validator("logit_bias")(_logit_bias)

    def structured(self) -> tuple[StructuredSpec | None, str | None]:
        """-> (the output's constraint, the parameter that asked for it); ParamError for several."""
        given: list[tuple[StructuredSpec, str]] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            given.append((StructuredSpec("json_object"), "response_format"))
        elif rf is not None and rf.json_schema is not None:
            given.append((StructuredSpec("json_schema", _schema_text(rf.json_schema.schema_ or {})), "response_format"))
        so = self.structured_outputs or StructuredOutputs()
        for name, value in so.model_dump(by_alias=True, exclude_none=True).items():
            if value is not False:  # json_object: false asks for nothing
                given.append((self._spec(name, value), f"structured_outputs.{name}"))
        for name in ("json", "regex", "choice", "grammar"):
            if (value := getattr(self, f"guided_{name}")) is not None:
                given.append((self._spec(name, value), f"guided_{name}"))
        if len(given) > 1:
            names = ", ".join(f"'{p}'" for _, p in given)
            raise ParamError(given[1][1], f"Only one output constraint per request, not {names}")
        return given[0] if given else (None, None)

    @staticmethod
    def _spec(name: str, value: Any) -> StructuredSpec:
        if name == "json":
            return StructuredSpec("json_schema", _schema_text(value))
        if name == "choice":
            return StructuredSpec("choice", tuple(value))
        if name == "json_object":
            return StructuredSpec("json_object")
        return StructuredSpec(name, value)

    def stops(self) -> tuple[str, ...]:
        stop = self.stop
        return () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)

    def _check_common(self) -> None:
        self.structured()
        if self.stream_options is not None and not self.stream:
            raise ParamError("stream_options", "'stream_options' is only allowed when 'stream' is true")


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    audio: Any = None
    function_call: Any = None
    functions: Any = None
    logprobs: bool | None = False
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    metadata: Any = None
    modalities: Any = None
    moderation: Any = None
    parallel_tool_calls: bool | None = None
    prediction: Any = None
    prompt_cache_key: Any = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None
    reasoning_effort: Any = None
    safety_identifier: str | None = Field(default=None, max_length=64)
    service_tier: Any = None
    store: Any = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    tools: list[Tool] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    verbosity: Any = None
    web_search_options: Any = None

    @field_validator(*_CHAT_UNSUPPORTED)
    @classmethod
    def _unsupported(cls, v: Any, info: Any) -> Any:
        return _not_supported(info.field_name, v, _CHAT_UNSUPPORTED[info.field_name])

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def tool_mode(self) -> str:
        """none | auto | required | named: what the request asks of the tools it lists."""
        choice = self.tool_choice
        if not self.tools or choice == "none":
            return "none"
        return "named" if isinstance(choice, NamedToolChoice) else choice or "auto"

    def check(self) -> None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ParamError("top_logprobs", "'top_logprobs' needs 'logprobs' set to true")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ParamError("tool_choice", "'tool_choice' needs 'tools'")
        if isinstance(self.tool_choice, NamedToolChoice):
            name = self.tool_choice.function.name
            if name not in [t.function.name for t in self.tools or ()]:
                raise ParamError("tool_choice", f"'tool_choice' names function '{name}', which is not in 'tools'")
        if self.tool_mode() != "none" and self.structured()[0] is not None:
            raise ParamError("tools", "'tools' and an output constraint (response_format, ...) exclude each other")
        self._check_common()


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions."""

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = Field(default=None, ge=1)  # only equal to n: every sampled choice is returned
    echo: bool | None = False
    logprobs: int | None = Field(default=None, ge=0, le=COMPLETION_MAX_LOGPROBS)
    max_tokens: int | None = Field(default=16, ge=0)
    suffix: str | None = None

    @field_validator(*_COMPLETION_UNSUPPORTED)
    @classmethod
    def _unsupported(cls, v: Any, info: Any) -> Any:
        return _not_supported(info.field_name, v, _COMPLETION_UNSUPPORTED[info.field_name])

    @field_validator("prompt")
    @classmethod
    def _prompt_shape(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("'prompt' must not be an empty list")
            if any(isinstance(p, list) and not p for p in v):
                raise ValueError("'prompt' token lists must not be empty")
            if any(t < 0 for p in v if isinstance(p, list) for t in p) or any(isinstance(t, int) and t < 0 for t in v):
                raise ValueError("'prompt' token ids must not be negative")
        return v

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [list(p)]
        return list(p)

    def check(self) -> None:
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ParamError("best_of", f"'best_of' must equal 'n' ({self.n or 1}): this server returns every choice")
        if self.max_tokens == 0 and not self.echo:
            raise ParamError("max_tokens", "'max_tokens' may be 0 only with 'echo' set to true")
        self._check_common()


class TokenizeRequest(_Strict):
    """POST /tokenize (vLLM's shape): a prompt, or messages as the chat template renders them."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: true for a prompt; messages get the template's only
    add_generation_prompt: bool | None = True
    return_token_strs: bool | None = False

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ParamError("prompt", "Give either 'prompt' or 'messages'")


class DetokenizeRequest(_Strict):
    """POST /detokenize (vLLM's shape)."""

    model: str | None = None
    tokens: list[int]

    def check(self) -> None:
        pass


# ---- responses ---------------------------------------------------------------------------------


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


def now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # taken from the prefix cache


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None  # left out when there are none (the reference has no null)

    @model_serializer(mode="wrap")
    def _calls_if_any(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if data.get("tool_calls") is None:
            data.pop("tool_calls", None)
        return data


class DeltaFunction(BaseModel):
    name: str | None = None  # in a call's first chunk
    arguments: str | None = None  # a fragment: the call's fragments add up to its arguments


class DeltaToolCall(BaseModel):
    """One piece of a streamed call: the first has id, type and name, the next ones only arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str


class DeltaMessage(BaseModel):
    """A stream delta carries only what changed: None fields are left out."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer
    def _present(self) -> dict[str, Any]:
        calls = [c.model_dump(exclude_none=True) for c in self.tool_calls] if self.tool_calls is not None else None
        return {
            k: v for k, v in (("role", self.role), ("content", self.content), ("tool_calls", calls)) if v is not None
        }


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    system_fingerprint: str
    usage: UsageInfo | None = None  # sent (null or not) only with stream_options.include_usage


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None  # None only in stream chunks before the last


class CompletionResponse(BaseModel):
    """`text_completion`: the whole response, and (with usage left out) each stream chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "xlaserve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
