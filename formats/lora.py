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
from dataclasses import dataclass
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
    problems += parameter_target_problems(config.get("target_parameters"))
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
        for p in weights.tensor_problems(
            tensors,
            ranks=allowed,
            targets=targets(config),
            base=base,
            parameters=parameter_targets(config),
        )
    ]


# --- which modules and parameters vLLM serves, per model type ---------------------------------
#
# Read from vLLM 0.26.0's code (model_executor/models/gpt_oss.py, lora/model_manager.py,
# lora/lora_model.py, lora/worker_manager.py, lora/utils.py). For gpt-oss, vLLM wraps every
# linear layer (the fused qkv_proj, which takes q_proj/k_proj/v_proj adapters, o_proj, and the
# router) and the fused MoE layer; the model sets `is_3d_moe_weight`, so expert adapters are read
# in PEFT's `target_parameters` layout and must adapt both fused weights: the inner PEFT wrapper
# (`experts.base_layer.lora_*`) is taken as gate_up_proj and the outer (`experts.lora_*`) as
# down_proj, and an adapter with one of them fails an assertion. gpt-oss has no embedding LoRA
# modules, so lm_head and embed_tokens adapters are refused. The router is wrappable in vLLM's
# code but transformers' gpt-oss router is no linear layer, and no run has shown it served: it is
# left out until one does.


@dataclass(frozen=True)
class ServableTargets:
    """What vLLM serves of a model type: module names (None: any linear layer) and the
    `target_parameters` lists it reads, in order."""

    modules: frozenset[str] | None
    parameters: tuple[tuple[str, ...], ...]


GPT_OSS_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
SERVABLE_TARGETS: dict[str, ServableTargets] = {
    "gpt_oss": ServableTargets(
        modules=frozenset({"q_proj", "k_proj", "v_proj", "o_proj"}),
        parameters=((), GPT_OSS_EXPERTS),
    ),
}
#: Every parameter-target list some model type serves (for adapters whose base is not known).
SERVABLE_PARAMETER_TARGETS = frozenset(
    targets for rule in SERVABLE_TARGETS.values() for targets in rule.parameters
)


def parameter_targets(config: dict[str, Any]) -> list[str] | None:
    """`target_parameters` when it is a list of names (None: not given, or not such a list)."""
    found = config.get("target_parameters")
    if isinstance(found, list) and found and all(isinstance(t, str) for t in found):
        return found
    return None


def parameter_target_problems(target_parameters: Any) -> list[str]:
    """What in an adapter's `target_parameters` no vLLM model serves (empty: nothing)."""
    if target_parameters in (None, []):
        return []
    if not (
        isinstance(target_parameters, list) and all(isinstance(t, str) for t in target_parameters)
    ):
        return [f"target_parameters is {_shown(target_parameters)}; a list of parameter names"]
    targets = tuple(target_parameters)
    if not targets or targets in SERVABLE_PARAMETER_TARGETS:
        return []
    served = " or ".join(str(list(t)) for t in sorted(SERVABLE_PARAMETER_TARGETS) if t)
    return [
        f"target_parameters {list(targets)} are not served by vLLM: it reads fused expert "
        f"LoRA as {served}, in that order"
    ]


def target_problems(
    model_type: str | None, target_modules: Any, target_parameters: Any
) -> list[str]:
    """What of a LoRA's targets vLLM cannot serve on a base of `model_type` (empty: nothing)."""
    rule = SERVABLE_TARGETS.get(model_type or "")
    modules = sorted(
        {target_modules} if isinstance(target_modules, str) else set(target_modules or ())
    )
    params = tuple(target_parameters or ())
    if rule is None:
        if params:
            return [
                f"target_parameters {list(params)}: vLLM serves fused expert LoRA only for "
                f"{', '.join(sorted(SERVABLE_TARGETS))} bases, not {model_type!r}"
            ]
        return []
    problems = []
    if rule.modules is not None:
        extra = [m for m in modules if m not in rule.modules]
        if extra:
            problems.append(
                f"vLLM serves LoRA on {model_type} only for {', '.join(sorted(rule.modules))} "
                f"among modules, not {', '.join(extra)}"
            )
    if params not in rule.parameters:
        allowed = " or ".join(str(list(p)) if p else "none" for p in rule.parameters)
        problems.append(
            f"vLLM serves target_parameters {allowed} on {model_type}, not {list(params)}"
        )
    return problems
