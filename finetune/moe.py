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


# --- LoRA on the experts, on the activations ----------------------------------------------------
#
# PEFT applies a parameter LoRA by rebuilding the whole weight, W + scale * B A for every expert,
# on each forward pass, and autograd then keeps that weight for the backward pass and computes
# the gradient of all of it before reducing it to A and B: per layer of gpt-oss-20b a 1.6 GB
# weight written, kept and differentiated, and the experts' backward pass a third more work. The
# same LoRA on the activations, x W_e + scale * (x A_e^T) B_e^T for the tokens routed to expert
# e, needs neither: the frozen weight gets no gradient and the extra work is two rank-r grouped
# matmuls. `use_activation_lora` switches a PEFT model to it; the adapter's parameters, and so
# what is saved, stay PEFT's own.

ACTIVATION_LORA = "rolecast_activation_lora"


def use_activation_lora(model: Any) -> int:
    """Route the PEFT expert LoRA of `model` through `_experts_forward`; returns the number of
    expert modules switched (0: nothing to switch, the model is unchanged)."""
    from peft.tuners.lora.layer import ParamWrapper
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    switched = 0
    inner = {
        id(m.base_layer)
        for m in model.modules()
        if isinstance(m, ParamWrapper) and isinstance(m.base_layer, ParamWrapper)
    }
    for module in list(model.modules()):
        if not isinstance(module, ParamWrapper) or id(module) in inner:
            continue
        wrappers: dict[str, Any] = {}
        layer: Any = module
        while isinstance(layer, ParamWrapper):
            wrappers[layer.parameter_name] = layer
            layer = layer.base_layer
        if set(wrappers) != {"gate_up_proj", "down_proj"} or not hasattr(layer, "num_experts"):
            continue
        layer.__dict__["_rolecast_lora"] = wrappers  # a plain dict: no module registration
        module.forward = layer.__call__  # type: ignore[method-assign]  # skip the parametrisation
        switched += 1
    if switched:
        ALL_EXPERTS_FUNCTIONS.register(ACTIVATION_LORA, _experts_forward)
        config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
        config._experts_implementation = ACTIVATION_LORA
    return switched


def _factors(wrapper: Any, dtype: Any) -> tuple[Any, Any, float] | None:
    """(A as [experts, in, r], B as [experts, r, out], scale) of a ParamWrapper's active adapter,
    or None when the adapter is off."""
    if wrapper.disable_adapters or wrapper.merged:
        return None
    names = [a for a in wrapper.active_adapters if a in wrapper.lora_A]
    if not names:
        return None
    name = names[0]
    experts = wrapper.num_experts
    a = wrapper.lora_A[name].weight  # [r * experts, in]
    b = wrapper.lora_B[name].weight  # [out, r * experts]
    a = a.reshape(experts, -1, a.shape[-1]).transpose(1, 2).to(dtype).contiguous()
    b = b.reshape(b.shape[0], -1, experts).permute(2, 1, 0).to(dtype).contiguous()
    return a, b, float(wrapper.scaling[name])


def _experts_forward(self: Any, hidden_states: Any, top_k_index: Any, top_k_weights: Any) -> Any:
    """transformers' grouped-matmul experts forward (one sort by expert, one grouped matmul per
    projection) with the LoRA of `use_activation_lora` added on the activations."""
    import torch
    from transformers.integrations.moe import _grouped_linear, _grouped_mm

    wrappers = self.__dict__.get("_rolecast_lora", {})
    top_k = top_k_index.size(-1)
    tokens, hidden = hidden_states.shape
    weights = top_k_weights.reshape(-1)
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    x = hidden_states[perm // top_k]
    counts = torch.histc(
        expert_ids.float() if x.device.type in ("cpu", "mps") else expert_ids.int(),
        bins=self.num_experts,
        min=0,
        max=self.num_experts - 1,
    )
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)

    def project(inputs: Any, name: str) -> Any:
        weight = getattr(self, name)
        bias = getattr(self, f"{name}_bias")[expert_ids] if self.has_bias else None
        out = _grouped_linear(inputs, weight, offsets, bias=bias, is_transposed=self.is_transposed)
        wrapper = wrappers.get(name)
        factors = _factors(wrapper, inputs.dtype) if wrapper is not None else None
        if factors is not None:
            a, b, scale = factors
            low = _grouped_mm(inputs, a, offs=offsets)
            out = out + scale * _grouped_mm(low, b, offs=offsets).to(out.dtype)
        return out

    gate_up = project(x, "gate_up_proj")
    down = project(self._apply_gate(gate_up), "down_proj")
    weighted = down * weights[perm].unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.size(0), device=perm.device)
    out = weighted[inverse].view(tokens, top_k, hidden).sum(dim=1)
    return out.to(hidden_states.dtype)
