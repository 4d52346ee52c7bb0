"""A gpt-oss model behind the embedded server: prompts in the harmony template, replies read by
channel, and the analysis channel never in the reply nor in what the bot shows.

The tiny model is trained here (all weights, a few seconds) to answer one conversation with an
analysis message and then a final one, so that the server sees real harmony output."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from bot.core.client import Completion, ModelClient
from bot.core.sidecar import EmbeddedServer
from bot.settings import SamplingSettings
from tests.serving.conftest import start_server

MESSAGES = [
    {"role": "system", "content": "你是凉宫春日。"},
    {"role": "user", "content": "阿虚: 「今天做什么？」"},
]
ANALYSIS = "Kyon asks again; answer boldly."
FINAL = "去找外星人！"


def memorise(folder: Path) -> None:
    """Train the model in `folder` until greedy decoding of MESSAGES gives the harmony reply."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    reply = (
        f"<|channel|>analysis<|message|>{ANALYSIS}<|end|>"
        f"<|start|>assistant<|channel|>final<|message|>{FINAL}<|return|>"
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + reply_ids])
    labels = ids.clone()
    labels[0, : len(prompt_ids)] = -100
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def learned() -> bool:
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1]
        return bool(logits.argmax(-1).tolist() == reply_ids)

    for _ in range(300):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if float(loss.detach()) < 0.05 and learned():
            break
    assert learned(), "the tiny model did not learn the reply"
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def harmony_server(
    tiny_gptoss_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedServer]:
    folder = tmp_path_factory.mktemp("gptoss-harmony") / "model"
    shutil.copytree(tiny_gptoss_dir, folder)
    memorise(folder)
    server = start_server(
        tmp_path_factory.mktemp("gptoss-server"),
        ["--model", str(folder), "--served-model-name", "gpt-oss", "--max-model-len", "512"],
    )
    try:
        yield server
    finally:
        server.stop()


def test_replies_are_the_final_channel_and_reasoning_is_apart(
    harmony_server: EmbeddedServer,
) -> None:
    body = {"model": "gpt-oss", "messages": MESSAGES, "temperature": 0, "max_tokens": 80}
    answer = httpx.post(f"{harmony_server.base_url}/chat/completions", json=body, timeout=60)
    message = answer.json()["choices"][0]["message"]
    assert message["content"] == FINAL
    assert message["reasoning"] == ANALYSIS
    assert answer.json()["choices"][0]["finish_reason"] == "stop"
    hidden = httpx.post(
        f"{harmony_server.base_url}/chat/completions",
        json={**body, "include_reasoning": False},
        timeout=60,
    )
    assert hidden.json()["choices"][0]["message"]["content"] == FINAL
    assert not hidden.json()["choices"][0]["message"].get("reasoning")


def test_the_stream_keeps_reasoning_out_of_content(harmony_server: EmbeddedServer) -> None:
    body = {
        "model": "gpt-oss",
        "messages": MESSAGES,
        "temperature": 0,
        "max_tokens": 80,
        "stream": True,
    }
    content, reasoning = [], []
    with httpx.stream(
        "POST", f"{harmony_server.base_url}/chat/completions", json=body, timeout=60
    ) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                delta = choice.get("delta", {})
                content.append(delta.get("content") or "")
                reasoning.append(delta.get("reasoning") or "")
    assert "".join(content) == FINAL
    assert "".join(reasoning) == ANALYSIS


async def test_the_bot_shows_the_reply_alone(harmony_server: EmbeddedServer) -> None:
    sampling = SamplingSettings(temperature=0.0, max_tokens=80)
    parts: list[str] = []
    done: Completion | None = None
    async with ModelClient(harmony_server.base_url) as client:
        async for event in client.stream_chat("gpt-oss", MESSAGES, sampling):
            if isinstance(event, Completion):
                done = event
            else:
                parts.append(event)
    assert "".join(parts) == FINAL
    assert done is not None and done.complete and done.text == FINAL


def test_the_prompt_is_the_harmony_template(harmony_server: EmbeddedServer) -> None:
    from transformers import AutoTokenizer

    counted = httpx.post(
        f"{harmony_server.url}/tokenize", json={"model": "gpt-oss", "messages": MESSAGES}
    ).json()
    root = httpx.get(f"{harmony_server.base_url}/models").json()["data"][0]["root"]
    tokenizer = AutoTokenizer.from_pretrained(root)
    expected = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True)
    assert counted["tokens"] == list(expected["input_ids"])
    text = tokenizer.decode(counted["tokens"])
    assert text.startswith("<|start|>system<|message|>")
    assert "<|start|>developer<|message|># Instructions\n\n你是凉宫春日。" in text
    assert text.endswith("<|start|>assistant")
