"""How a training run tells how it goes: a progress bar for a person, JSON lines for a program.

`rolecast train --json` writes one JSON object per line on stdout, each with a `type`:

| type | fields |
| --- | --- |
| `start` | `step` (where it starts: 0, or the checkpoint it resumed), `total_steps`, `dialogues`, `tokens` |
| `progress` | after each optimizer step: `step`, `total_steps`, `epoch`, `loss`, `lr`, `grad_norm`, `tokens`, `tokens_per_s`, `eta_s` |
| `validation` | after an epoch, with validation data: `step`, `validation_loss` |
| `checkpoint` | a complete checkpoint to `--resume` from: `step`, `path` |
| `result` | the adapter is written: `adapter`, `manifest` (its `rolecast.json`) |
| `error` | the run stopped: `message`, `problems` (row by row, for bad data) |

The retrain loop (`bot.retrain`) follows a run through these lines; nothing reads the bar.
"""

from __future__ import annotations

import json
import sys
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

    def start(self, *, step: int, total_steps: int, dialogues: int, tokens: int) -> None:
        return None

    def progress(self, record: dict[str, Any]) -> None:
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
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeRemainingColumn(),
        )
        self.task: Any = None

    def __enter__(self) -> ProgressBar:
        self.bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.stop()

    def start(self, *, step: int, total_steps: int, dialogues: int, tokens: int) -> None:
        self.task = self.bar.add_task("train", total=total_steps, completed=step, loss="-", tps="-")

    def progress(self, record: dict[str, Any]) -> None:
        self.bar.update(
            self.task,
            completed=record["step"],
            loss=f"{record['loss']:.4f}",
            tps=f"{record['tokens_per_s']:,.0f}",
        )


class JsonLines(Reporter):
    """One JSON object per line, flushed at once, for a program that follows the run."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out

    def emit(self, kind: str, **fields: Any) -> None:
        out = self.out or sys.stdout
        out.write(json.dumps({"type": kind, **fields}, ensure_ascii=False) + "\n")
        out.flush()

    def start(self, *, step: int, total_steps: int, dialogues: int, tokens: int) -> None:
        self.emit("start", step=step, total_steps=total_steps, dialogues=dialogues, tokens=tokens)

    def progress(self, record: dict[str, Any]) -> None:
        self.emit("progress", **record)

    def validation(self, step: int, loss: float) -> None:
        self.emit("validation", step=step, validation_loss=loss)

    def checkpoint(self, step: int, path: str) -> None:
        self.emit("checkpoint", step=step, path=path)

    def result(self, adapter: str, manifest: dict[str, Any]) -> None:
        self.emit("result", adapter=adapter, manifest=manifest)

    def error(self, message: str, problems: list[str]) -> None:
        self.emit("error", message=message, problems=problems)
