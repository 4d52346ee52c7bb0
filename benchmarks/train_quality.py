"""Quality of persona adapters on the default base model: clean, split, train, predict, score.

For each persona file (haruhi, atri, xin by default) this runs the same commands a user runs:

    rolecast data clean  DATA/P.jsonl -o WORK/P.clean.jsonl --max-length 4096
    rolecast data split  WORK/P.clean.jsonl -o WORK --validation 0.1 --seed 42
    rolecast train --data WORK/P.clean_train.jsonl --validation_data WORK/P.clean_validation.jsonl \
                   --persona P --output WORK/P [SETTINGS]
    rolecast eval  --data WORK/P.clean_validation.jsonl --adapter WORK/P --output WORK/P/eval

The validation split is held out from training; its last replies are what is scored.
`--no-score` saves predictions only (for a GPU host without the metric packages);
`--score-only WORK` scores saved predictions later. Prints one JSON object per persona.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

SETTINGS = [
    "--lora_r", "32", "--lora_alpha", "64", "--lora_dropout", "0.05",
    "--learning_rate", "3e-4", "--epochs", "5", "--warmup_ratio", "0.03",
    "--max_length", "4096", "--batch_tokens", "8192", "--seed", "42", "--no_progress",
]  # fmt: skip


# The finetune commands alone, as `rolecast` registers them (a training host needs no bot deps).
RUNNER = (
    "import typer; from finetune.cli import register; app = typer.Typer(); register(app); app()"
)


def sh(*args: str) -> None:
    cmd = [sys.executable, "-c", RUNNER, *args]
    print("+ rolecast " + shlex.join(args), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "shared/data/roleplay",
    )
    parser.add_argument("--work", type=Path, default=Path("runs/quality"))
    parser.add_argument("--personas", nargs="+", default=["haruhi", "atri", "xin"])
    parser.add_argument("--no-score", action="store_true")
    parser.add_argument("--score-only", action="store_true")
    parser.add_argument(
        "--extra", default="", help="Extra `rolecast train` flags, e.g. '--epochs 3'."
    )
    parser.add_argument("--tag", default="", help="Suffix of the run directories (for ablations).")
    args = parser.parse_args()

    for persona in args.personas:
        work = args.work
        clean = work / f"{persona}.clean.jsonl"
        run = work / f"{persona}{args.tag}"
        val = work / f"{persona}.clean_validation.jsonl"
        if not args.score_only:
            work.mkdir(parents=True, exist_ok=True)
            if not clean.exists():
                sh(
                    "data",
                    "clean",
                    str(args.data_dir / f"{persona}.jsonl"),
                    "-o",
                    str(clean),
                    "--max-length",
                    "4096",
                )
                sh(
                    "data",
                    "split",
                    str(clean),
                    "-o",
                    str(work),
                    "--validation",
                    "0.1",
                    "--seed",
                    "42",
                )
            sh(
                "train", "--data", str(work / f"{persona}.clean_train.jsonl"), "--validation_data", str(val),
                "--persona", persona, "--output", str(run), *SETTINGS, *shlex.split(args.extra),
            )  # fmt: skip
            sh(
                "eval",
                "--data",
                str(val),
                "--adapter",
                str(run),
                "--output",
                str(run / "eval"),
                "--no-score",
            )
        if not args.no_score:
            sh(
                "eval",
                "--predictions",
                str(run / "eval" / "predictions.jsonl"),
                "--output",
                str(run / "eval"),
            )
            scores = json.loads((run / "eval" / "metrics.json").read_text())
            manifest = json.loads((run / "rolecast.json").read_text())
            print(
                json.dumps(
                    {
                        "persona": persona + args.tag,
                        **scores,
                        "train": manifest["metrics"],
                        "tokens_per_s": manifest["tokens_per_s"],
                        "train_time_s": manifest["train_time_s"],
                    }
                )
            )


if __name__ == "__main__":
    main()
