"""The training loop: packed (or padded) micro-batches, assistant-only loss, gradient
accumulation, checkpoints at epoch ends or every N steps, validation after each epoch.

Plain PyTorch under accelerate (device placement, bf16 autocast on a GPU, DDP when launched with
`accelerate launch`), so the parts that make it fast stay visible: packed rows with per-dialogue
positions, the varlen attention kernel, and logits computed only where a label is
(`logits_to_keep` with the label positions).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from finetune.adapter import NoisyEmbeddings
from finetune.checkpoints import LOSS_LOG, TrainState, save_checkpoint
from finetune.config import TrainConfig
from finetune.packing import Batch, collate_packed, collate_padded, packed_batches, padded_batches
from finetune.progress import Reporter
from finetune.template import IGNORE_INDEX, Encoded


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


def make_batches(cfg: TrainConfig, samples: Sequence[Encoded], epoch: int) -> list[list[int]]:
    if cfg.packing:
        assert cfg.batch_tokens is not None, "the trainer sizes the batch before batching"
        return packed_batches(samples, cfg.batch_tokens, cfg.seed, epoch)
    return padded_batches(samples, cfg.batch_size, cfg.seed, epoch)


def collate(cfg: TrainConfig, samples: Sequence[Encoded], pad_id: int) -> Batch:
    return collate_packed(samples) if cfg.packing else collate_padded(samples, pad_id)


@torch.no_grad()
def evaluate_loss(
    model: Any,
    samples: Sequence[Encoded],
    cfg: TrainConfig,
    device: Any,
    varlen: bool,
    pad_id: int,
    on_batch: Callable[[int, int], None] | None = None,
) -> float:
    """Mean loss over the labelled tokens of `samples`; `on_batch(done, total)` hears of each
    batch (and of none done, first)."""
    model.eval()
    total, count = 0.0, 0
    batches = make_batches(cfg, samples, epoch=0)
    if on_batch is not None:
        on_batch(0, len(batches))
    for done, indices in enumerate(batches, start=1):
        batch = collate(cfg, [samples[i] for i in indices], pad_id).to(device)
        loss, n = batch_loss(model, batch, varlen)
        total += float(loss)
        count += n
        if on_batch is not None:
            on_batch(done, len(batches))
    model.train()
    return total / max(1, count)


@dataclass
class TrainingLoop:
    """Everything one run's loop works with, prepared by `finetune.trainer.train`."""

    cfg: TrainConfig
    accelerator: Any
    model: Any  # as accelerate prepared it (DDP-wrapped on several GPUs)
    unwrapped: Any
    optimizer: Any
    scheduler: Any
    samples: Sequence[Encoded]
    validation: Sequence[Encoded] | None
    micro_per_epoch: int
    total_steps: int
    varlen: bool
    pad_id: int
    noise: NoisyEmbeddings | None
    output: Path
    reporter: Reporter
    last_validation: tuple[int, float] | None = field(default=None, init=False)

    def validate(self, step: int) -> float:
        """The validation loss at `step`, with its progress reported."""
        loss = evaluate_loss(
            self.unwrapped,
            self.validation or [],
            self.cfg,
            self.accelerator.device,
            self.varlen,
            self.pad_id,
            on_batch=lambda done, total: self.reporter.validating(step, done, total),
        )
        self.last_validation = (step, loss)
        return loss

    def final_validation(self, step: int) -> float:
        """The validation loss at the last step: the one computed at that step's epoch end if
        there was one, else computed now."""
        if self.last_validation is not None and self.last_validation[0] == step:
            return self.last_validation[1]
        return self.validate(step)

    def run(self, state: TrainState) -> float:
        """Train from `state` to the last step; returns the last step's loss."""
        cfg, accelerator, samples = self.cfg, self.accelerator, self.samples
        world, rank = accelerator.num_processes, accelerator.process_index
        main = accelerator.is_main_process
        device = accelerator.device
        self.model.train()
        last_loss = float("nan")
        loop_start = time.time()
        run_start, run_start_step, run_start_tokens = time.monotonic(), state.step, state.tokens
        with (self.output / LOSS_LOG).open("a", encoding="utf-8") as loss_log:
            while state.step < self.total_steps:
                bins = make_batches(cfg, samples, state.epoch)
                mine = bins[: self.micro_per_epoch * world]
                while state.micro < self.micro_per_epoch and state.step < self.total_steps:
                    group = range(
                        state.micro, min(state.micro + cfg.grad_accum, self.micro_per_epoch)
                    )
                    # normalise by the labels of the whole step on all processes, so the gradient
                    # is the mean over every assistant token whatever the packing or GPU count
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
                        batch = collate(
                            cfg, [samples[i] for i in mine[m * world + rank]], self.pad_id
                        ).to(device)
                        if self.noise is not None:
                            self.noise.use(batch)
                        sync = k == len(group) - 1
                        ctx = (
                            accelerator.no_sync(self.model)
                            if not sync and world > 1
                            else contextlib.nullcontext()
                        )
                        with ctx, accelerator.autocast():
                            loss_sum, _ = batch_loss(self.model, batch, self.varlen)
                            loss = loss_sum * world / max(1, step_labels)
                        accelerator.backward(loss)
                        step_loss += float(loss_sum.detach())
                        step_tokens += batch.n_tokens
                    grad_norm = (
                        float(
                            accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                        )
                        if cfg.max_grad_norm > 0
                        else float("nan")
                    )
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    state.micro = group[-1] + 1
                    state.step += 1
                    state.tokens += step_tokens * world
                    totals = accelerator.reduce(
                        torch.tensor([step_loss], device=device), reduction="sum"
                    )
                    last_loss = float(totals[0]) / max(1, step_labels)
                    if main:
                        record = {
                            "step": state.step,
                            "epoch": round(state.epoch + state.micro / self.micro_per_epoch, 4),
                            "loss": round(last_loss, 6),
                            "lr": self.scheduler.get_last_lr()[0],
                            "grad_norm": round(grad_norm, 6),
                            "tokens": state.tokens,
                        }
                        loss_log.write(json.dumps(record) + "\n")
                        loss_log.flush()
                        elapsed = max(time.monotonic() - run_start, 1e-9)
                        done = state.step - run_start_step
                        self.reporter.progress(
                            {
                                **record,
                                "total_steps": self.total_steps,
                                "tokens_per_s": round(
                                    (state.tokens - run_start_tokens) / elapsed, 1
                                ),
                                "eta_s": round((self.total_steps - state.step) * elapsed / done, 1),
                            }
                        )
                    epoch_done = state.micro >= self.micro_per_epoch
                    if (cfg.save_steps > 0 and state.step % cfg.save_steps == 0) or (
                        cfg.save_steps == 0 and epoch_done
                    ):
                        state.train_seconds += time.time() - loop_start
                        loop_start = time.time()
                        if main:
                            path = save_checkpoint(
                                self.output,
                                self.unwrapped,
                                self.optimizer,
                                self.scheduler,
                                state,
                                cfg.save_total_limit,
                            )
                            self.reporter.checkpoint(state.step, str(path))
                        accelerator.wait_for_everyone()
                    if epoch_done and self.validation is not None and main:
                        val = round(self.validate(state.step), 6)
                        loss_log.write(
                            json.dumps({"step": state.step, "validation_loss": val}) + "\n"
                        )
                        loss_log.flush()
                        self.reporter.validation(state.step, val)
                if state.micro >= self.micro_per_epoch:
                    state.epoch += 1
                    state.micro = 0
        state.train_seconds += time.time() - loop_start
        return last_loss
