"""Request and response models of the OpenAI-compatible API, shaped as vLLM's
`entrypoints/openai` protocol so that clients cannot tell the two servers apart."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: A seed's range, as vLLM's: torch's int64.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIBaseModel(BaseModel):
    # Unknown fields are accepted and ignored, as vLLM does, so newer SDKs keep working.
    model_config = ConfigDict(extra="allow")


class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo


# --- models ---------------------------------------------------------------------------------


class ModelPermission(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: random_id("modelperm"))
    object: str = "model_permission"
    created: int = Field(default_factory=lambda: int(time.time()))
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(OpenAIBaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "rolecast"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    permission: list[ModelPermission] = Field(default_factory=lambda: [ModelPermission()])


class ModelList(OpenAIBaseModel):
    object: str = "list"
    data: list[ModelCard] = Field(default_factory=list)


class LoadLoRAAdapterRequest(OpenAIBaseModel):
    lora_name: str = ""
    lora_path: str = ""
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(OpenAIBaseModel):
    lora_name: str = ""
    lora_int_id: int | None = None


# --- chat completions -----------------------------------------------------------------------


class ContentPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict[str, str]:
        return {"role": self.role, "content": self.text()}


#: OpenAI and vLLM request fields this server cannot honour, with the values that ask for
#: nothing: any other value is refused, never silently ignored.
UNHONOURED: dict[str, tuple[object, ...]] = {
    "best_of": (None, 1),
    "logit_bias": (None, {}),
    "top_logprobs": (None, 0),
    "prompt_logprobs": (None, 0),
    "response_format": (None, {"type": "text"}),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "min_p": (None, 0.0),
    "stop_token_ids": (None, []),
    "bad_words": (None, []),
    "allowed_token_ids": (None,),
    "echo": (None, False),
    "use_beam_search": (None, False),
    "length_penalty": (None, 1.0),
    "include_stop_str_in_output": (None, False),
    "skip_special_tokens": (None, True),
    "truncate_prompt_tokens": (None,),
    "logits_processors": (None,),
    "structured_outputs": (None,),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
}


def check_no_request_template(extra: dict[str, Any] | None, kwargs: dict[str, Any] | None) -> None:
    """A chat template sent with a request is refused, as vLLM refuses it without
    `--trust-request-chat-template`: it could write control tokens around message text or
    render for as long as it likes."""
    sent = (extra or {}).get("chat_template")
    if sent is None and kwargs:
        sent = kwargs.get("chat_template")
    if sent is not None:
        raise ValueError(
            "Chat template is passed with request, but the server does not trust request chat "
            "templates. Refused request with untrusted chat template."
        )


class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


class ChatCompletionRequest(OpenAIBaseModel):
    """The fields this server honours; the OpenAI fields it cannot honour are refused with a
    400 when set to anything but their neutral value, never silently ignored."""

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int | None = 1
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = 0.0
    presence_penalty: float | None = 0.0
    logprobs: bool | None = False
    tools: list[dict[str, Any]] | None = None
    user: str | None = None
    # vLLM's extra sampling parameters
    repetition_penalty: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1)  # 0 or -1: off
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    include_reasoning: bool = True  # vLLM's: send a reasoning model's analysis as `reasoning`

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        if self.n not in (None, 1):
            raise ValueError("n must be 1: the embedded server generates one choice per request")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0.0):
                raise ValueError(f"{name} is not supported; use repetition_penalty")
        if self.logprobs:
            raise ValueError("logprobs are not supported by the embedded server")
        if self.tools:
            raise ValueError("tools are not supported by the embedded server")
        for name, value in (self.model_extra or {}).items():
            if name in UNHONOURED and value not in UNHONOURED[name]:
                raise ValueError(f"{name} is not supported by the embedded server")
        check_no_request_template(self.model_extra, self.chat_template_kwargs)
        if self.stream_options is not None and not self.stream:
            raise ValueError("Stream options can only be defined when `stream=True`.")
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError(
                "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
            )
        return self

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in stops if s]


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int | None = 0


class ChatResponseMessage(OpenAIBaseModel):
    role: str = "assistant"
    content: str | None = None
    reasoning: str | None = None


class ChatCompletionResponseChoice(OpenAIBaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: None = None
    finish_reason: str | None = "stop"
    stop_reason: int | str | None = None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo


class DeltaMessage(OpenAIBaseModel):
    role: str | None = None
    content: str | None = None
    reasoning: str | None = None  # vLLM's name (0.26) for a reasoning model's analysis


class ChatCompletionResponseStreamChoice(OpenAIBaseModel):
    index: int
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionResponseStreamChoice]
    usage: UsageInfo | None = None


# --- tokenize -------------------------------------------------------------------------------


class TokenizeCompletionRequest(OpenAIBaseModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(OpenAIBaseModel):
    model: str | None = None
    messages: list[ChatMessage]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> TokenizeChatRequest:
        check_no_request_template(self.model_extra, self.chat_template_kwargs)
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError(
                "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
            )
        return self


TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest


class TokenizeResponse(OpenAIBaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None
