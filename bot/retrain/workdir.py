"""A retrain job's work directory: where each step puts what the next one reads.

<workdir>/export/<persona>.jsonl, dataset_info.json   approved dialogues, or the `--data` file's
                                                      (ShareGPT)
<workdir>/data/<persona>.jsonl                        after `rolecast data clean`
<workdir>/data/<persona>_train.jsonl, _validation     after `rolecast data split`; the held-out
                                                      split is the gate's and only the persona's
<workdir>/replay/others.jsonl, others_clean.jsonl     the other personas' approved dialogues of
                                                      the job's scope, exported and cleaned
<workdir>/replay/<other>.jsonl                        the ones replayed, by persona
<workdir>/replay/replay.json                          how many were there and replayed, by persona
<workdir>/data/training.jsonl                         what training reads: the persona's training
                                                      split, then the replayed dialogues
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
    def own_train(self) -> Path:
        """The persona's own training split."""
        return self.workdir / "data" / f"{self.persona}_train.jsonl"

    @property
    def train(self) -> Path:
        """What training reads: the own training split and the replayed dialogues."""
        return self.workdir / "data" / "training.jsonl"

    def training_file(self) -> Path:
        """The file to train on: `train`, or for a job exported before the replay existed (its
        export left only the own split), `own_train`."""
        if not self.train.exists() and self.own_train.exists():
            return self.own_train
        return self.train

    @property
    def replay_dir(self) -> Path:
        return self.workdir / "replay"

    @property
    def replay_report(self) -> Path:
        return self.replay_dir / "replay.json"

    def replayed(self, other: str) -> Path:
        """Another persona's dialogues added to the training file."""
        return self.replay_dir / f"{other}.jsonl"

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
