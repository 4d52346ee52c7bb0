"""A retrain job's work directory: where each step puts what the next one reads.

<workdir>/export/<persona>.jsonl, dataset_info.json   approved dialogues (ShareGPT)
<workdir>/data/<persona>.jsonl                        after `rolecast data clean`
<workdir>/data/<persona>_train.jsonl, _validation     after `rolecast data split`
<workdir>/adapter/                                    `rolecast train` output (+ loss.png)
<workdir>/train.log                                   the training run's output (JSON lines)
<workdir>/eval/                                       `rolecast eval` output (+ metrics.png)
<workdir>/steps.log                                   the other commands' output
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ADAPTER, LOSS_PNG, EVAL_PNG = "adapter", "loss.png", "metrics.png"


@dataclass(frozen=True)
class Paths:
    """Where a job's files are, under its work directory."""

    workdir: Path
    persona: str

    @property
    def export(self) -> Path:
        return self.workdir / "export" / f"{self.persona}.jsonl"

    @property
    def clean(self) -> Path:
        return self.workdir / "data" / f"{self.persona}.jsonl"

    @property
    def train(self) -> Path:
        return self.workdir / "data" / f"{self.persona}_train.jsonl"

    @property
    def validation(self) -> Path:
        return self.workdir / "data" / f"{self.persona}_validation.jsonl"

    @property
    def adapter(self) -> Path:
        return self.workdir / ADAPTER

    @property
    def eval_dir(self) -> Path:
        return self.workdir / "eval"

    @property
    def train_log(self) -> Path:
        return self.workdir / "train.log"

    @property
    def steps_log(self) -> Path:
        return self.workdir / "steps.log"

    @property
    def loss_png(self) -> Path:
        return self.adapter / LOSS_PNG

    @property
    def eval_png(self) -> Path:
        return self.eval_dir / EVAL_PNG


def count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())
