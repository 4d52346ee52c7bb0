"""How many tokens a packed micro-batch may hold on this machine.

Without `--batch_tokens`, `rolecast train` packs as many tokens into a micro-batch as fit the
memory that is free once the base and its LoRA are loaded (`psutil` on a CPU, the CUDA driver's
free memory on a GPU), at most `CAP` (the recipe's 8,192) and at least the longest dialogue; when
not even the longest dialogue fits it stops before the first step and says what would help.
With `--batch_tokens` given, it warns when the estimate says the run will not fit.

The estimate of a step's peak, beyond what is already allocated:

    optimizer state  +  bytes per token x batch tokens

- optimizer state: the fp32 gradient and AdamW's two moments of every trainable (LoRA) weight,
  12 bytes each, allocated at the first step;
- bytes per token: the activations a step keeps for its backward pass, counted from the model's
  shape (`activation_bytes`), times a factor measured per kind of device
  (`CALIBRATION`). Attention costs no T x T term: the packed rows go through kernels that
  keep memory linear in the tokens (varlen flash on a GPU, PyTorch's CPU flash kernel), which
  the CPU measurement confirms.

Only `HEADROOM` of the free memory is planned for: the rest is left to the allocator's slack,
the tokenizer, and other programs on the machine.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from finetune.errors import FinetuneError

log = logging.getLogger(__name__)

CAP = 8192  # the recipe's micro-batch; more tokens per step would change what was validated
MULTIPLE = 64  # batch sizes are rounded down to this
HEADROOM = {"cpu": 0.8, "cuda": 0.9}  # the share of the free memory a run plans to use
OPTIMIZER_BYTES = 12  # per trainable weight: fp32 gradient + AdamW's two fp32 moments
LOGIT_COPIES = 3  # fp32 logits, their log-softmax, and its gradient, per labelled token

# Measured bytes per token over the `activation_bytes` count of the same run, rounded up:
# - cpu 1.25: SmolLM2-135M-Instruct (the default model), fp32, rsLoRA r256 on all linear layers,
#   2-core x86-64; peak RSS grows 4.0 MB per token from 508 to 2,560 batch tokens, against a
#   count of 3.23 MB at the data's 23.6% labelled tokens (`benchmarks/train_memory.py`,
#   RESULTS.md "Memory of a training step"). RSS holds the allocator's slack besides tensors;
# - cuda 0.5: Llama-3.1-8B's shape, bf16 autocast, LoRA r16/r64/r256, one H200: 6.71-6.81 MB
#   per token from 4,096 to 8,192 batch tokens (torch's peak allocation), against a count of
#   13.6-13.7 MB at 48.7% labelled tokens (RESULTS.md "Rank by base size").
CALIBRATION = {"cpu": 1.25, "cuda": 0.5}


class OutOfMemoryError(FinetuneError):
    """Not even one micro-batch of the longest dialogue fits the free memory."""


@dataclass(frozen=True)
class Shape:
    """What the activation count needs of a decoder-only transformer's config."""

    layers: int
    hidden: int
    kv: int  # key/value width: kv heads x head dim
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, config: Any) -> Shape:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden = int(text.hidden_size)
        heads = int(getattr(text, "num_attention_heads", 1) or 1)
        head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        return cls(
            layers=int(text.num_hidden_layers),
            hidden=hidden,
            kv=kv_heads * head_dim,
            intermediate=int(getattr(text, "intermediate_size", None) or 4 * hidden),
            vocab=int(text.vocab_size),
        )


def lora_elements(model: Any) -> tuple[int, int]:
    """Per token, summed over the adapted modules of all layers: (elements the LoRA path keeps
    for backward, bytes of dropout masks). Each module keeps its dropped-out input (a copy,
    when dropout is on) and the rank-r output of A."""
    elements = mask_bytes = 0
    for module in model.modules():
        ranks = getattr(module, "r", None)
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(ranks, dict) or dropouts is None or "default" not in ranks:
            continue
        rank = int(ranks["default"])
        inputs = int(getattr(module, "in_features", 0) or 0)
        dropped = getattr(dropouts["default"], "p", 0.0) > 0
        elements += rank + (inputs if dropped else 0)
        mask_bytes += inputs if dropped else 0
    return elements, mask_bytes


