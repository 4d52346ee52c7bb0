"""Which PEFT adapters a model server can serve: the one rule, with every reason it gives.

vLLM serves an adapter directory (`adapter_config.json` and `adapter_model.safetensors`) when it
is a plain LoRA (`peft_type` LORA, no DoRA, no `modules_to_save` full module copies), its rank is
within the server's `--max-lora-rank` (itself one of vLLM's allowed ranks), and it was trained on
the base model the server runs. The embedded server holds itself to the same rule, so an adapter
that works there works on vLLM. `problems` is the rule; the trainer, the soup, the publisher and
both servers call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from formats.errors import FormatError
from formats.jsonfile import read_object
from formats.manifest import read_manifest

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"

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
    problems += parameter_target_problems(config.get("target_parameters"))
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


def parameter_target_problems(target_parameters: Any) -> list[str]:
    """What in an adapter's `target_parameters` no vLLM model serves (empty: nothing)."""
    targets = tuple(target_parameters or ())
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
