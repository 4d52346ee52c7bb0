"""Request handlers: models, chat completions (plain and SSE), tokenize. They speak the protocol
models and typed errors; the routes in `app.py` turn those into HTTP."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from typing import Any, TypeVar

from formats.rendering import ChatRenderer
from serving.engine import Engine, RequestOutput
from serving.errors import BadRequestError, ModelNotFoundError, ServingError
from serving.models import LoadedModel
from serving.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    ChatResponseMessage,
    DeltaMessage,
    ErrorInfo,
    ErrorResponse,
    LoadLoRAAdapterRequest,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    UnloadLoRAAdapterRequest,
    UsageInfo,
    random_id,
)
from serving.sampling import SamplingParams

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Rendering and tokenizing prompts, one at a time beside the event loop (as vLLM tokenizes in
#: a thread of its own): megabytes of message text take seconds, which on the event loop would
#: stall every other request and stream.
_RENDER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rolecast-render")


async def off_loop(work: Callable[[], T]) -> T:
    return await asyncio.get_running_loop().run_in_executor(_RENDER, work)


def error_response(exc: ServingError) -> ErrorResponse:
    return ErrorResponse(
        error=ErrorInfo(
            message=exc.message, type=exc.err_type, param=exc.param, code=int(exc.status)
        )
    )


class ServingModels:
    """The base model and the loaded adapters: `/v1/models`, the `model` field, and
    `/v1/load_lora_adapter` / `/v1/unload_lora_adapter`."""

    def __init__(self, engine: Engine, base_name: str, base_path: str) -> None:
        self.engine = engine
        self.base_name = base_name
        self.base_path = base_path

    def resolve(self, model: str | None) -> str | None:
        """The adapter a request's `model` names, None for the base; unknown names are a 404."""
        if not model or model == self.base_name:
            return None
        if model in self.engine.adapters():
            return model
        raise ModelNotFoundError(model)

    def list_models(self) -> ModelList:
        max_len = self.engine.loaded.max_model_len
        cards = [ModelCard(id=self.base_name, root=self.base_path, max_model_len=max_len)]
        for name, path in sorted(self.engine.adapters().items()):
            cards.append(ModelCard(id=name, root=path, parent=self.base_name))
        return ModelList(data=cards)

    async def load_lora_adapter(self, request: LoadLoRAAdapterRequest) -> str:
        if not request.lora_name or not request.lora_path:
            raise BadRequestError("Both 'lora_name' and 'lora_path' must be provided.")
        if request.load_inplace:
            raise BadRequestError(
                "load_inplace is not supported: load the new weights under a new name "
                "(reusing a name is what breaks clients' and servers' caches)."
            )
        if request.lora_name == self.base_name:
            raise BadRequestError(f"'{request.lora_name}' is the base model's name.")
        await self.engine.load_adapter(request.lora_name, request.lora_path)
        return f"Success: LoRA adapter '{request.lora_name}' added successfully."

    async def unload_lora_adapter(self, request: UnloadLoRAAdapterRequest) -> str:
        if not request.lora_name:
            raise BadRequestError("'lora_name' needs to be provided to unload a LoRA adapter.")
        await self.engine.unload_adapter(request.lora_name)
        return f"Success: LoRA adapter '{request.lora_name}' removed successfully."