def activation_bytes(
    shape: Shape,
    lora: tuple[int, int],
    dtype_bytes: int,
    label_fraction: float,
    checkpointing: bool,
) -> float:
    """Bytes of activations per token a training step keeps for backward, counted, uncalibrated.

    Per decoder layer and token: about 16 hidden-wide tensors (two RMSNorms with their fp32
    intermediates, the attention input, q, o and the residual path), 4 key/value-wide ones (k, v
    before and after rotary embedding) and 5 intermediate-wide ones (gate, up, the activation,
    their product, the down projection's input); plus the LoRA path (`lora_elements`), and the
    fp32 logits over the vocabulary at labelled positions (the loss keeps logits only there).
    With gradient checkpointing a layer keeps only its input, and one layer is recomputed at a
    time.
    """
    layer = 16 * shape.hidden + 4 * shape.kv + 5 * shape.intermediate
    lora_per_layer = lora[0] / max(1, shape.layers)
    mask_per_layer = lora[1] / max(1, shape.layers)
    one_layer = (layer + lora_per_layer) * dtype_bytes + mask_per_layer
    if checkpointing:
        layers = shape.layers * shape.hidden * dtype_bytes + one_layer
    else:
        layers = shape.layers * one_layer
    outside = 4 * shape.hidden * dtype_bytes  # embeddings out, final norm, head input
    logits = LOGIT_COPIES * 4 * shape.vocab * label_fraction
    return layers + outside + logits


@dataclass(frozen=True)
class Plan:
    """How the batch size was chosen (recorded in the manifest's settings)."""

    device: str
    free_bytes: int
    optimizer_bytes: int
    bytes_per_token: int
    batch_tokens: int  # chosen, or the one given
    fits_tokens: int  # the most the estimate lets fit

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def needed_bytes(self) -> int:
        return self.optimizer_bytes + self.bytes_per_token * self.batch_tokens


def free_bytes(gpu: bool) -> int:
    """Memory this process may still take: the CUDA driver's free memory plus what torch's
    allocator holds unused, on a GPU; the system's available memory on a CPU."""
    if gpu:
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated())
    import psutil

    return int(psutil.virtual_memory().available)


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def plan(
    model: Any,
    *,
    gpu: bool,
    dtype_bytes: int,
    lengths: Sequence[int],
    label_fraction: float,
    checkpointing: bool,
    batch_tokens: int | None,
    free: int | None = None,
) -> Plan:
    """The micro-batch size for `model` (base with LoRA attached, loaded) on this machine.

    `lengths` are the token counts of every dialogue a batch may hold (training and validation);
    `batch_tokens` is `--batch_tokens` when given. OutOfMemoryError when the longest dialogue
    does not fit."""
    device = "cuda" if gpu else "cpu"
    free = free_bytes(gpu) if free is None else free
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = OPTIMIZER_BYTES * trainable
    counted = activation_bytes(
        Shape.of(model.config),
        lora_elements(model),
        dtype_bytes,
        min(1.0, 1.25 * label_fraction),  # a batch may hold more replies than the average
        checkpointing,
    )
    per_token = math.ceil(CALIBRATION[device] * counted)
    budget = HEADROOM[device] * free - optimizer
    fits = max(0, int(budget // per_token))
    longest = max(lengths, default=0)
    if batch_tokens is not None:
        chosen = batch_tokens
        if chosen > fits:
            log.warning(
                "--batch_tokens %d needs about %s for a step beyond what is loaded; %s is free "
                "(%s planned): the run may run out of memory. Leave --batch_tokens out to size "
                "it to the memory.",
                chosen,
                gib(optimizer + per_token * chosen),
                gib(free),
                gib(HEADROOM[device] * free),
            )
    else:
        if fits < longest:
            raise OutOfMemoryError(
                f"not enough memory to train: the longest dialogue ({longest} tokens) needs about "
                f"{gib(optimizer + per_token * longest)} for one step on the {device} beyond the "
                f"loaded model; {gib(free)} is free, of which a run plans to use "
                f"{HEADROOM[device]:.0%} ({gib(HEADROOM[device] * free)}). Free memory, or train "
                "with --gradient_checkpointing true, a smaller --lora_r, or shorter dialogues "
                "(`rolecast data clean --max-length N`, then --max_length N)."
            )
        chosen = max(longest, min(CAP, fits) // MULTIPLE * MULTIPLE)
    return Plan(device, free, optimizer, per_token, chosen, fits)
