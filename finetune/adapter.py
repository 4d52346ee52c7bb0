"""The model a run trains: the base model with a LoRA adapter that vLLM can serve.

The base is loaded in the dtype of the device (bf16 on a GPU, fp32 on a CPU) with the attention
kernel the batches need (`finetune.attention`), its weights frozen; a plain LoRA (no DoRA, no
`modules_to_save`, no bias: `formats.lora`'s servable rule) is attached to every linear layer
but the head, or to the modules asked for, at the rank asked for or the one the base's size
calls for (`finetune.config.default_rank`), and to a mixture-of-experts base's fused expert
weights (`finetune.moe`); targets vLLM cannot serve on the base are refused unless asked for.
NEFTune noise is hooked onto the input embeddings when asked for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from finetune import models, moe
from finetune.attention import VARLEN, choose_attention, has_sinks
from finetune.config import TrainConfig, default_rank
from finetune.errors import ConfigError
from finetune.packing import Batch
from formats import lora

log = logging.getLogger(__name__)


def linear_module_names(model: Any) -> list[str]:
    """Short names of the model's linear layers, the output head excepted (`all-linear`)."""
    head = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    }
    return sorted(names)


def lora_config(cfg: TrainConfig, model: Any) -> Any:
    """A plain LoRA config that vLLM can load: no DoRA, no modules_to_save, no bias.

    `all-linear` is resolved to short module names here (q_proj, ..., down_proj), so the
    adapter config lists what it adapts the way vLLM and LLaMA-Factory expect to read it; fused
    expert weights come from `--target_parameters` (`finetune.moe`).
    """
    from peft import LoraConfig

    targets = linear_module_names(model) if cfg.modules == "all-linear" else cfg.modules
    parameters = moe.target_parameters(cfg.target_parameters, model.config.model_type)
    return LoraConfig(
        r=lora_rank(cfg, model),
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0 if parameters else cfg.lora_dropout,  # PEFT's parameter LoRA takes none
        use_rslora=cfg.use_rslora,
        target_modules=targets,
        target_parameters=parameters or None,
        bias="none",
        use_dora=False,
        modules_to_save=None,
        task_type="CAUSAL_LM",
    )


def lora_rank(cfg: TrainConfig, model: Any) -> int:
    """`--lora_r` when given, else the rank for the size of `model` (the base, before the LoRA
    is attached)."""
    return cfg.lora_r if cfg.lora_r is not None else default_rank(model.num_parameters())


def check_servable(cfg: TrainConfig, model: Any, config: Any) -> None:
    """Refuse LoRA targets vLLM cannot serve on this base (`formats.lora`'s rule) unless
    `--allow_unservable`; with it, say what will not be servable."""
    problems = lora.target_problems(
        model.config.model_type, config.target_modules, config.target_parameters
    )
    if not problems:
        return
    if not cfg.allow_unservable:
        raise ConfigError(
            "vLLM could not serve this adapter: "
            + "; ".join(problems)
            + " (--allow_unservable true trains it anyway)"
        )
    log.warning("training an adapter vLLM cannot serve: %s", "; ".join(problems))


def keep_input_dtype(model: Any) -> None:
    """Let LoRA layers take the bf16 activations as they come under autocast.

    By default PEFT casts each LoRA input to the adapter's fp32 dtype, and autocast then makes
    a bf16 copy of it again for the matmul, which it keeps for the backward pass: one extra
    activation per adapted layer. Autocast alone already runs the LoRA matmuls in bf16 with the
    fp32 weights as master copies.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False  # type: ignore[attr-defined]  # set by peft layers


class NoisyEmbeddings:
    """NEFTune (Jain et al., 2023): uniform noise added to the input embeddings while training.

    The paper scales the noise by alpha / sqrt(L * d) for a sequence of L tokens with hidden
    size d. In a packed row every dialogue keeps its own L, so a short dialogue packed beside
    long ones gets the noise it would get alone. Evaluation and generation (module in eval
    mode) see no noise, and nothing of this is saved with the adapter.
    """

    def __init__(self, model: Any, alpha: float) -> None:
        self.alpha = alpha
        self.scale: torch.Tensor | None = None  # (B, T), set per batch by `use`
        embeddings = model.get_input_embeddings()
        self.hidden = int(embeddings.weight.shape[-1])
        self.handle = embeddings.register_forward_hook(self._add_noise)

    def use(self, batch: Batch) -> None:
        if batch.attention_mask is not None:  # padded rows: each row's real length
            per_token = batch.attention_mask.sum(-1, keepdim=True).expand_as(batch.input_ids)
        else:  # one packed row: each token's own dialogue's length
            assert batch.cu_seq_lens is not None  # collate_packed always sets it
            lengths = batch.cu_seq_lens.diff().long()
            per_token = torch.repeat_interleave(lengths, lengths).unsqueeze(0)
        self.scale = self.alpha / torch.sqrt(per_token.float().clamp(min=1) * self.hidden)

    def _add_noise(self, module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        if not module.training or self.scale is None:
            return output
        noise = torch.empty_like(output).uniform_(-1.0, 1.0)
        return output + noise * self.scale.unsqueeze(-1).to(output.device, output.dtype)

    def remove(self) -> None:
        self.handle.remove()


@dataclass
class TrainModel:
    """The base model with its LoRA attached, and how it was set up."""

    model: Any
    attention: str
    varlen: bool
    dtype: torch.dtype
    noise: NoisyEmbeddings | None
    lora_r: int  # the rank attached: --lora_r, or the base size's
    base_parameters: int


def build_model(cfg: TrainConfig, gpu: bool) -> TrainModel:
    """Load the base for `cfg` and attach a fresh LoRA (its base weights frozen)."""
    from peft import get_peft_model

    sinks = has_sinks(models.load_config(cfg.base))
    plain = "eager" if sinks else "sdpa"  # gpt-oss's sinks have no sdpa path
    attn = (
        choose_attention(cfg.attention, sinks)
        if cfg.packing
        else (plain if cfg.attention in ("auto", "varlen", "sdpa") else cfg.attention)
    )
    dtype = torch.bfloat16 if gpu else torch.float32
    # straight onto this process's GPU (accelerate has set it): a 20B base is not first copied
    # through host memory, and MXFP4 experts are dequantized on the GPU
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else None
    model = models.load_model(cfg.base, dtype=dtype, attn_implementation=attn, device=device)
    model.config.use_cache = False
    parameters = int(model.num_parameters())
    rank = lora_rank(cfg, model)
    if cfg.lora_r is None:
        log.info("LoRA rank %d for a base of %.2f B parameters", rank, parameters / 1e9)
    config = lora_config(cfg, model)
    check_servable(cfg, model, config)
    if config.target_parameters and cfg.lora_dropout:
        log.warning("LoRA on %s takes no dropout: lora_dropout 0", config.target_parameters)
        cfg.lora_dropout = 0.0  # what the run used, as the manifest records it
    model = get_peft_model(model, config)
    if config.target_parameters and moe.use_activation_lora(model):
        log.info("expert LoRA runs on the activations (finetune.moe)")
    model.peft_config["default"].base_model_name_or_path = models.base_id(cfg.base)
    if gpu:
        keep_input_dtype(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    noise = NoisyEmbeddings(model, cfg.neftune_alpha) if cfg.neftune_alpha > 0 else None
    trainable, total = model.get_nb_trainable_parameters()
    log.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / total)
    return TrainModel(model, attn, attn == VARLEN, dtype, noise, rank, parameters)
