"""A training run's progress, read from its own JSON lines, and told in one line.

The loop launches `rolecast train --json` with its output in `<workdir>/train.log`: one JSON
object per line with a `type` (`start`, `progress`, `validation`, `checkpoint`, `result`,
`error`; see `finetune.progress`), among whatever else the process prints (warnings, a
traceback). `TrainLog` follows that file as it grows and keeps what the loop needs: the latest
progress, whether a checkpoint exists to resume from, the result, the error. Nothing here reads
the trainer's other files or scrapes its human-readable output.

`describe`, `replay_note` and `format_duration` are how both front ends (the terminal's progress line and the
Discord status message) show a job.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bot.retrain.jobs import Job


@dataclass(frozen=True)
class Progress:
    step: int
    total_steps: int | None
    loss: float | None
    tokens_per_s: float | None
    eta_s: float | None


class TrainLog:
    """Follows one training log; `poll()` returns the progress when new steps arrived."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self.total_steps: int | None = None
        self.latest: Progress | None = None
        self.checkpoint_step: int | None = None  # the newest complete checkpoint
        self.result: dict[str, Any] | None = None
        self.error: str | None = None

    def poll(self) -> Progress | None:
        """Read the lines written since the last poll; the newest progress if any arrived."""
        try:
            with self.path.open("rb") as f:
                if os.fstat(f.fileno()).st_size < self._offset:
                    self._offset = 0  # the log was cut back: read it again from the start
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return None
        end = chunk.rfind(b"\n")
        if end < 0:
            return None
        self._offset += end + 1
        moved = False
        for line in chunk[: end + 1].splitlines():
            event = _event(line)
            if event is not None:
                moved = self._take(event) or moved
        return self.latest if moved else None

    def _take(self, event: dict[str, Any]) -> bool:
        """Take one of the run's JSON lines; a field of the wrong type counts as not given, and
        a progress or checkpoint line without a step is not the run's (a launch wrapper or a
        library may print JSON objects with a `type` of their own)."""
        kind = event["type"]
        if kind == "start":
            self.total_steps = _count(event.get("total_steps"))
            self.error = None  # a new attempt
        elif kind == "progress":
            step = _count(event.get("step"))
            if step is None:
                return False
            total = _count(event.get("total_steps"))
            self.latest = Progress(
                step=step,
                total_steps=total if total is not None else self.total_steps,
                loss=_number(event.get("loss")),
                tokens_per_s=_number(event.get("tokens_per_s")),
                eta_s=_number(event.get("eta_s")),
            )
            return True
        elif kind == "checkpoint":
            step = _count(event.get("step"))
            if step is not None:
                self.checkpoint_step = step
        elif kind == "result":
            self.result = event
        elif kind == "error":
            self.error = str(event.get("message") or "training failed")
        return False

    def tail(self, lines: int = 8) -> str:
        """What to show when the run failed: its error, else the last lines it printed that are
        not its JSON lines (a traceback, a message from a launch wrapper)."""
        if self.error:
            return self.error
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        kept = [
            line for line in text.splitlines() if line.strip() and _event(line.encode()) is None
        ]
        return "\n".join(kept[-lines:])


def _count(value: Any) -> int | None:
    """`value` when it is a whole number of 0 or more (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _number(value: Any) -> float | None:
    """`value` as a float when it is a finite number (not a bool), else None."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _event(line: bytes) -> dict[str, Any] | None:
    """A JSON line of the trainer's (an object with a `type`), or None for any other line."""
    if not line.lstrip().startswith(b"{"):
        return None
    try:
        event = json.loads(line)
    except (ValueError, RecursionError):  # also bad UTF-8, and nesting too deep
        return None
    return event if isinstance(event, dict) and isinstance(event.get("type"), str) else None


def describe(job: Job) -> str:
    """One line: state, step, loss, tokens/s, time left (what the status message shows)."""
    parts = [f"job #{job.id} {job.persona}: {job.state}"]
    if job.state == "training" and job.step is not None:
        total = f"/{job.total_steps}" if job.total_steps else ""
        parts.append(f"step {job.step}{total}")
        if job.loss is not None:
            parts.append(f"loss {job.loss:.4f}")
        if job.tokens_per_s:
            parts.append(f"{job.tokens_per_s:,.0f} tokens/s")
        if job.eta_s is not None:
            parts.append(f"{format_duration(job.eta_s)} left")
    return ", ".join(parts)


def replay_note(replay: dict[str, Any] | None) -> str | None:
    """The job's replay in one line, for its status and log."""
    if not replay:
        return None
    by = replay.get("replayed") or {}
    total = sum(by.values())
    own = replay.get("own")
    if total:
        parts = ", ".join(f"{name} {n}" for name, n in sorted(by.items()))
        return (
            f"replayed {total} dialogues of other personas ({parts}) beside {own} of its own "
            "in the training file"
        )
    return f"no replay: {replay.get('why') or 'nothing to replay'}"


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
