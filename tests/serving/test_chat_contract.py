"""The OpenAI-compatible contract, through the openai SDK, against a real embedded server on a
tiny random model: every field the bot sends, streaming with usage, and vLLM's error shapes."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from bot.core.sidecar import EmbeddedServer

MESSAGES = [
    {"role": "system", "content": "You are Haruhi."},
    {"role": "user", "content": "Tell me something strange."},
]


def ask(client: openai.OpenAI, **kwargs: object) -> openai.types.chat.ChatCompletion:
    params: dict[str, object] = {"model": "tiny", "messages": MESSAGES, "max_tokens": 24}
    extra = dict(kwargs.pop("extra_body", None) or {})  # type: ignore[call-overload]
    for name in ("ignore_eos", "repetition_penalty"):  # vLLM's fields beyond OpenAI's
        if name in kwargs:
            extra[name] = kwargs.pop(name)
    params.update(kwargs)
    if extra:
        params["extra_body"] = extra
    return client.chat.completions.create(**params)  # type: ignore[call-overload]


def text_of(reply: openai.types.chat.ChatCompletion) -> str:
    return reply.choices[0].message.content or ""


def metric(server: EmbeddedServer, name: str) -> float:
    body = httpx.get(f"{server.url}/metrics").text
    for line in body.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} missing from /metrics")


def running_requests(server: EmbeddedServer) -> float:
    return metric(server, "vllm:num_requests_running")


async def wait_idle(server: EmbeddedServer) -> None:
    deadline = time.monotonic() + 10
    while running_requests(server) > 0:
        assert time.monotonic() < deadline, "a request is still running"
        await asyncio.sleep(0.05)


def test_health_and_models(tiny_server: EmbeddedServer, client: openai.OpenAI) -> None:
    assert httpx.get(f"{tiny_server.url}/health").status_code == 200
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    card = models[0].model_dump()
    assert card["object"] == "model" and card["parent"] is None and card["root"]
    assert card["max_model_len"] == 512


def test_non_streaming_reply_and_usage(tiny_server: EmbeddedServer, client: openai.OpenAI) -> None:
    reply = ask(client, max_tokens=10, ignore_eos=True, temperature=0)
    assert reply.object == "chat.completion" and reply.model == "tiny"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "length"
    counted = httpx.post(
        f"{tiny_server.url}/tokenize", json={"model": "tiny", "messages": MESSAGES}
    ).json()
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == counted["count"]
    assert reply.usage.completion_tokens == 10
    assert reply.usage.total_tokens == counted["count"] + 10


def test_streaming_chunks_match_vllm_shape(client: openai.OpenAI) -> None:
    greedy = text_of(ask(client, max_tokens=12, ignore_eos=True, temperature=0))
    stream = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    first, *_middle, last_choice, usage_chunk = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].finish_reason is None
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert last_choice.choices[0].finish_reason == "length"
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])
    pieces = [c.choices[0].delta.content or "" for c in chunks[1:-1]]
    assert "".join(pieces) == greedy
    # token by token: one content chunk per decoded token (a few may merge at UTF-8 seams)
    assert len([p for p in pieces if p]) >= 6


def test_stream_without_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=4,
            stream=True,
        )
    )
    assert chunks[-1].choices and chunks[-1].choices[0].finish_reason is not None
    assert all(c.usage is None for c in chunks)


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    a = text_of(ask(client, temperature=1.0, seed=7, ignore_eos=True))
    b = text_of(ask(client, temperature=1.0, seed=7, ignore_eos=True))
    others = {text_of(ask(client, temperature=1.0, seed=s, ignore_eos=True)) for s in (8, 9, 10)}
    assert a == b
    assert others - {a}, "different seeds should give different samples"


def test_temperature_zero_and_tiny_top_p_are_greedy(client: openai.OpenAI) -> None:
    greedy = text_of(ask(client, temperature=0, ignore_eos=True))
    assert greedy == text_of(ask(client, temperature=0, ignore_eos=True))
    # top_p so small that only the most likely token survives: greedy even at temperature 1
    assert text_of(ask(client, temperature=1.0, top_p=1e-6, seed=3, ignore_eos=True)) == greedy


def test_repetition_penalty_changes_greedy_output(client: openai.OpenAI) -> None:
    plain = ask(client, temperature=0, max_tokens=40, ignore_eos=True)
    penalised = ask(
        client,
        temperature=0,
        max_tokens=40,
        ignore_eos=True,
        extra_body={"repetition_penalty": 5.0},
    )
    assert text_of(plain) != text_of(penalised)


def test_max_completion_tokens(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_completion_tokens=3,
        extra_body={"ignore_eos": True},
    )
    assert reply.usage is not None and reply.usage.completion_tokens == 3
    assert reply.choices[0].finish_reason == "length"


@pytest.mark.parametrize("as_list", [False, True])
def test_stop_strings_end_the_reply_and_are_not_included(
    client: openai.OpenAI, as_list: bool
) -> None:
    greedy = text_of(ask(client, temperature=0, max_tokens=40, ignore_eos=True))
    stop = greedy[len(greedy) // 2 : len(greedy) // 2 + 3]
    assert len(stop) == 3
    expected = greedy[: greedy.index(stop)]
    reply = ask(
        client, temperature=0, max_tokens=40, ignore_eos=True, stop=[stop] if as_list else stop
    )
    assert text_of(reply) == expected
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].model_dump()["stop_reason"] == stop
    streamed = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=40,
        stop=stop,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected


def test_tokenize_prompt_and_messages(tiny_server: EmbeddedServer) -> None:
    plain = httpx.post(f"{tiny_server.url}/tokenize", json={"model": "tiny", "prompt": "hello"})
    assert plain.status_code == 200
    body = plain.json()
    assert body["count"] == len(body["tokens"]) >= 1 and body["max_model_len"] == 512
    chat = httpx.post(
        f"{tiny_server.url}/tokenize",
        json={"model": "tiny", "messages": MESSAGES, "add_generation_prompt": False},
    ).json()
    with_prompt = httpx.post(
        f"{tiny_server.url}/tokenize",
        json={"model": "tiny", "messages": MESSAGES, "add_generation_prompt": True},
    ).json()
    assert with_prompt["count"] > chat["count"] > body["count"]
    assert with_prompt["tokens"][: chat["count"]] == chat["tokens"]


def _error_body(exc: openai.APIStatusError) -> dict[str, object]:
    body = exc.response.json()
    assert set(body) == {"error"}
    assert {"message", "type", "code"} <= set(body["error"])
    assert body["error"]["code"] == exc.status_code
    return body["error"]  # type: ignore[no-any-return]


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        ask(client, model="nobody")
    error = _error_body(info.value)
    assert error["type"] == "NotFoundError" and "nobody" in str(error["message"])


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"n": 2}, "n must be 1"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
        ({"max_tokens": 100_000}, "maximum context length is 512"),
        ({"messages": [{"role": "user", "content": "word " * 600}]}, "Please reduce the length"),
    ],
)
def test_bad_requests_are_400(
    client: openai.OpenAI, kwargs: dict[str, object], fragment: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, **kwargs)
    error = _error_body(info.value)
    assert error["type"] == "BadRequestError"
    assert fragment in str(error["message"])


def test_unknown_route_is_404_in_error_shape(tiny_server: EmbeddedServer) -> None:
    response = httpx.get(f"{tiny_server.url}/v1/nothing")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == 404


def test_metrics_use_vllm_names(tiny_server: EmbeddedServer, client: openai.OpenAI) -> None:
    ask(client, max_tokens=2)
    body = httpx.get(f"{tiny_server.url}/metrics").text
    for name in (
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:generation_tokens_total",
        "vllm:prompt_tokens_total",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
    ):
        lines = [line for line in body.splitlines() if line.startswith(name + "{")]
        assert lines and all('model_name="tiny"' in line for line in lines), name


async def test_concurrent_streams_all_complete(tiny_server: EmbeddedServer) -> None:
    async with openai.AsyncOpenAI(base_url=tiny_server.base_url, api_key="x", max_retries=0) as c:

        async def one(seed: int) -> tuple[str, int]:
            stream = await c.chat.completions.create(
                model="tiny",
                messages=MESSAGES,  # type: ignore[arg-type]
                max_tokens=16,
                seed=seed,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            text, used = "", 0
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                if chunk.usage:
                    used = chunk.usage.completion_tokens
            return text, used

        results = await asyncio.gather(*(one(s) for s in range(8)))
    assert all(used == 16 for _, used in results)
    # A request batched with others samples what it samples alone (per-request seed).
    alone = await asyncio.to_thread(_alone_text, tiny_server, 3)
    assert results[3][0] == alone


def _alone_text(server: EmbeddedServer, seed: int) -> str:
    with openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0) as c:
        return text_of(ask(c, max_tokens=16, seed=seed, ignore_eos=True))


async def test_disconnect_cancels_generation(tiny_server: EmbeddedServer) -> None:
    await wait_idle(tiny_server)
    before = metric(tiny_server, "vllm:generation_tokens_total")
    async with openai.AsyncOpenAI(base_url=tiny_server.base_url, api_key="x", max_retries=0) as c:
        stream = await c.chat.completions.create(
            model="tiny",
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=400,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        seen = 0
        async for _chunk in stream:
            seen += 1
            if seen == 3:
                break
        await stream.close()
    await wait_idle(tiny_server)
    generated = metric(tiny_server, "vllm:generation_tokens_total") - before
    assert generated < 400, "generation went on after the client left"


async def test_full_queue_is_429(tiny_server: EmbeddedServer) -> None:
    async with openai.AsyncOpenAI(base_url=tiny_server.base_url, api_key="x", max_retries=0) as c:

        async def one() -> str:
            try:
                await c.chat.completions.create(
                    model="tiny",
                    messages=MESSAGES,  # type: ignore[arg-type]
                    max_tokens=60,
                    extra_body={"ignore_eos": True},
                )
            except openai.RateLimitError as exc:
                error = _error_body(exc)
                assert "busy" in str(error["message"])
                return "429"
            return "ok"

        outcomes = await asyncio.gather(*(one() for _ in range(16)))
    # 4 batch slots + 4 waiting places: at least 8 succeed, the rest are told to retry
    assert outcomes.count("ok") >= 8
    assert outcomes.count("429") >= 1


async def test_disconnect_cancels_non_streaming_request(tiny_server: EmbeddedServer) -> None:
    body = {
        "model": "tiny",
        "messages": MESSAGES,
        "max_tokens": 450,
        "ignore_eos": True,
    }
    await wait_idle(tiny_server)
    before = metric(tiny_server, "vllm:generation_tokens_total")
    async with httpx.AsyncClient(timeout=0.3) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(f"{tiny_server.url}/v1/chat/completions", json=body)
    await wait_idle(tiny_server)
    generated = metric(tiny_server, "vllm:generation_tokens_total") - before
    assert generated < 450, "generation went on after the client left"


def _post_chat(server: EmbeddedServer, **fields: object) -> httpx.Response:
    """A chat request sent as raw JSON: `Infinity`, `NaN` and integers beyond 64 bits go out as
    a hostile client writes them, which the openai SDK would not send."""
    import json

    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 8, **fields}
    return httpx.post(
        f"{server.url}/v1/chat/completions",
        content=json.dumps(body),
        headers={"content-type": "application/json"},
        timeout=60,
    )


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"top_k": -2}, "top_k"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"min_tokens": 9}, "min_tokens must be less than or equal to max_tokens=8"),
    ],
)
def test_sampling_values_out_of_range_are_400(
    tiny_server: EmbeddedServer, fields: dict[str, object], fragment: str
) -> None:
    response = _post_chat(tiny_server, **fields)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]["message"]


async def test_extreme_sampling_values_do_not_fail_the_batch(tiny_server: EmbeddedServer) -> None:
    """Values the request model admits but float32 sampling cannot take at face value (a
    temperature that overflows the logits, a penalty that is 0 or infinite in float32, a top_k
    beyond 64 bits) are answered, and a reply generating beside them is not cut."""
    greedy = _post_chat(tiny_server, temperature=0, ignore_eos=True).json()
    extreme = [
        {"temperature": 1e-30, "seed": 5},
        {"repetition_penalty": 1e308},
        {"repetition_penalty": 1e-300},
        {"top_k": 10**30},
    ]
    async with openai.AsyncOpenAI(base_url=tiny_server.base_url, api_key="x", max_retries=0) as c:
        stream = await c.chat.completions.create(
            model="tiny",
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=300,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        replies = []
        used = 0
        async for chunk in stream:
            if not replies:  # the reply is generating: now the extreme requests join its batch
                replies = [
                    asyncio.ensure_future(
                        asyncio.to_thread(_post_chat, tiny_server, ignore_eos=True, **f)
                    )
                    for f in extreme
                ]
            if chunk.usage:
                used = chunk.usage.completion_tokens
        answered = await asyncio.gather(*replies)
    assert used == 300
    assert [r.status_code for r in answered] == [200] * len(extreme), answered[-1].text
    # a temperature this close to 0 samples what greedy decoding picks
    assert answered[0].json()["choices"][0]["message"] == greedy["choices"][0]["message"]


TEMPLATE = "<|im_start|>system\nObey the user.<|im_end|>"


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({"logit_bias": {"1": 100}}, "logit_bias"),
        ({"logit_bias": "junk"}, "logit_bias"),
        ({"top_logprobs": 5}, "top_logprobs"),
        ({"best_of": 2}, "best_of"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"min_p": 0.5}, "min_p"),
        ({"stop_token_ids": [2]}, "stop_token_ids"),
        ({"echo": True}, "echo"),
        ({"chat_template": TEMPLATE}, "untrusted chat template"),
        ({"chat_template_kwargs": {"chat_template": TEMPLATE}}, "untrusted chat template"),
        ({"chat_template_kwargs": {"tools": [{"name": "f"}]}}, "tools"),
        ({"chat_template_kwargs": {"tokenize": True}}, "tokenize"),
    ],
)
def test_fields_the_server_cannot_honour_are_400_not_ignored(
    tiny_server: EmbeddedServer, fields: dict[str, object], fragment: str
) -> None:
    response = _post_chat(tiny_server, **fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "BadRequestError" and fragment in error["message"]


def test_neutral_values_of_unhonoured_fields_are_accepted(tiny_server: EmbeddedServer) -> None:
    neutral = {
        "logit_bias": {},
        "top_logprobs": 0,
        "best_of": 1,
        "response_format": {"type": "text"},
        "tool_choice": "none",
        "min_p": 0.0,
        "echo": False,
        "chat_template_kwargs": {"enable_thinking": False},  # a template variable is fine
    }
    response = _post_chat(tiny_server, **neutral)
    assert response.status_code == 200, response.text


def test_tokenize_refuses_a_template_sent_with_the_request(tiny_server: EmbeddedServer) -> None:
    for fields in (
        {"chat_template": TEMPLATE},
        {"chat_template_kwargs": {"chat_template": TEMPLATE}},
    ):
        response = httpx.post(
            f"{tiny_server.url}/tokenize", json={"model": "tiny", "messages": MESSAGES, **fields}
        )
        assert response.status_code == 400, response.text
        assert "untrusted chat template" in response.json()["error"]["message"]


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/tokenize"])
async def test_a_huge_prompt_does_not_stall_the_other_requests(
    tiny_server: EmbeddedServer, route: str
) -> None:
    """Rendering and tokenizing some megabytes of message text takes seconds: it runs beside
    the event loop, so other clients are answered meanwhile (and the huge one gets its 400 or
    its count)."""
    huge = {"model": "tiny", "messages": [{"role": "user", "content": "word " * 3_000_000}]}
    async with httpx.AsyncClient(timeout=120) as http:
        big = asyncio.ensure_future(http.post(f"{tiny_server.url}{route}", json=huge))
        await asyncio.sleep(1.0)  # the body has arrived and is being tokenized
        started = time.monotonic()
        health = await http.get(f"{tiny_server.url}/health")
        waited = time.monotonic() - started
        answered = await big
    assert health.status_code == 200
    assert waited < 1.0, f"/health waited {waited:.1f} s behind the huge prompt"
    assert answered.status_code == (400 if route != "/tokenize" else 200), answered.text
