"""Evaluation replies end at the chat template's end-of-turn token, whatever the eos is."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from finetune.errors import ConfigError
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


def tiny_config(tokenizer: Any, **overrides: Any) -> LlamaConfig:
    """A one-layer Llama over the tokenizer's vocabulary: milliseconds per token."""
    sizes = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 512,
    }
    return LlamaConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **{**sizes, **overrides}
    )


@pytest.fixture
def scripted(smol_tokenizer):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return ScriptedLlama(tiny_config(smol_tokenizer)).eval()


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


CONTEXTS = [
    [{"role": "system", "content": "你是凉宫春日。"}, {"role": "user", "content": text}]
    for text in ("你好", "阿虚: 「会议？那是啥啊」", "今天去找外星人吗？还是去找未来人？")
]


@pytest.fixture(scope="module")
def tiny(smol_tokenizer):  # type: ignore[no-untyped-def]
    """A tiny random Llama with large weights, so different prompts get different replies."""
    torch.manual_seed(0)
    config = tiny_config(smol_tokenizer, num_hidden_layers=2, initializer_range=0.5)
    tok = copy.deepcopy(smol_tokenizer)
    tok.padding_side = "left"
    return LlamaForCausalLM(config).eval(), tok


def test_consensus_picks_the_reply_most_like_the_others() -> None:
    from finetune.metrics import consensus

    # jieba: 我们/去/找/外星人 vs 我们/去/找/外星人/吧 share 4 tokens (F1 0.889); each shares
    # only 外星人 with 外星人/在/哪里 (F1 0.286 and 0.250), and nothing with 无聊.
    candidates = ["外星人在哪里", "我们去找外星人", "我们去找外星人吧", "无聊", ""]
    assert consensus(candidates) == 1
    assert consensus(["", ""]) == 0


def test_consensus_utility_is_the_metrics_rouge_l() -> None:
    from finetune.metrics import rouge, rouge_l_matrix

    texts = [
        "没错！我们要让SOS团成为全世界最有趣的社团！",
        "阿虚，你又在发呆了。快点过来，我们要开会！会议内容是找外星人。",
        "哼，无聊死了……无聊无聊无聊！",
        "SOS团的活动方针就是找出外星人、未来人以及超能力者，然后跟他们一起玩！",
        "我们要让SOS团成为全世界最有趣的社团，没错吧？",
        "OK, let's go find aliens!",
        "",
    ]
    matrix = rouge_l_matrix(texts, texts[::-1])
    for i, a in enumerate(texts):
        for j, b in enumerate(texts[::-1]):
            assert 100 * matrix[i, j] == pytest.approx(rouge(a, b)["rouge-l"], abs=1e-3), (a, b)


def test_generation_settings_refuse_contradictions() -> None:
    with pytest.raises(ConfigError):
        GenerationSettings(num_beams=0)
    with pytest.raises(ConfigError):
        GenerationSettings(num_beams=4, samples=8)
    with pytest.raises(ConfigError):
        GenerationSettings(samples=8, temperature=0.0)
    with pytest.raises(ConfigError):
        GenerationSettings(sample=True, num_beams=2)
    with pytest.raises(ConfigError):
        GenerationSettings(sample=True, top_p=0.0)


def test_one_sampled_reply_is_drawn_at_random_and_seeded(tiny) -> None:  # type: ignore[no-untyped-def]
    # `sample` draws one reply per prompt, as a chat server does: at a vanishing temperature it
    # is the greedy reply; at temperature 1 the seed decides it, and another seed changes it
    model, tok = tiny
    greedy = generate(model, tok, CONTEXTS, GenerationSettings(max_new_tokens=8))
    cold = GenerationSettings(max_new_tokens=8, sample=True, temperature=1e-4)
    assert generate(model, tok, CONTEXTS, cold) == greedy
    hot = [GenerationSettings(max_new_tokens=8, sample=True, seed=s) for s in (1, 1, 2)]
    first, again, other = (generate(model, tok, CONTEXTS, h) for h in hot)
    assert first == again
    assert first != other and first != greedy


def test_sampled_consensus_keeps_each_prompt_its_own_replies(tiny) -> None:  # type: ignore[no-untyped-def]
    # at a vanishing temperature every sample is the greedy reply, so the consensus of each
    # prompt's samples must be that prompt's greedy reply: rows are grouped per prompt
    model, tok = tiny
    greedy = generate(model, tok, CONTEXTS, GenerationSettings(max_new_tokens=8))
    sampled = generate(
        model, tok, CONTEXTS, GenerationSettings(max_new_tokens=8, samples=3, temperature=1e-4)
    )
    assert sampled == greedy
    assert len(set(greedy)) == len(CONTEXTS)  # the prompts do get different replies


def test_beam_search_in_a_batch_matches_one_prompt_at_a_time(tiny) -> None:  # type: ignore[no-untyped-def]
    model, tok = tiny
    settings = GenerationSettings(max_new_tokens=8, num_beams=3)
    batched = generate(model, tok, CONTEXTS, settings)
    alone = [generate(model, tok, [c], settings)[0] for c in CONTEXTS]
    assert batched == alone


def test_samples_from_one_shared_prefill_are_those_generate_draws(tiny) -> None:  # type: ignore[no-untyped-def]
    # one prefill per prompt, copied for its samples, must give the very replies generate gives
    # when it copies each prompt n times itself: same seed, same draws, same positions under
    # left padding (the prompts differ in length)
    from finetune.evaluate import candidates

    model, tok = tiny
    settings = GenerationSettings(max_new_tokens=8, samples=4, temperature=1.0, batch_size=8)
    shared = candidates(model, tok, CONTEXTS, settings)
    assert shared == candidates(model, tok, CONTEXTS, settings, share_prefill=False)
    assert all(len(set(s)) > 1 for s in shared)  # really sampled
