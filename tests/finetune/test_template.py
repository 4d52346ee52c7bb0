"""Assistant-only labels from the chat template, checked on two different templates."""

from __future__ import annotations

import pytest

from finetune.errors import TemplateError
from finetune.template import IGNORE_INDEX, encode

MESSAGES = [
    {"role": "system", "content": "你是凉宫春日。"},
    {"role": "user", "content": "阿虚: 「会议？那是啥啊」"},
    {"role": "assistant", "content": "会议就是SOS团的作战会议！"},
    {"role": "user", "content": "Why me?"},
    {"role": "assistant", "content": "Because you are a member, Kyon."},
]


def labelled_segments(tokenizer, enc) -> list[str]:  # type: ignore[no-untyped-def]
    """Decoded runs of consecutive labelled tokens."""
    segments, run = [], []
    for token, label in zip(enc.input_ids, enc.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(token)
        elif run:
            segments.append(tokenizer.decode(run))
            run = []
    if run:
        segments.append(tokenizer.decode(run))
    return segments


def test_chatml_labels_cover_exactly_every_reply(smol_tokenizer) -> None:  # type: ignore[no-untyped-def]
    enc = encode(smol_tokenizer, MESSAGES)
    assert (
        enc.input_ids
        == smol_tokenizer.apply_chat_template(MESSAGES, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )
    assert labelled_segments(smol_tokenizer, enc) == [
        "会议就是SOS团的作战会议！<|im_end|>\n",
        "Because you are a member, Kyon.<|im_end|>\n",
    ]


def test_llama3_style_labels_cover_exactly_every_reply(llama3_tokenizer) -> None:  # type: ignore[no-untyped-def]
    enc = encode(llama3_tokenizer, MESSAGES)
    text = llama3_tokenizer.decode(enc.input_ids)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    assert labelled_segments(llama3_tokenizer, enc) == [
        "会议就是SOS团的作战会议！<|eot_id|>",
        "Because you are a member, Kyon.<|eot_id|>",
    ]


def test_template_that_rewrites_history_is_refused(smol_tokenizer) -> None:  # type: ignore[no-untyped-def]
    import copy

    tok = copy.deepcopy(smol_tokenizer)
    # renders only the latest turn in full: earlier text changes once later turns follow
    tok.chat_template = (
        "{% for m in messages %}{% if loop.last %}{{ m['role'] + ': ' + m['content'] + '\n' }}"
        "{% else %}{{ m['role'] + '\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    with pytest.raises(TemplateError):
        encode(tok, MESSAGES)
