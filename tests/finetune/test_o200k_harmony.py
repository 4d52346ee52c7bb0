"""gpt-oss's own tokenizer, o200k_harmony, built from an `o200k_base.tiktoken` file that a
package carries (bpe-openai): the same token ids as an independent o200k_base encoder (the
Rust one of bpe-openai) on the role-play dialogues and on edge cases of its pre-tokenizer,
harmony's special tokens at their ids, the harmony template rendered with them."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from finetune import standin

bpe_openai = pytest.importorskip("bpe_openai")
pytest.importorskip("tiktoken")

DATA = Path(__file__).resolve().parents[1] / "data" / "roleplay"
EDGES = [
    "Hello, world! It's 2026; we're testing 1234567 tokens.\n\n  indented\tTab",
    "CamelCaseWord HTTPServer don't I'LL we've",
    "  leading spaces and trailing   ",
    "x\r\ny\r\n\r\nz\n\n\n",
    "ñandú Ünïcödé ǅemo ﬁ",
    "ATRI は高性能ですから！🤖✨ 👩‍👩‍👧",
    "a/b/c\n/d // e",
    "<|start|> is text here, not a token",
]


def dialogue_texts() -> list[str]:
    texts = []
    for path in sorted(DATA.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            texts.append(row.get("system") or "")
            texts.extend(m["value"] for m in row["conversations"])
    return [t for t in texts if t]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    vocab = standin.o200k_vocab()
    assert vocab is not None, "bpe-openai carries no o200k_base.tiktoken.gz"
    return standin.harmony_tokenizer(vocab)


def test_the_same_ids_as_an_independent_o200k_encoder(tokenizer: Any) -> None:
    reference = bpe_openai.get_encoding("o200k_base")
    texts = dialogue_texts() + EDGES
    assert len(texts) > 300
    for text in texts:
        # as text: a control-token look-alike in a message is text (the servers render it so)
        ours = tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        assert ours == reference.encode(text), text[:80]
        assert tokenizer.decode(ours) == text


def test_harmonys_special_tokens_at_their_ids(tokenizer: Any) -> None:
    assert len(tokenizer) == standin.VOCAB_SIZE == 201088
    for i, name in standin.SPECIAL_TOKENS.items():
        assert tokenizer.convert_tokens_to_ids(name) == i
    assert tokenizer.convert_ids_to_tokens([200000, 201087]) == [
        "<|reserved_200000|>",
        "<|reserved_201087|>",
    ]
    # text that looks like a control token is not one unless the template puts it there
    assert 200006 not in tokenizer.encode(
        EDGES[-1], add_special_tokens=False, split_special_tokens=True
    )


def test_the_harmony_template_renders_with_it(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "你是凉宫春日。"},
        {"role": "user", "content": "今天做什么？"},
        {"role": "assistant", "content": "去找外星人！"},
    ]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    text = tokenizer.decode(ids)
    assert "<|start|>assistant<|channel|>final<|message|>去找外星人！" in text
    assert ids.count(200006) == ids.count(200008) >= 3  # <|start|> ... <|message|> per message
    assert tokenizer.encode("去找外星人！", add_special_tokens=False) == bpe_openai.get_encoding(
        "o200k_base"
    ).encode("去找外星人！")


def test_a_file_that_is_not_o200k_base_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "o200k_base.tiktoken.gz"
    other.write_bytes(gzip.compress(b"IQ== 0\nIg== 1\n"))
    with pytest.raises(ValueError, match="sha256"):
        standin.harmony_tokenizer(other)


def test_only_gpt_oss_20bs_shape_takes_the_real_vocabulary(tmp_path: Path) -> None:
    vocab = standin.o200k_vocab()
    assert vocab is not None
    with pytest.raises(ValueError, match="gpt-oss-20b"):
        standin.write_model_dir(tmp_path / "tiny", shape="tiny", vocab=vocab)


def test_training_labels_with_it_are_the_final_channel_replies(tokenizer: Any) -> None:
    from finetune.template import IGNORE_INDEX, encode

    messages = [
        {"role": "system", "content": "你是凉宫春日。"},
        {"role": "user", "content": "今天做什么？"},
        {"role": "assistant", "content": "去找外星人！"},
        {"role": "user", "content": "好吧。"},
        {"role": "assistant", "content": "跟我来！"},
    ]
    encoded = encode(tokenizer, messages)
    labels = [label for label in encoded.labels if label != IGNORE_INDEX]
    channel, message, end_of_reply = 200005, 200008, 200002  # <|channel|> <|message|> <|return|>
    final = tokenizer.encode("final", add_special_tokens=False)  # the channel's name
    first = [channel, *final, message, *tokenizer.encode("去找外星人！", add_special_tokens=False)]
    second = [channel, *final, message, *tokenizer.encode("跟我来！", add_special_tokens=False)]
    assert labels == [*first, end_of_reply, *second, end_of_reply]