class ServingChat:
    """`POST /v1/chat/completions`."""

    def __init__(self, engine: Engine, models: ServingModels, loaded: LoadedModel) -> None:
        self.engine = engine
        self.models = models
        self.tokenizer = loaded.tokenizer
        self.renderer = ChatRenderer(loaded.tokenizer)
        # `apply_chat_template`'s own parameters (tokenize, tools, chat_template, ...): the
        # server sets those, so `chat_template_kwargs` may not (it holds template variables).
        signature = inspect.signature(loaded.tokenizer.apply_chat_template).parameters
        self.reserved_kwargs = frozenset(
            n for n, p in signature.items() if p.kind is not p.VAR_KEYWORD
        )
        self.max_model_len = loaded.max_model_len
        gen = getattr(loaded.model, "generation_config", None)
        # Like vLLM's `--generation-config auto`: the model's own defaults, where it has them.
        self.defaults: dict[str, Any] = {
            "temperature": getattr(gen, "temperature", None) if gen else None,
            "top_p": getattr(gen, "top_p", None) if gen else None,
            "top_k": getattr(gen, "top_k", None) if gen else None,
            "repetition_penalty": getattr(gen, "repetition_penalty", None) if gen else None,
        }

    def render(
        self,
        messages: list[ChatMessage],
        *,
        add_generation_prompt: bool,
        continue_final_message: bool = False,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """The prompt's token ids, formatted only by the tokenizer's chat template. Message
        text never becomes a control token (see `formats.rendering`)."""
        reserved = sorted(self.reserved_kwargs.intersection(template_kwargs or {}))
        if reserved:
            raise BadRequestError(
                f"chat_template_kwargs cannot set {', '.join(reserved)}: they are the "
                "server's to set, not the chat template's variables.",
                param="chat_template_kwargs",
            )
        try:
            return self.renderer.ids(
                [m.for_template() for m in messages],
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                **(template_kwargs or {}),
            )
        except Exception as exc:  # jinja2 errors are the client's: vLLM answers 400 too
            raise BadRequestError(f"The chat template failed on these messages: {exc}") from exc

    def sampling_params(self, request: ChatCompletionRequest, prompt_len: int) -> SamplingParams:
        room = self.max_model_len - prompt_len
        if room <= 0:
            raise BadRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"your request has {prompt_len} input tokens. Please reduce the length of the "
                "input messages.",
                param="messages",
            )
        max_tokens = request.max_completion_tokens or request.max_tokens
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise BadRequestError(
                f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This "
                f"model's maximum context length is {self.max_model_len} tokens and your request "
                f"has {prompt_len} input tokens ({max_tokens} > {self.max_model_len} - "
                f"{prompt_len}).",
                param="max_tokens",
            )
        if request.min_tokens > max_tokens:
            raise BadRequestError(
                f"min_tokens must be less than or equal to max_tokens={max_tokens}, got "
                f"{request.min_tokens}.",
                param="min_tokens",
            )

        def pick(name: str, fallback: float) -> Any:
            value = getattr(request, name)
            if value is None:
                value = self.defaults.get(name)
            return fallback if value is None else value

        return SamplingParams(
            max_tokens=max_tokens,
            temperature=float(pick("temperature", 1.0)),
            top_p=float(pick("top_p", 1.0)),
            top_k=int(pick("top_k", 0)),
            repetition_penalty=float(pick("repetition_penalty", 1.0)),
            seed=request.seed,
            stop=tuple(request.stop_strings()),
            ignore_eos=request.ignore_eos,
            min_tokens=request.min_tokens,
        )

    def prepare(self, request: ChatCompletionRequest) -> tuple[str, str | None, list[int], Any]:
        """Check a request before anything streams: model, prompt, sampling. Errors raise."""
        adapter = self.models.resolve(request.model)
        prompt_ids = self.render(
            request.messages,
            add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message,
            template_kwargs=request.chat_template_kwargs,
        )
        params = self.sampling_params(request, len(prompt_ids))
        return request.model or self.models.base_name, adapter, prompt_ids, params

    async def complete(self, request: ChatCompletionRequest) -> ChatCompletionResponse:
        model, adapter, prompt_ids, params = await off_loop(lambda: self.prepare(request))
        request_id = random_id("chatcmpl")
        parts: list[str] = []
        reasoning: list[str] = []
        last: RequestOutput | None = None
        async with aclosing(
            self.engine.generate(prompt_ids, params, adapter=adapter, request_id=request_id)
        ) as outputs:
            async for out in outputs:
                parts.append(out.text)
                reasoning.append(out.reasoning)
                last = out
        assert last is not None and last.finished
        usage = UsageInfo(
            prompt_tokens=len(prompt_ids),
            completion_tokens=last.completion_tokens,
            total_tokens=len(prompt_ids) + last.completion_tokens,
        )
        choice = ChatCompletionResponseChoice(
            index=0,
            message=ChatResponseMessage(
                role="assistant",
                content="".join(parts),
                reasoning=("".join(reasoning) or None) if request.include_reasoning else None,
            ),
            finish_reason=last.finish_reason,
            stop_reason=last.stop_reason,
        )
        return ChatCompletionResponse(id=request_id, model=model, choices=[choice], usage=usage)

    async def stream(self, request: ChatCompletionRequest) -> AsyncIterator[str]:
        """Check the request (errors raise before the first byte), then return the SSE body."""
        model, adapter, prompt_ids, params = await off_loop(lambda: self.prepare(request))
        request_id = random_id("chatcmpl")
        # Queue it now, so a full queue is a 429 status rather than an error inside the stream.
        queued = self.engine.submit(prompt_ids, params, adapter=adapter, request_id=request_id)
        return self._sse(request, request_id, model, len(prompt_ids), self.engine.outputs(queued))

    async def _sse(
        self,
        request: ChatCompletionRequest,
        request_id: str,
        model: str,
        prompt_tokens: int,
        outputs: AsyncGenerator[RequestOutput, None],
    ) -> AsyncIterator[str]:
        created = int(time.time())
        options = request.stream_options
        include_usage = bool(options and options.include_usage)
        continuous = bool(include_usage and options and options.continuous_usage_stats)

        def usage(completion: int) -> UsageInfo:
            return UsageInfo(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion,
                total_tokens=prompt_tokens + completion,
            )

        def chunk(choice: ChatCompletionResponseStreamChoice, completion: int) -> str:
            body = ChatCompletionStreamResponse(
                id=request_id,
                object="chat.completion.chunk",
                created=created,
                model=model,
                choices=[choice],
            )
            if continuous:
                body.usage = usage(completion)
            return f"data: {body.model_dump_json(exclude_unset=True)}\n\n"

        try:
            async with aclosing(outputs):
                role = DeltaMessage(role="assistant", content="")
                yield chunk(_choice(role), 0)
                completion = 0
                async for out in outputs:
                    completion = out.completion_tokens
                    if out.reasoning and request.include_reasoning:
                        delta = DeltaMessage(reasoning=out.reasoning)
                        yield chunk(_choice(delta), completion)
                    if out.finished:
                        delta = DeltaMessage(content=out.text)
                        yield chunk(_choice(delta, out.finish_reason, out.stop_reason), completion)
                        break
                    if out.text:
                        yield chunk(_choice(DeltaMessage(content=out.text)), completion)
                if include_usage:
                    final = ChatCompletionStreamResponse(
                        id=request_id,
                        object="chat.completion.chunk",
                        created=created,
                        model=model,
                        choices=[],
                        usage=usage(completion),
                    )
                    yield f"data: {final.model_dump_json(exclude_unset=True)}\n\n"
        except ServingError as exc:
            yield f"data: {error_response(exc).model_dump_json()}\n\n"
        except Exception:
            log.exception("streaming request %s failed", request_id)
            err = ServingError("Internal server error while generating.")
            yield f"data: {error_response(err).model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"


