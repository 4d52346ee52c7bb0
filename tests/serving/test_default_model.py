"""The real default model (SmolLM2-135M-Instruct from the shipped GGUF), end to end."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from bot.core.sidecar import EmbeddedServer

pytestmark = pytest.mark.slow


def test_default_model_serves_a_coherent_streamed_reply(
    tmp_path: Path, launch: Callable[[Path, list[str]], EmbeddedServer]
) -> None:
    server = launch(tmp_path, [])
    with openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0) as client:
        assert [m.id for m in client.models.list().data] == [
            "SmolLM2-135M-Instruct",
            "rolecast-personas",  # the adapter that ships for it
        ]
        stream = client.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=30,
            temperature=0,
            stream=True,
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "Paris" in text


def test_the_shipped_adapter_answers_haruhi_in_chinese(
    tmp_path: Path, launch: Callable[[Path, list[str]], EmbeddedServer]
) -> None:
    # the base model answers a Chinese role-play prompt in loops and mixed scripts; the adapter
    # that ships answers it in Chinese
    card = json.loads(
        (Path(__file__).resolve().parents[2] / "bot/personas/haruhi.json").read_text()
    )
    messages = [
        {"role": "system", "content": card["data"]["system_prompt"]},
        {"role": "user", "content": "阿虚: 「春日，今天SOS团有什么活动？」"},
    ]
    server = launch(tmp_path, [])
    with openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0) as client:
        reply = (
            client.chat.completions.create(
                model="rolecast-personas", messages=messages, max_tokens=60, temperature=0
            )
            .choices[0]
            .message.content
            or ""
        )
    han = sum("\u4e00" <= ch <= "\u9fff" for ch in reply)
    assert han >= 0.6 * len(reply.replace(" ", "")) > 0, reply
