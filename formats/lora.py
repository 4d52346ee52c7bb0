"""Which PEFT adapters a model server can serve: the one rule, with every reason it gives.

vLLM serves an adapter directory (`adapter_config.json` and `adapter_model.safetensors`) when it
is a plain LoRA (`peft_type` LORA, no DoRA, no `modules_to_save` full module copies), its rank is
within the server's `--max-lora-rank` (itself one of vLLM's allowed ranks), and it was trained on
the base model the server runs. The embedded server holds itself to the same rule, so an adapter
that works there works on vLLM. `problems` is the rule; the trainer, the soup, the publisher and
both servers call it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def rank(config: dict[str, Any]) -> int:
    """The largest rank of any adapted module (`r`, or a larger one in `rank_pattern`)."""
    ranks = [
        int(config.get("r") or 0),
        *(int(v) for v in (config.get("rank_pattern") or {}).values()),
    ]
    return max(ranks)


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

    def key(name: str | None) -> str:
        return (name or "").rstrip("/").rsplit("/", 1)[-1].lower()

    return key(a) == key(b)


def trained_base(adapter_dir: Path, config: dict[str, Any] | None = None) -> str | None:
    """The base model the adapter says it was trained on (its manifest, else its config)."""
    config = read_config(adapter_dir) if config is None else config
    return read_manifest(adapter_dir).base_model or config.get("base_model_name_or_path")


def config_problems(config: dict[str, Any], *, max_rank: int | None = None) -> list[str]:
    """What in an adapter config a server cannot serve (empty: nothing)."""
    problems = []
    peft_type = str(config.get("peft_type") or "")
    if peft_type.rsplit(".", 1)[-1].upper() != "LORA":
        problems.append(f"peft_type is {peft_type or 'missing'}; only LORA adapters can be served")
    found = rank(config)
    if max_rank is not None:
        if found > max_rank:
            problems.append(f"LoRA rank {found} is greater than max_lora_rank {max_rank}")
        elif found > VLLM_LORA_RANKS[-1]:
            problems.append(
                f"LoRA rank {found} is above vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}"
            )
    if config.get("modules_to_save"):
        problems.append(
            f"modules_to_save is set ({config['modules_to_save']}); vLLM cannot serve full "
            "copies of modules: train without modules_to_save"
        )
    if config.get("use_dora"):
        problems.append("use_dora is true; vLLM does not serve DoRA adapters")
    return problems


def problems(
    adapter_dir: Path, *, max_rank: int | None = None, base_model: str | None = None
) -> list[str]:
    """Every reason the adapter in `adapter_dir` cannot be served (empty: it can).

    `max_rank`: the server's largest LoRA rank (None: not checked, as when training ends);
    `base_model`: the model the server runs (None: not checked).
    """
    adapter_dir = Path(adapter_dir)
    try:
        config = read_config(adapter_dir)
    except FormatError as exc:
        return [str(exc)]
    found = config_problems(config, max_rank=max_rank)
    if not (adapter_dir / WEIGHTS).is_file():
        found.append(f"{WEIGHTS} is missing")
    if base_model is not None:
        try:
            trained_on = trained_base(adapter_dir, config)
        except FormatError as exc:
            found.append(str(exc))
        else:
            if not same_base(trained_on, base_model):
                found.append(
                    f"base model differs: the adapter was trained on {trained_on!r}, "
                    f"the server runs {base_model!r}"
                )
    return found