def _choice(
    delta: DeltaMessage, finish_reason: str | None = None, stop_reason: int | str | None = None
) -> ChatCompletionResponseStreamChoice:
    # Every field set explicitly: chunks are dumped with exclude_unset, and vLLM sends these.
    return ChatCompletionResponseStreamChoice(
        index=0, delta=delta, logprobs=None, finish_reason=finish_reason, stop_reason=stop_reason
    )


class ServingTokenization:
    """`POST /tokenize`, as vLLM serves it."""

    def __init__(self, chat: ServingChat, models: ServingModels) -> None:
        self.chat = chat
        self.models = models

    def tokenize(
        self, request: TokenizeCompletionRequest | TokenizeChatRequest
    ) -> TokenizeResponse:
        self.models.resolve(request.model)
        tokenizer = self.chat.tokenizer
        if isinstance(request, TokenizeChatRequest):
            ids = self.chat.render(
                request.messages,
                add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message,
                template_kwargs=request.chat_template_kwargs,
            )
            if request.add_special_tokens and tokenizer.bos_token_id is not None:
                if not ids or ids[0] != tokenizer.bos_token_id:
                    ids = [tokenizer.bos_token_id, *ids]
        else:
            encoded = tokenizer(request.prompt, add_special_tokens=request.add_special_tokens)
            ids = list(encoded["input_ids"])
        strs = list(tokenizer.convert_ids_to_tokens(ids)) if request.return_token_strs else None
        return TokenizeResponse(
            count=len(ids), max_model_len=self.chat.max_model_len, tokens=ids, token_strs=strs
        )
