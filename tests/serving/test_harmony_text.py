"""Reading a harmony reply token by token: final text as the reply, analysis apart, stop
strings on the reply, and the raw text of a model that writes no channel."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.adapters import mixed_batch_problems
from serving.harmony import HarmonyText, is_harmony


@pytest.fixture(scope="module")
def tokenizer(tiny_gptoss_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_gptoss_dir)


def feed(tokenizer, text: str, stops: tuple[str, ...] = ()) -> tuple[str, str, HarmonyText]:  # type: ignore[no-untyped-def]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    reader = HarmonyText(tokenizer, stops)
    reply, reasoning = [], []
    for n in range(1, len(ids) + 1):  # one token at a time, as the engine feeds it
        reply.append(reader.update(ids[:n]))
        reasoning.append(reader.take_reasoning())
        if reader.stopped_by:
            break
    reply.append(reader.flush())
    reasoning.append(reader.take_reasoning())
    return "".join(reply), "".join(reasoning), reader


def test_channels_split_as_tokens_arrive(tokenizer) -> None:  # type: ignore[no-untyped-def]
    reply, reasoning, _ = feed(
        tokenizer,
        "<|channel|>analysis<|message|>think first<|end|>"
        "<|start|>assistant<|channel|>final<|message|>无聊！去找外星人",
    )
    assert (reply, reasoning) == ("无聊！去找外星人", "think first")
    assert is_harmony("gpt_oss", tokenizer) and not is_harmony("llama", tokenizer)


def test_stop_strings_apply_to_the_reply(tokenizer) -> None:  # type: ignore[no-untyped-def]
    reply, _, reader = feed(
        tokenizer, "<|channel|>final<|message|>hello STOP there", stops=("STOP",)
    )
    assert reply == "hello " and reader.stopped_by == "STOP"


def test_a_model_that_writes_no_channel_gets_its_raw_text(tokenizer) -> None:  # type: ignore[no-untyped-def]
    reply, reasoning, _ = feed(tokenizer, "just words")
    assert (reply, reasoning) == ("just words", "")


def test_parameter_lora_stays_out_of_mixed_batches() -> None:
    assert mixed_batch_problems({"target_modules": ["q_proj"]}) == []
    (problem,) = mixed_batch_problems({"target_parameters": ["mlp.experts.gate_up_proj"]})
    assert "vllm" in problem.lower()
