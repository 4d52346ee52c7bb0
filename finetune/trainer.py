"""LoRA SFT of a persona adapter: packed, assistant-only loss, checkpoints and resume.

The loop is plain PyTorch under accelerate (device placement, bf16 autocast on a GPU, DDP when
launched with `accelerate launch`), so the parts that make it fast stay visible: packed rows
with per-dialogue positions, the varlen attention kernel, and logits computed only where a
label is (`logits_to_keep` with the label positions).
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from finetune import models
from finetune.attention import VARLEN, choose_attention
from finetune.config import TrainConfig
from finetune.data import Dialogue, file_sha256, load_dialogues
from finetune.errors import ConfigError, DataError
from finetune.packing import Batch, collate_packed, collate_padded, packed_batches, padded_batches
from finetune.template import IGNORE_INDEX, Encoded, count_tokens, encode

log = logging.getLogger(__name__)

MANIFEST = "rolecast.json"
LOSS_LOG = "loss.jsonl"
LOSS_PNG = "loss.png"
CHECKPOINTS = "checkpoints"


# ---------------------------------------------------------------------------------------------
# pieces the benchmark reuses


def encode_dialogues(tokenizer: Any, dialogues: Sequence[Dialogue]) -> list[Encoded]:
    samples = [encode(tokenizer, d.messages) for d in dialogues]
    empty = [d.row_id for d, s in zip(dialogues, samples, strict=True) if s.n_labels == 0]
    if empty:
        raise DataError("some dialogues have no assistant tokens after templating", empty)
    return samples


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
    adapter config lists what it adapts the way vLLM and LLaMA-Factory expect to read it.
    """
    from peft import LoraConfig

    targets = linear_module_names(model) if cfg.modules == "all-linear" else cfg.modules
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        use_rslora=cfg.use_rslora,
        target_modules=targets,
        bias="none",
        use_dora=False,
        modules_to_save=None,
        task_type="CAUSAL_LM",
    )


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


def batch_loss(model: Any, batch: Batch, varlen: bool) -> tuple[torch.Tensor, int]:
    """Sum of token cross-entropies over the labelled tokens of `batch`, and their count."""
    if batch.attention_mask is None:
        labels = batch.labels[0]
        # position t predicts token t+1: keep logits only where t+1 carries a label
        keep = (labels[1:] != IGNORE_INDEX).nonzero().squeeze(-1)
        targets = labels[keep + 1]
        extra: dict[str, Any] = {}
        if varlen and batch.cu_seq_lens is not None:
            extra = {
                "cu_seq_lens_q": batch.cu_seq_lens,
                "cu_seq_lens_k": batch.cu_seq_lens,
                "max_length_q": batch.max_length,
                "max_length_k": batch.max_length,
            }
        out = model(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            logits_to_keep=keep,
            use_cache=False,
            **extra,
        )
        logits = out.logits[0]
    else:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
        targets = batch.labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


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


def make_batches(cfg: TrainConfig, samples: Sequence[Encoded], epoch: int) -> list[list[int]]:
    if cfg.packing:
        return packed_batches(samples, cfg.batch_tokens, cfg.seed, epoch)
    return padded_batches(samples, cfg.batch_size, cfg.seed, epoch)


def collate(cfg: TrainConfig, samples: Sequence[Encoded], pad_id: int) -> Batch:
    return collate_packed(samples) if cfg.packing else collate_padded(samples, pad_id)


# ---------------------------------------------------------------------------------------------
# checkpoints


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    micro: int = 0  # micro-batches of `epoch` already consumed
    tokens: int = 0
    train_seconds: float = 0.0


def _checkpoint_dirs(output: Path) -> list[Path]:
    root = output / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.name.startswith("step-") and (p / "state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(
    output: Path, model: Any, optimizer: Any, scheduler: Any, state: TrainState, keep: int
) -> Path:
    path = output / CHECKPOINTS / f"step-{state.step}"
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    torch.save(scheduler.state_dict(), path / "scheduler.pt")
    rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, path / "rng.pt")
    (path / "state.json").write_text(json.dumps(state.__dict__), encoding="utf-8")
    for old in _checkpoint_dirs(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any) -> TrainState:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng = torch.load(path / "rng.pt", weights_only=False)
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return TrainState(**json.loads((path / "state.json").read_text(encoding="utf-8")))


# ---------------------------------------------------------------------------------------------
# the run


def _progress(enabled: bool) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TimeRemainingColumn(),
        disable=not enabled,
    )


