"""LoRA SFT of a persona adapter: packed, assistant-only loss, checkpoints and resume.

`train` runs one job from a `TrainConfig` in four parts, each in its own module:

- the data is read, checked and tokenized here, before any weights load (a bad file costs
  seconds, not a model load);
- `finetune.adapter` loads the base and attaches the LoRA, then `finetune.memory` sizes the
  micro-batch to the memory left, unless `--batch_tokens` is given;
- `finetune.loop` trains it, reporting through `finetune.progress` (a bar, or JSON lines for
  `rolecast train --json`);
- `finetune.checkpoints` saves checkpoints to resume from, then the adapter and its manifest.

Several GPUs: `accelerate launch --multi_gpu --num_processes N -m rolecast train ...` (or
torchrun) runs this same function in N processes, data-parallel (DDP): each process holds the
whole frozen base and its own packed micro-batches, and only the LoRA gradients (megabytes) are
all-reduced. That is the right split for LoRA on gpt-oss-20b: its 21B bf16 weights (42 GB) fit
on one H100/H200 beside the activations, so FSDP's sharding would save memory that is not
needed and pay for it with an all-gather of the frozen weights in every layer's forward and
backward (twice 42 GB a step); FSDP becomes worth it only on GPUs too small for the base.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from finetune import memory, models
from finetune.adapter import TrainModel, build_model
from finetune.checkpoints import (
    CHECKPOINTS,
    LOSS_LOG,
    LOSS_PNG,
    TrainState,
    checkpoint_batch_tokens,
    checkpoint_dirs,
    common_system_prompt,
    load_checkpoint,
    refuse_to_overwrite,
    save_adapter,
    truncate_log,
)
from finetune.config import TrainConfig
from finetune.data import Dialogue, file_sha256, load_dialogues
from finetune.errors import ConfigError, DataError
from finetune.loop import TrainingLoop, make_batches
from finetune.memory import Plan
from finetune.progress import ProgressBar, Reporter
from finetune.template import Encoded, count_tokens, encode
from formats.jsonfile import require_data_file
from formats.manifest import DataInfo, Manifest, write_manifest

log = logging.getLogger(__name__)


def encode_dialogues(tokenizer: Any, dialogues: Sequence[Dialogue]) -> list[Encoded]:
    samples = [encode(tokenizer, d.messages) for d in dialogues]
    empty = [d.row_id for d, s in zip(dialogues, samples, strict=True) if s.n_labels == 0]
    if empty:
        raise DataError("some dialogues have no assistant tokens after templating", empty)
    return samples


def _start_state(
    cfg: TrainConfig, output: Path, unwrapped: Any, optimizer: Any, scheduler: Any
) -> TrainState:
    """A fresh state (and loss log), or the latest checkpoint's with `--resume`."""
    output.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:
        (output / LOSS_LOG).unlink(missing_ok=True)
        return TrainState()
    checkpoints = checkpoint_dirs(output)
    if not checkpoints:
        raise ConfigError(f"--resume: no checkpoint under {output / CHECKPOINTS}")
    state = load_checkpoint(checkpoints[-1], unwrapped, optimizer, scheduler)
    log.info("resumed from %s (step %d)", checkpoints[-1], state.step)
    truncate_log(output / LOSS_LOG, state.step)
    return state


