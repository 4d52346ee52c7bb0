"""Finding and loading the base model: the default model (its one converted checkpoint, see
`formats.basemodel`), an HF model id, or a local directory."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from formats import basemodel
from formats.errors import BaseModelError
from serving.errors import ModelLoadError
from serving.harmony import is_harmony

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def resolve_model_path(model: str, cache_dir: Path | None = None) -> str:
    """What `from_pretrained` should load for a configured `model`: the default model's one
    converted checkpoint (`formats.basemodel`, converted first if needed), a local directory,
    or a hub id."""
    if basemodel.is_default(model):
        try:
            return str(basemodel.checkpoint(cache_dir))
        except BaseModelError as exc:
            raise ModelLoadError(str(exc)) from exc
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a Hugging Face model directory (no config.json)")
        return str(path)
    return model  # an HF hub id


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for, but torch sees no CUDA device")
    return device


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def set_cpu_threads(threads: int | None) -> int:
    """Size torch's CPU thread pool. Half the logical CPUs by default: decoding is many small
    operations, and a thread pool that needs every core stalls at each operation's barrier as
    soon as anything else (the HTTP event loop, another process) takes a core. On a busy 2-core
    machine one thread decoded a mixed-adapter batch of 8 some 20x faster than two."""
    import os

    import torch

    count = threads or max(1, (os.cpu_count() or 2) // 2)
    torch.set_num_threads(count)
    return count


@dataclass
class LoadedModel:
    """The base model and its tokenizer, ready for the engine."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: str
    device: str
    dtype: torch.dtype
    max_model_len: int
    eos_token_ids: frozenset[int]
    harmony: bool = False  # replies come in harmony channels (gpt-oss): `serving.harmony`


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list | tuple):
            ids.update(int(i) for i in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def load_model(
    model: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    max_model_len: int | None = None,
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load the configured base model and tokenizer onto the chosen device, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model, cache_dir)
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    started = time.monotonic()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except OSError as exc:
        raise ModelLoadError(f"cannot load model {model!r}: {exc}") from exc
    if tokenizer.chat_template is None:
        raise ModelLoadError(f"the tokenizer of {model!r} has no chat template")
    hf_model.to(dev).eval()  # type: ignore[arg-type]
    limit = getattr(hf_model.config, "max_position_embeddings", None) or 2048
    if max_model_len is not None:
        if max_model_len > limit:
            raise ModelLoadError(
                f"--max-model-len {max_model_len} is larger than the model's {limit} positions"
            )
        limit = max_model_len
    log.info(
        "loaded %s on %s (%s) in %.1f s, max_model_len=%d",
        path,
        dev,
        torch_dtype,
        time.monotonic() - started,
        limit,
    )
    return LoadedModel(
        model=hf_model,
        tokenizer=tokenizer,
        path=path,
        device=dev,
        dtype=torch_dtype,
        max_model_len=int(limit),
        eos_token_ids=_eos_ids(hf_model, tokenizer),
        harmony=is_harmony(getattr(hf_model.config, "model_type", None), tokenizer),
    )
