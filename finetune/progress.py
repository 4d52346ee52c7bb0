"""How a training run tells how it goes: a progress bar for a person, JSON lines for a program.

`rolecast train --json` writes one JSON object per line on stdout, each with a `type`:

| type | fields |
| --- | --- |
| `start` | `step` (where it starts: 0, or the checkpoint it resumed), `total_steps`, `dialogues`, `tokens`, `batch_tokens` and `lora_r` (as chosen when not given) |
| `progress` | after each optimizer step: `step`, `total_steps`, `epoch`, `loss`, `lr`, `grad_norm`, `tokens`, `tokens_per_s`, `eta_s` |
| `validating` | while the validation loss is computed: at its start (`done` 0), at most once a second, and at its end: `step`, `done`, `total` (batches) |
| `validation` | after an epoch, with validation data: `step`, `validation_loss` |
| `checkpoint` | a complete checkpoint to `--resume` from: `step`, `path` |
| `result` | the adapter is written: `adapter`, `manifest` (its `rolecast.json`) |
| `error` | the run stopped: `message`, `problems` (row by row, for bad data) |

The retrain loop (`bot.retrain`) follows a run through these lines; nothing reads the bar.
"""

from __future__ import annotations

import json
import sys
import time
from types import TracebackType
from typing import Any, TextIO


class Reporter:
    """Reports nothing: the base for the two below, and what processes other than the main one
    of a multi-GPU run use."""

    def __enter__(self) -> Reporter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def start(
        self,
        *,
        step: int,
        total_steps: int,
        dialogues: int,
        tokens: int,
        batch_tokens: int | None = None,
        lora_r: int | None = None,
    ) -> None:
        return None

    def progress(self, record: dict[str, Any]) -> None:
        return None

    def validating(self, step: int, done: int, total: int) -> None:
        """`done` of `total` validation batches are computed."""
        return None

    def validation(self, step: int, loss: float) -> None:
        return None

    def checkpoint(self, step: int, path: str) -> None:
        return None


class ProgressBar(Reporter):
    """A rich progress bar: steps, loss, tokens/s, time left."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeRemainingColumn(),
        )
        self.task: Any = None
        self.validation_task: Any = None

    def __enter__(self) -> ProgressBar:
        self.bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.stop()

    def start(
        self,
        *,
        step: int,
        total_steps: int,
        dialogues: int,
        tokens: int,
        batch_tokens: int | None = None,
        lora_r: int | None = None,
    ) -> None:
        self.task = self.bar.add_task("train", total=total_steps, completed=step, loss="-", tps="-")

    def progress(self, record: dict[str, Any]) -> None:
        self.bar.update(
            self.task,
            completed=record["step"],
            loss=f"{record['loss']:.4f}",
            tps=f"{record['tokens_per_s']:,.0f}",
        )

    def validating(self, step: int, done: int, total: int) -> None:
        if self.validation_task is None:
            self.validation_task = self.bar.add_task(
                "validate", total=total, completed=done, loss="-", tps="-"
            )
        self.bar.update(self.validation_task, completed=done, total=total)
        if done >= total:
            self.bar.remove_task(self.validation_task)
            self.validation_task = None


class JsonLines(Reporter):
    """One JSON object per line, flushed at once, for a program that follows the run."""

    def __init__(self, out: TextIO | None = None, every_s: float = 1.0) -> None:
        self.out = out
        self.every_s = every_s  # `validating` lines at most this often (and the last one)
        self._validating_at = 0.0

    def emit(self, kind: str, **fields: Any) -> None:
        out = self.out or sys.stdout
        out.write(json.dumps({"type": kind, **fields}, ensure_ascii=False) + "\n")
        out.flush()

    def start(
        self,
        *,
        step: int,
        total_steps: int,
        dialogues: int,
        tokens: int,
        batch_tokens: int | None = None,
        lora_r: int | None = None,
    ) -> None:
        self.emit(
            "start",
            step=step,
            total_steps=total_steps,
            dialogues=dialogues,
            tokens=tokens,
            batch_tokens=batch_tokens,
            lora_r=lora_r,
        )

    def progress(self, record: dict[str, Any]) -> None:
        self.emit("progress", **record)

    def validating(self, step: int, done: int, total: int) -> None:
        now = time.monotonic()
        if 0 < done < total and now - self._validating_at < self.every_s:
            return
        self._validating_at = now
        self.emit("validating", step=step, done=done, total=total)

    def validation(self, step: int, loss: float) -> None:
        self.emit("validation", step=step, validation_loss=loss)

    def checkpoint(self, step: int, path: str) -> None:
        self.emit("checkpoint", step=step, path=path)

    def result(self, adapter: str, manifest: dict[str, Any]) -> None:
        self.emit("result", adapter=adapter, manifest=manifest)

    def error(self, message: str, problems: list[str]) -> None:
        self.emit("error", message=message, problems=problems)
