"""Training progress from the trainer's `loss.jsonl`: step, loss, tokens/s and time left.

The trainer appends one JSON line per optimizer step (`step`, `epoch`, `loss`, `tokens`, ...)
and flushes it, so another process can follow the file while it grows. Tokens/s and the time
left are measured here, over the lines this reader has seen arrive, so a job that was resumed
does not count the tokens of its earlier run.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Progress:
    step: int
    total_steps: int | None
    loss: float | None
    tokens_per_s: float | None
    eta_s: float | None


def planned_steps(train_args: list[str]) -> tuple[int | None, float]:
    """(--max_steps if given, --epochs or the trainer's default of 3) from the flags."""
    max_steps: int | None = None
    epochs = 3.0
    for i, arg in enumerate(train_args):
        name, eq, value = arg.partition("=")
        if not eq and i + 1 < len(train_args):
            value = train_args[i + 1]
        if name in ("--max_steps", "--max-steps") and int(value) > 0:
            max_steps = int(value)
        elif name == "--epochs":
            epochs = float(value)
    return max_steps, epochs


class LossLogReader:
    """Follows one `loss.jsonl`; `poll()` returns the progress when new steps arrived."""

    def __init__(self, path: Path, *, max_steps: int | None = None, epochs: float = 3.0) -> None:
        self.path = path
        self.max_steps = max_steps
        self.epochs = epochs
        self._offset = 0
        self._first: tuple[float, int, int] | None = None  # (time, step, tokens) first seen
        self._last: dict[str, float] | None = None

    def poll(self) -> Progress | None:
        try:
            with self.path.open("rb") as f:
                if os.fstat(f.fileno()).st_size < self._offset:
                    self._offset = 0  # cut back on a resume: read again from the start
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return None
        end = chunk.rfind(b"\n")
        if end < 0:
            return None
        self._offset += end + 1
        now = time.monotonic()
        seen = False
        for line in chunk[: end + 1].splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" not in record or "step" not in record:
                continue  # validation lines
            if self._first is None:
                self._first = (now, int(record["step"]), int(record.get("tokens", 0)))
            self._last = record
            seen = True
        return self.progress(now) if seen else None

    def total_steps(self) -> int | None:
        if self.max_steps:
            return self.max_steps
        if not self._last or not self._last.get("epoch"):
            return None
        per_epoch = float(self._last["step"]) / float(self._last["epoch"])
        return max(int(self._last["step"]), math.ceil(self.epochs * per_epoch - 1e-6))

    def progress(self, now: float | None = None) -> Progress | None:
        if self._last is None or self._first is None:
            return None
        now = time.monotonic() if now is None else now
        step = int(self._last["step"])
        total = self.total_steps()
        started, first_step, first_tokens = self._first
        elapsed = now - started
        tps = eta = None
        if elapsed > 0 and step > first_step:
            tps = (int(self._last.get("tokens", 0)) - first_tokens) / elapsed
            if total is not None:
                eta = max(0.0, (total - step) * elapsed / (step - first_step))
        return Progress(step, total, float(self._last["loss"]), tps, eta)
