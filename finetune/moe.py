"""Mixture-of-experts bases (gpt-oss): which fused expert weights a LoRA adapts, and loading an
MXFP4 checkpoint for training.

gpt-oss keeps each layer's experts as two fused 3-D parameters, `mlp.experts.gate_up_proj`
(`[experts, hidden, 2 x intermediate]`) and `mlp.experts.down_proj`, not as linear layers, so
`all-linear` reaches only the attention projections. PEFT adapts such parameters through
`target_parameters` (one rank-r LoRA per expert, stored as `[r x experts, in]` / `[out, r x
experts]`); vLLM reads exactly that layout for gpt-oss when both are adapted, gate_up_proj
first (`formats.lora.SERVABLE_TARGETS`). PEFT's parameter LoRA takes no dropout.

The published checkpoint stores the experts in MXFP4 (`finetune.mxfp4`); training loads them
dequantized to bf16 (`Mxfp4Config(dequantize=True)`), since LoRA gradients flow through the
frozen weights in bf16.
"""

from __future__ import annotations

import logging
from typing import Any

from finetune.errors import ConfigError

log = logging.getLogger(__name__)

#: The fused expert parameters of model types whose experts are 3-D parameters, in the order
#: PEFT must wrap them (vLLM reads the inner wrapper as gate_up_proj).
EXPERT_PARAMETERS: dict[str, tuple[str, ...]] = {
    "gpt_oss": ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
}


def target_parameters(setting: str, model_type: str | None) -> list[str]:
    """The `target_parameters` a `--target_parameters` setting means for a model type:
    `auto` = the fused expert weights where the model has them, `none` = none, else a
    comma-separated list of parameter names (suffixes, as PEFT matches them)."""
    if setting == "none":
        return []
    if setting == "auto":
        return list(EXPERT_PARAMETERS.get(model_type or "", ()))
    names = [n.strip() for n in setting.split(",") if n.strip()]
    if not names:
        raise ConfigError("--target_parameters is empty: give names, auto or none")
    return names


def quantization_kwargs(config: Any) -> dict[str, Any]:
    """`from_pretrained` arguments that load a checkpoint's quantized weights for training:
    MXFP4 experts dequantized to the training dtype; nothing for a plain checkpoint."""
    quant = getattr(config, "quantization_config", None)
    method = (
        quant.get("quant_method")
        if isinstance(quant, dict)
        else getattr(quant, "quant_method", None)
    )
    if str(method or "").lower().removeprefix("quantizationmethod.") != "mxfp4":
        return {}
    from transformers import Mxfp4Config  # type: ignore[attr-defined]  # lazy export

    log.info("MXFP4 checkpoint: the experts are dequantized for training")
    return {"quantization_config": Mxfp4Config(dequantize=True)}