@torch.no_grad()
def evaluate_loss(
    model: Any, samples: Sequence[Encoded], cfg: TrainConfig, device: Any, varlen: bool, pad_id: int
) -> float:
    model.eval()
    total, count = 0.0, 0
    for indices in make_batches(cfg, samples, epoch=0):
        batch = collate(cfg, [samples[i] for i in indices], pad_id).to(device)
        loss, n = batch_loss(model, batch, varlen)
        total += float(loss)
        count += n
    model.train()
    return total / max(1, count)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train the adapter described by `cfg`; returns the manifest written to rolecast.json."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from peft import get_peft_model
    from transformers import get_scheduler

    started = time.time()
    output = Path(cfg.output or f"runs/{cfg.persona}")
    if output.exists() and any(output.iterdir()) and not cfg.resume:
        if (output / MANIFEST).exists() or _checkpoint_dirs(output):
            raise ConfigError(
                f"{output} already holds a run; pass --resume to continue it or choose another --output"
            )

    gpu = torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision="bf16" if gpu else "no")
    set_seed(cfg.seed)

    # The data is checked before any model weights are loaded: a bad file costs seconds.
    tokenizer = models.load_tokenizer(cfg.base)

    def counter(messages: Any) -> int:
        return count_tokens(tokenizer, messages)

    dialogues = load_dialogues(cfg.data, counter, cfg.max_length)
    samples = encode_dialogues(tokenizer, dialogues)
    validation = None
    if cfg.validation_data:
        validation = encode_dialogues(
            tokenizer, load_dialogues(cfg.validation_data, counter, cfg.max_length)
        )
    data_tokens = sum(len(s) for s in samples)
    log.info(
        "%d dialogues, %d tokens, %d assistant tokens",
        len(samples),
        data_tokens,
        sum(s.n_labels for s in samples),
    )

    attn = (
        choose_attention(cfg.attention)
        if cfg.packing
        else ("sdpa" if cfg.attention in ("auto", "varlen") else cfg.attention)
    )
    varlen = attn == VARLEN
    dtype = torch.bfloat16 if gpu else torch.float32
    model = models.load_model(cfg.base, dtype=dtype, attn_implementation=attn)
    model.config.use_cache = False
    model = get_peft_model(model, lora_config(cfg, model))
    model.peft_config["default"].base_model_name_or_path = models.base_id(cfg.base)
    if gpu:
        keep_input_dtype(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    noise = NoisyEmbeddings(model, cfg.neftune_alpha) if cfg.neftune_alpha > 0 else None
    trainable, total = model.get_nb_trainable_parameters()
    log.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / total)

    world, rank = accelerator.num_processes, accelerator.process_index
    micro_per_epoch = len(make_batches(cfg, samples, 0)) // world
    if micro_per_epoch == 0:
        raise DataError(f"{cfg.data}: too few dialogues for {world} processes")
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
    )
    scheduler = get_scheduler(
        cfg.lr_schedule,
        optimizer,
        num_warmup_steps=round(cfg.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    unwrapped = accelerator.unwrap_model(model)

    state = TrainState()
    output.mkdir(parents=True, exist_ok=True)
    if cfg.resume:
        checkpoints = _checkpoint_dirs(output)
        if not checkpoints:
            raise ConfigError(f"--resume: no checkpoint under {output / CHECKPOINTS}")
        state = load_checkpoint(checkpoints[-1], unwrapped, optimizer, scheduler)
        log.info("resumed from %s (step %d)", checkpoints[-1], state.step)
        _truncate_log(output / LOSS_LOG, state.step)
    elif (output / LOSS_LOG).exists():
        (output / LOSS_LOG).unlink()

    pad_id = tokenizer.pad_token_id
    model.train()
    last_loss = float("nan")
    loop_start = time.time()
    tokens_at_start = state.tokens
    with (
        _progress(cfg.progress and accelerator.is_main_process) as progress,
        (output / LOSS_LOG).open("a", encoding="utf-8") as loss_log,
    ):
        task = progress.add_task(
            "train", total=total_steps, completed=state.step, loss="-", tps="-"
        )
        while state.step < total_steps:
            bins = make_batches(cfg, samples, state.epoch)
            mine = bins[: micro_per_epoch * world]
            while state.micro < micro_per_epoch and state.step < total_steps:
                group = range(state.micro, min(state.micro + cfg.grad_accum, micro_per_epoch))
                # normalise by the labels of the whole step on all processes, so the gradient is the
                # mean over every assistant token whatever the packing or the number of GPUs
                step_labels = sum(
                    sum(
                        samples[i].n_labels - (samples[i].labels[0] != IGNORE_INDEX)
                        for i in mine[m * world + r]
                    )
                    for m in group
                    for r in range(world)
                )
                step_loss, step_tokens = 0.0, 0
                for k, m in enumerate(group):
                    batch = collate(cfg, [samples[i] for i in mine[m * world + rank]], pad_id).to(
                        device
                    )
                    if noise is not None:
                        noise.use(batch)
                    sync = k == len(group) - 1
                    ctx = accelerator.no_sync(model) if not sync and world > 1 else _null()
                    with ctx, accelerator.autocast():
                        loss_sum, _ = batch_loss(model, batch, varlen)
                        loss = loss_sum * world / max(1, step_labels)
                    accelerator.backward(loss)
                    step_loss += float(loss_sum.detach())
                    step_tokens += batch.n_tokens
                grad_norm = (
                    float(accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
                    if cfg.max_grad_norm > 0
                    else float("nan")
                )
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.micro = group[-1] + 1
                state.step += 1
                state.tokens += step_tokens * world
                totals = accelerator.reduce(
                    torch.tensor([step_loss], device=device), reduction="sum"
                )
                last_loss = float(totals[0]) / max(1, step_labels)
                elapsed = time.time() - loop_start
                tps = (state.tokens - tokens_at_start) / max(elapsed, 1e-9)
                if accelerator.is_main_process:
                    record = {
                        "step": state.step,
                        "epoch": round(state.epoch + state.micro / micro_per_epoch, 4),
                        "loss": round(last_loss, 6),
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": round(grad_norm, 6),
                        "tokens": state.tokens,
                    }
                    loss_log.write(json.dumps(record) + "\n")
                    loss_log.flush()
                progress.update(
                    task, completed=state.step, loss=f"{last_loss:.4f}", tps=f"{tps:,.0f}"
                )
                epoch_done = state.micro >= micro_per_epoch
                if (cfg.save_steps > 0 and state.step % cfg.save_steps == 0) or (
                    cfg.save_steps == 0 and epoch_done
                ):
                    state.train_seconds += time.time() - loop_start
                    loop_start, tokens_at_start = time.time(), state.tokens
                    if accelerator.is_main_process:
                        save_checkpoint(
                            output, unwrapped, optimizer, scheduler, state, cfg.save_total_limit
                        )
                    accelerator.wait_for_everyone()
                if epoch_done and validation is not None and accelerator.is_main_process:
                    val = evaluate_loss(unwrapped, validation, cfg, device, varlen, pad_id)
                    loss_log.write(
                        json.dumps({"step": state.step, "validation_loss": round(val, 6)}) + "\n"
                    )
                    loss_log.flush()
            if state.micro >= micro_per_epoch:
                state.epoch += 1
                state.micro = 0
    state.train_seconds += time.time() - loop_start
    if noise is not None:
        noise.remove()

    manifest: dict[str, Any] = {}
    if accelerator.is_main_process:
        unwrapped.save_pretrained(output)
        tokenizer.save_pretrained(output)
        _check_adapter_config(output)
        metrics: dict[str, Any] = {"final_train_loss": round(last_loss, 6), "steps": state.step}
        if validation is not None:
            metrics["validation_loss"] = round(
                evaluate_loss(unwrapped, validation, cfg, device, varlen, pad_id), 6
            )
        manifest = {
            "persona": cfg.persona,
            "base_model": models.base_id(cfg.base),
            "system_prompt": _common_system_prompt(dialogues),
            "data": {
                "path": str(cfg.data),
                "sha256": file_sha256(cfg.data),
                "dialogues": len(samples),
                "tokens": data_tokens,
                "assistant_tokens": sum(s.n_labels for s in samples),
            },
            "settings": {
                **cfg.to_json(),
                "attention_implementation": attn,
                "dtype": str(dtype).removeprefix("torch."),
                "processes": world,
            },
            "metrics": metrics,
            "wall_time_s": round(time.time() - started, 2),
            "train_time_s": round(state.train_seconds, 2),
            "tokens_per_s": round(state.tokens / max(state.train_seconds, 1e-9), 1),
            "device": torch.cuda.get_device_name(0) if gpu else "cpu",
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        (output / MANIFEST).write_text(
            json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
        )
        from finetune.plots import plot_loss

        plot_loss(output / LOSS_LOG, output / LOSS_PNG, title=f"{cfg.persona}: LoRA SFT loss")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return manifest


def _common_system_prompt(dialogues: Sequence[Dialogue]) -> str | None:
    """The persona's system prompt: the one most dialogues start with (for `rolecast compare`)."""
    from collections import Counter

    counts = Counter(
        d.messages[0]["content"]
        for d in dialogues
        if d.messages and d.messages[0]["role"] == "system"
    )
    return counts.most_common(1)[0][0] if counts else None


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past `step` (written after the checkpoint we resume from)."""
    if not path.exists():
        return
    lines = [
        ln
        for ln in path.read_text(encoding="utf-8").splitlines()
        if ln.strip() and json.loads(ln)["step"] <= step
    ]
    path.write_text("".join(ln + "\n" for ln in lines), encoding="utf-8")


def _check_adapter_config(output: Path) -> None:
    config = json.loads((output / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("modules_to_save") or config.get("use_dora"):
        raise ConfigError("adapter has modules_to_save or DoRA, which vLLM cannot load")
