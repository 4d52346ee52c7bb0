"""Which PEFT adapters a model server can serve: the one rule, with every reason it gives.

vLLM serves an adapter directory (`adapter_config.json` and `adapter_model.safetensors`) when it
is a plain LoRA (`peft_type` LORA, no DoRA, no `modules_to_save` full module copies), its rank is
within the server's `--max-lora-rank` (itself one of vLLM's allowed ranks), and it was trained on
the base model the server runs. The embedded server holds itself to the same rule, so an adapter
that works there works on vLLM. `problems` is the rule; the trainer, the soup, the publisher and
both servers call it. Its weights are checked from their safetensors header (`formats.weights`):
names, ranks and dtypes against the config, shapes against the base model when its
`config.json` is given.

Every value of a config is checked for its type before it is used: a rank of `"eight"`, null,
a float or a negative number is a reason given, never an exception.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from formats import weights
from formats.errors import FormatError
from formats.jsonfile import read_object
from formats.manifest import read_manifest

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
#: Tokenizer files, which an adapter directory does not carry: the tokenizer is the base model's,
#: and vLLM takes tokenizer files beside an adapter for a per-LoRA tokenizer (deprecated there).
TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "chat_template.jinja",
        "chat_template.json",
        "tokenizer.model",
        "vocab.json",
        "merges.txt",
    }
)

#: The LoRA ranks vLLM accepts for `--max-lora-rank`.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def read_config(adapter_dir: Path) -> dict[str, Any]:
    """The adapter's `adapter_config.json`; FormatError when it is missing or not JSON."""
    path = Path(adapter_dir) / CONFIG
    try:
        config = read_object(path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path} is not valid JSON: {exc}") from exc
    if config is None:
        raise FormatError(f"{adapter_dir} is not a PEFT adapter: no {CONFIG}")
    return config


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def ranks(config: dict[str, Any]) -> set[int]:
    """Every rank the config gives a module (`r` and the values of `rank_pattern`); FormatError
    when one is not a positive integer."""
    r = config.get("r")
    if not _positive_int(r):
        raise FormatError(f"r is {_shown(r)}; a LoRA rank is a positive integer")
    pattern = config.get("rank_pattern")
    if pattern is None:
        pattern = {}
    if not isinstance(pattern, dict):
        raise FormatError(f"rank_pattern is {_shown(pattern)}; it maps module names to ranks")
    for key, value in pattern.items():
        if not _positive_int(value):
            raise FormatError(
                f"rank_pattern[{_shown(key)}] is {_shown(value)}; a LoRA rank is a positive integer"
            )
    return {r, *pattern.values()}


def rank(config: dict[str, Any]) -> int:
    """The largest rank of any adapted module (`r`, or a larger one in `rank_pattern`);
    FormatError when the config's ranks are not positive integers."""
    return max(ranks(config))


def _shown(value: object) -> str:
    """A config value as JSON, cut to 60 characters, for a message."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= 60 else text[:59] + "…"


def targets(config: dict[str, Any]) -> list[str] | None:
    """`target_modules` when it is a list of names (None: a pattern, or not given)."""
    found = config.get("target_modules")
    if isinstance(found, list) and found and all(isinstance(t, str) for t in found):
        return found
    return None


def allowed_rank(value: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that covers `value`."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= value:
            return allowed
    raise ValueError(
        f"LoRA rank {value} is above vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}"
    )


def same_base(a: str | None, b: str | None) -> bool:
    """Compare base models by their last path component: a hub id and a local copy of it
    (`HuggingFaceTB/SmolLM2-135M-Instruct`, `/models/SmolLM2-135M-Instruct`) are the same."""

    def key(name: object) -> str:
        return str(name or "").rstrip("/").rsplit("/", 1)[-1].lower()

    return key(a) == key(b)


def trained_base(adapter_dir: Path, config: dict[str, Any] | None = None) -> str | None:
    """The base model the adapter says it was trained on (its manifest, else its config)."""
    config = read_config(adapter_dir) if config is None else config
    named = config.get("base_model_name_or_path")
    return read_manifest(adapter_dir).base_model or (named if isinstance(named, str) else None)


def config_problems(config: dict[str, Any], *, max_rank: int | None = None) -> list[str]:
    """What in an adapter config a server cannot serve (empty: nothing)."""
    problems = []
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.rsplit(".", 1)[-1].upper() != "LORA":
        shown = (
            "missing"
            if peft_type in (None, "")
            else peft_type
            if isinstance(peft_type, str)
            else _shown(peft_type)
        )
        problems.append(f"peft_type is {shown}; only LORA adapters can be served")
    try:
        found: int | None = rank(config)
    except FormatError as exc:
        problems.append(str(exc))
        found = None
    if max_rank is not None and found is not None:
        if found > max_rank:
            problems.append(f"LoRA rank {found} is greater than max_lora_rank {max_rank}")
        elif found > VLLM_LORA_RANKS[-1]:
            problems.append(
                f"LoRA rank {found} is above vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}"
            )
    if config.get("modules_to_save"):
        problems.append(
            f"modules_to_save is set ({_shown(config['modules_to_save'])}); vLLM cannot serve "
            "full copies of modules: train without modules_to_save"
        )
    if config.get("use_dora"):
        problems.append("use_dora is true; vLLM does not serve DoRA adapters")
    return problems


def problems(
    adapter_dir: Path,
    *,
    max_rank: int | None = None,
    base_model: str | None = None,
    base_config: dict[str, Any] | None = None,
) -> list[str]:
    """Every reason the adapter in `adapter_dir` cannot be served (empty: it can).

    `max_rank`: the server's largest LoRA rank (None: not checked, as when training ends);
    `base_model`: the model the server runs (None: not checked); `base_config`: that model's
    `config.json`, against whose dimensions the weights' shapes are checked (None: only
    against the adapter's own config).
    """
    adapter_dir = Path(adapter_dir)
    try:
        config = read_config(adapter_dir)
    except FormatError as exc:
        return [str(exc)]
    found = config_problems(config, max_rank=max_rank)
    found += weights_problems(adapter_dir, config, base_config)
    try:
        trained_on = trained_base(adapter_dir, config)
    except FormatError as exc:  # a manifest that cannot be read: the adapter is not trusted
        found.append(str(exc))
    else:
        if base_model is not None and not same_base(trained_on, base_model):
            found.append(
                f"base model differs: the adapter was trained on {trained_on!r}, "
                f"the server runs {base_model!r}"
            )
    return found


def weights_problems(
    adapter_dir: Path, config: dict[str, Any], base_config: dict[str, Any] | None = None
) -> list[str]:
    """What in the adapter's weights file does not fit its config or the base model, read from
    the safetensors header (see `formats.weights`)."""
    path = Path(adapter_dir) / WEIGHTS
    if not path.is_file():
        return [f"{WEIGHTS} is missing"]
    try:
        tensors = weights.read_header(path)
    except FormatError as exc:
        return [str(exc)]
    try:
        allowed = ranks(config)
    except FormatError:
        allowed = set()  # reported with the config; every tensor's rank is then a problem too
    base = weights.BaseDims.from_config(base_config) if base_config else None
    return [
        f"{WEIGHTS}: {p}"
        for p in weights.tensor_problems(tensors, ranks=allowed, targets=targets(config), base=base)
    ]
