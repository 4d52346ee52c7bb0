"""Fixtures: the SmolLM2 tokenizer (from the GGUF the default model ships as) and tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.finetune.ft_helpers import dialogue, write_jsonl

REPO = Path(__file__).resolve().parents[2]

# A Llama-3-style template, written here so that labels are checked on a second, different
# chat format (header tokens, no newline after the end-of-turn marker).
LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def shared_data_dir() -> Path:
    return Path(os.environ.get("ROLECAST_DATA_DIR", REPO.parent / "shared" / "data" / "roleplay"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not (path / "haruhi.jsonl").is_file():
        pytest.skip(f"shared role-play data not found at {path} (set ROLECAST_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def smol_tokenizer(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    from finetune.models import default_gguf

    gguf = default_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out = tmp_path_factory.mktemp("smol_tokenizer")
    tok.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


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
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer) -> Path:  # type: ignore[no-untyped-def]
    """A 2-layer Llama with the SmolLM2 vocabulary, saved as a local checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smol_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=smol_tokenizer.bos_token_id,
        eos_token_id=smol_tokenizer.eos_token_id,
        pad_token_id=smol_tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(out)
    smol_tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def small_dataset(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", [dialogue(i, 1 + i % 3) for i in range(12)])