def train(cfg: TrainConfig, reporter: Reporter | None = None) -> dict[str, Any]:
    """Train the adapter described by `cfg`; returns the manifest written to rolecast.json.

    `reporter` hears of every step, validation and checkpoint (default: a progress bar when
    `cfg.progress`, else nothing); only the main process of a multi-GPU run reports.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    started = time.time()
    output = Path(cfg.output or f"runs/{cfg.persona}")
    refuse_to_overwrite(output, cfg.resume)
    gpu = torch.cuda.is_available()
    # cpu=True without a GPU: several CPU processes (torchrun) then train together over gloo
    accelerator = Accelerator(mixed_precision="bf16" if gpu else "no", cpu=not gpu)
    set_seed(cfg.seed)

    # The data is checked before any model weights are loaded: a bad file costs seconds, and
    # a file that cannot be opened is reported before even the tokenizer (on a fresh machine,
    # loading it converts the default model first).
    for path in (cfg.data, cfg.validation_data):
        if path:
            require_data_file(path)
    tokenizer = models.load_tokenizer(cfg.base)
    data = _read_data(cfg, tokenizer)
    samples, validation = data.samples, data.validation

    built = build_model(cfg, gpu)
    cfg, plan = _sized(cfg, built, data, gpu, accelerator, output)
    world = accelerator.num_processes
    micro_per_epoch = len(make_batches(cfg, samples, 0)) // world
    if micro_per_epoch == 0:
        raise DataError(f"{cfg.data}: too few dialogues for {world} processes")
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(
        [p for p in built.model.parameters() if p.requires_grad],
        lr=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
    )
    scheduler = get_scheduler(
        cfg.lr_schedule,
        optimizer,
        num_warmup_steps=round(cfg.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    model, optimizer = accelerator.prepare(built.model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    state = _start_state(cfg, output, unwrapped, optimizer, scheduler)
    state.batch_tokens = cfg.batch_tokens

    main = accelerator.is_main_process
    if not main:
        reporter = Reporter()
    elif reporter is None:
        reporter = ProgressBar() if cfg.progress else Reporter()
    loop = TrainingLoop(
        cfg=cfg,
        accelerator=accelerator,
        model=model,
        unwrapped=unwrapped,
        optimizer=optimizer,
        scheduler=scheduler,
        samples=samples,
        validation=validation,
        micro_per_epoch=micro_per_epoch,
        total_steps=total_steps,
        varlen=built.varlen,
        pad_id=tokenizer.pad_token_id,
        noise=built.noise,
        output=output,
        reporter=reporter,
    )
    with reporter:
        reporter.start(
            step=state.step,
            total_steps=total_steps,
            dialogues=len(samples),
            tokens=data.tokens,
            batch_tokens=cfg.batch_tokens,
            lora_r=cfg.lora_r,
        )
        last_loss = loop.run(state)
        # the last epoch's validation loss when it was computed at the last step, else now
        # (with its progress shown, like every other long part of the run)
        validation_loss = loop.final_validation(state.step) if validation and main else None
    if built.noise is not None:
        built.noise.remove()

    written: dict[str, Any] = {}
    if main:
        save_adapter(output, unwrapped, cfg.allow_unservable)
        written = _write_manifest(
            cfg, output, data, built, plan, loop, state, last_loss, validation_loss, started
        )
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        _KEPT_TO_EXIT.append((model, optimizer, accelerator))
    accelerator.end_training()
    return written


# What owns a multi-process run's process group, kept until the process ends
# (`exit_if_distributed`). Freed when `train` returns, the process group's destructor ran on
# the main thread, holding the interpreter lock, and waited for gloo's worker thread, which
# was itself waiting for that lock to free the last barrier's tensors: a run that had written
# its adapter then hung for ever (seen under load on CPU; the same teardown hang is reported
# upstream for torch.distributed).
_KEPT_TO_EXIT: list[tuple[Any, ...]] = []


def exit_if_distributed(code: int = 0) -> None:
    """End a process of a multi-process run now, its output flushed, without tearing down
    the process group (see `_KEPT_TO_EXIT`); a single-process run just returns. The adapter,
    the manifest and the logs are written and closed before `train` returns."""
    if not _KEPT_TO_EXIT:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _sized(
    cfg: TrainConfig,
    built: TrainModel,
    data: TrainData,
    gpu: bool,
    accelerator: Any,
    output: Path,
) -> tuple[TrainConfig, Plan | None]:
    """`cfg` with the rank and the micro-batch size the run uses: those given, else the base
    size's rank (`build_model` chose it) and as many tokens as the free memory holds
    (`finetune.memory`). A resumed run keeps the batch size it started with, and the processes
    of a multi-GPU run take the smallest any of them can hold."""
    given = cfg.batch_tokens
    if given is None and cfg.resume:
        given = checkpoint_batch_tokens(output)
    sized = replace(cfg, lora_r=built.lora_r)
    if not cfg.packing:
        return sized, None
    plan = memory.plan(
        built.model,
        gpu=gpu,
        dtype_bytes=torch.finfo(built.dtype).bits // 8,
        lengths=[len(s) for s in [*data.samples, *(data.validation or [])]],
        label_fraction=data.label_fraction,
        checkpointing=cfg.gradient_checkpointing,
        batch_tokens=given,
    )
    chosen = plan.batch_tokens
    if accelerator.num_processes > 1:
        chosen = int(accelerator.gather(torch.tensor([chosen], device=accelerator.device)).min())
    if cfg.batch_tokens is None:
        log.info(
            "%d tokens per micro-batch: %s free, about %s per token",
            chosen,
            memory.gib(plan.free_bytes),
            f"{plan.bytes_per_token / 2**20:.1f} MiB",
        )
    # set after construction: a size chosen for the memory may be below --max_length, which
    # only a given size must reach (the longest dialogue still fits, `memory.plan` sees to it)
    sized.batch_tokens = chosen
    return sized, plan


@dataclass
class TrainData:
    dialogues: list[Dialogue]
    samples: list[Encoded]
    validation: list[Encoded] | None

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.samples)

    @property
    def label_fraction(self) -> float:
        """The share of the training tokens that carry a label (the replies)."""
        return sum(s.n_labels for s in self.samples) / max(1, self.tokens)


def _read_data(cfg: TrainConfig, tokenizer: Any) -> TrainData:
    """The training (and validation) dialogues, checked and tokenized; DataError if unusable."""

    def counter(messages: Any) -> int:
        return count_tokens(tokenizer, messages)

    dialogues = load_dialogues(cfg.data, counter, cfg.max_length)
    validation = None
    if cfg.validation_data:
        validation = encode_dialogues(
            tokenizer, load_dialogues(cfg.validation_data, counter, cfg.max_length)
        )
    data = TrainData(dialogues, encode_dialogues(tokenizer, dialogues), validation)
    log.info(
        "%d dialogues, %d tokens, %d assistant tokens",
        len(data.samples),
        data.tokens,
        sum(s.n_labels for s in data.samples),
    )
    return data


def _write_manifest(
    cfg: TrainConfig,
    output: Path,
    data: TrainData,
    built: TrainModel,
    plan: Plan | None,
    loop: TrainingLoop,
    state: TrainState,
    last_loss: float,
    validation_loss: float | None,
    started: float,
) -> dict[str, Any]:
    """The run's `rolecast.json` (and its loss curve); returns what was written."""
    metrics: dict[str, Any] = {"final_train_loss": round(last_loss, 6), "steps": state.step}
    if validation_loss is not None:
        metrics["validation_loss"] = round(validation_loss, 6)
    gpu = torch.cuda.is_available()
    manifest = Manifest(
        persona=cfg.persona,
        base_model=models.base_id(cfg.base),
        system_prompt=common_system_prompt(data.dialogues),
        data=DataInfo(
            path=str(cfg.data),
            sha256=file_sha256(cfg.data),
            dialogues=len(data.samples),
            tokens=data.tokens,
            assistant_tokens=sum(s.n_labels for s in data.samples),
        ),
        settings={
            **cfg.to_json(),
            "base_parameters": built.base_parameters,
            **({"memory": plan.to_json()} if plan is not None else {}),
            "attention_implementation": built.attention,
            "dtype": str(built.dtype).removeprefix("torch."),
            "processes": loop.accelerator.num_processes,
        },
        metrics=metrics,
        wall_time_s=round(time.time() - started, 2),
        train_time_s=round(state.train_seconds, 2),
        tokens_per_s=round(state.tokens / max(state.train_seconds, 1e-9), 1),
        device=torch.cuda.get_device_name(0) if gpu else "cpu",
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    written = write_manifest(output, manifest)
    from finetune.plots import plot_loss

    plot_loss(output / LOSS_LOG, output / LOSS_PNG, title=f"{cfg.persona}: LoRA SFT loss")
    return written
