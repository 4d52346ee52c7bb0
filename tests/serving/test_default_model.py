"""The real default model (SmolLM2-135M-Instruct from the shipped GGUF), end to end."""

from __future__ import annotations

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
        assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
        stream = client.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=30,
            temperature=0,
            stream=True,
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "Paris" in text
