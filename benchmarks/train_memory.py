"""Peak memory of `rolecast train` against the tokens of a packed micro-batch.

Each batch size runs in a process of its own (so one run's peak does not hide the next one's):
the real trainer (`finetune.trainer.train`) on the given dialogues with `rolecast train`'s
defaults, `--batch_tokens N`, a few optimizer steps. On a CPU the peak is the process's peak
resident set size (`ru_maxrss`); on a GPU, torch's peak allocated memory. Prints one JSON object
per batch size, then a least-squares fit of peak = fixed + a * tokens + b * tokens^2, the form
`finetune.memory` estimates with.

    python benchmarks/train_memory.py --data clean_512.jsonl --batch-tokens 512 1024 2048 4096

The dialogues must each fit the smallest batch (`rolecast data clean --max-length 512`).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def one(data: str, batch_tokens: int, steps: int, base: str, extra: list[str]) -> dict[str, Any]:
    """Train `steps` steps at `batch_tokens` in this process; its peak memory and batch sizes."""
    import psutil
    import torch

    from finetune.config import parse_train_args
    from finetune.progress import Reporter
    from finetune.trainer import train

    class Probe(Reporter):
        def __init__(self) -> None:
            self.rss_at_start = 0
            self.tokens: list[int] = []

        def start(self, **fields: Any) -> None:
            self.rss_at_start = psutil.Process().memory_info().rss

        def progress(self, record: dict[str, Any]) -> None:
            self.tokens.append(record["tokens"])

    probe = Probe()
    with tempfile.TemporaryDirectory() as out:
        flags = [
            "--data", data, "--persona", "probe", "--base", base, "--output", out,
            "--batch_tokens", str(batch_tokens), "--max_length", str(batch_tokens),
            "--max_steps", str(steps), "--save_steps", str(10 * steps),
            "--progress", "false", *extra,
        ]  # fmt: skip
        cfg = parse_train_args(flags)
        manifest = train(cfg, probe)
    steps_tokens = [b - a for a, b in zip([0, *probe.tokens], probe.tokens, strict=False)]
    gpu = torch.cuda.is_available()
    return {
        "batch_tokens": batch_tokens,
        "largest_step_tokens": max(steps_tokens),
        "device": "cuda" if gpu else "cpu",
        "lora_r": manifest["settings"]["lora_r"],
        "base_parameters": manifest["settings"].get("base_parameters"),
        "peak_bytes": (
            torch.cuda.max_memory_allocated()
            if gpu
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        ),
        "rss_at_start_bytes": probe.rss_at_start,
        # what `finetune.memory` expects the step to add to what is loaded at the start
        "estimated_bytes_per_token": manifest["settings"]["memory"]["bytes_per_token"],
        "estimated_optimizer_bytes": manifest["settings"]["memory"]["optimizer_bytes"],
        "tokens_per_s": manifest["tokens_per_s"],
    }


def fit(rows: list[dict[str, Any]]) -> dict[str, float]:
    """peak = fixed + a * T + b * T^2 by least squares over the runs (T: the largest step)."""
    import numpy as np

    t = np.array([r["largest_step_tokens"] for r in rows], dtype=float)
    y = np.array([r["peak_bytes"] for r in rows], dtype=float)
    columns = [np.ones_like(t), t, t * t] if len(rows) >= 3 else [np.ones_like(t), t]
    coef, *_ = np.linalg.lstsq(np.stack(columns, axis=1), y, rcond=None)
    fixed, per_token = float(coef[0]), float(coef[1])
    squared = float(coef[2]) if len(coef) > 2 else 0.0
    worst = max(abs(fixed + per_token * x + squared * x * x - v) for x, v in zip(t, y, strict=True))
    return {
        "fixed_bytes": round(fixed),
        "bytes_per_token": round(per_token, 1),
        "bytes_per_token_squared": round(squared, 4),
        "largest_residual_bytes": round(worst),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="Clean dialogues, each within the smallest.")
    parser.add_argument("--batch-tokens", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--steps", type=int, default=2, help="Optimizer steps per batch size.")
    parser.add_argument("--base", default="default")
    parser.add_argument("--train-args", default="", help="More `rolecast train` flags.")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child: one batch size
    args = parser.parse_args()
    extra = args.train_args.split()
    if args.one:
        print(json.dumps(one(args.data, args.one, args.steps, args.base, extra)), flush=True)
        return
    rows = []
    for batch_tokens in args.batch_tokens:
        child = [
            sys.executable, __file__, "--data", args.data, "--one", str(batch_tokens),
            "--steps", str(args.steps), "--base", args.base, "--train-args", args.train_args,
        ]  # fmt: skip
        out = subprocess.run(child, capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"fit": fit(rows), "runs": len(rows)}), flush=True)


if __name__ == "__main__":
    main()
