"""Evaluation replies end at the chat template's end-of-turn token, whatever the eos is."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from finetune.evaluate import GenerationSettings, generate, stop_token_ids
from finetune.template import end_of_turn_ids, prompt_ids


class ScriptedLlama(LlamaForCausalLM):
    """A tiny Llama whose greedy continuation after the prompt is a fixed token sequence."""

    script: list[int]
    prompt_width: int

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        out = super().forward(*args, **kwargs)
        step = kwargs["attention_mask"].shape[1] - self.prompt_width  # tokens generated so far
        logits = torch.full_like(out.logits, -1e9)
        logits[:, -1, self.script[min(step, len(self.script) - 1)]] = 0.0
        out.logits = logits
        return out


@pytest.fixture
def scripted(smol_tokenizer):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smol_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        pad_token_id=smol_tokenizer.pad_token_id,
    )
    return ScriptedLlama(config).eval()


def test_end_of_turn_is_read_from_the_template(smol_tokenizer, llama3_tokenizer) -> None:  # type: ignore[no-untyped-def]
    assert smol_tokenizer.convert_ids_to_tokens(end_of_turn_ids(smol_tokenizer)) == ["<|im_end|>"]
    assert llama3_tokenizer.convert_ids_to_tokens(end_of_turn_ids(llama3_tokenizer)) == [
        "<|eot_id|>"
    ]


def test_reply_stops_at_end_of_turn_when_eos_is_the_document_end(smol_tokenizer, scripted) -> None:  # type: ignore[no-untyped-def]
    # A converted checkpoint may name <|endoftext|> as its eos: the model then says its reply,
    # closes the turn with <|im_end|>, writes the template's newline and only then stops.
    tok = copy.deepcopy(smol_tokenizer)
    tok.eos_token = "<|endoftext|>"
    scripted.generation_config.eos_token_id = tok.eos_token_id
    reply = tok("哼，无聊！", add_special_tokens=False)["input_ids"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    scripted.script = [*reply, im_end, *newline, tok.eos_token_id]
    contexts = [
        [{"role": "system", "content": "你是凉宫春日。"}, {"role": "user", "content": "你好"}]
    ]
    scripted.prompt_width = len(prompt_ids(tok, contexts[0]))
    assert set(stop_token_ids(tok, scripted)) == {im_end, tok.eos_token_id}
    (out,) = generate(scripted, tok, contexts, GenerationSettings(max_new_tokens=32))
    assert out == "哼，无聊！"
