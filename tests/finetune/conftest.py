"""Fixtures: the SmolLM2 tokenizer (from the GGUF the default model ships as) and tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.finetune.ft_helpers import dialogue, write_jsonl

# A Llama-3-style template, written here so that labels are checked on a second, different
# chat format (header tokens, no newline after the end-of-turn marker).
LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def shared_data(data_dir: Path) -> Path:
    """The shared role-play dialogues (the suite-wide `data_dir` fixture)."""
    return data_dir


@pytest.fixture(scope="session")
def smol_tokenizer(smollm2_tokenizer_dir: Path):  # type: ignore[no-untyped-def]
    """SmolLM2's tokenizer and ChatML template, as the suite-wide fixture saved it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


@pytest.fixture(scope="session")
def llama3_tokenizer(smol_tokenizer):  # type: ignore[no-untyped-def]
    import copy

    tok = copy.deepcopy(smol_tokenizer)
    tok.add_special_tokens(
        {
            "additional_special_tokens": [
                "<|begin_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
            ]
        }
    )
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dir: Path) -> Path:
    """A 2-layer Llama with the SmolLM2 vocabulary (the suite-wide tiny model)."""
    return tiny_model_dir


@pytest.fixture
def small_dataset(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", [dialogue(i, 1 + i % 3) for i in range(12)])
