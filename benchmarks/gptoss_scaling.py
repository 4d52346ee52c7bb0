"""`rolecast train` on one GPU and on several (DDP through `accelerate launch`): tokens/s,
scaling efficiency and the loss curves, on the same data and the same optimizer steps. Prints
one JSON object per line.

Both runs take the same packed micro-batches in each optimizer step: one process takes
`--grad-accum` x N of them in turn, N processes take `--grad-accum` each at once, and every
step's loss is normalised by the labels of all of them, so the loss curves agree up to
floating-point order. Tokens/s counts the dialogue tokens of those steps (the one-process
run's count, exact) over each run's training time (`train_time_s`, model loading excluded).

    python benchmarks/gptoss_scaling.py --base /tmp/gpt-oss-20b --data /tmp/haruhi.jsonl
    python benchmarks/gptoss_scaling.py --base TINY_DIR --data data/xin.jsonl --launcher torchrun \\
        --steps 3 --batch-tokens 1024 --max-length 512      # smoke test on a CPU (gloo)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def emit(**record: Any) -> None:
    print(json.dumps(record), flush=True)


def train(args: argparse.Namespace, output: Path, processes: int) -> dict[str, Any]:
    flags = [
        "--json", "--data", args.data, "--persona", "bench", "--base", args.base,
        "--output", str(output), "--max_steps", str(args.steps),
        "--grad_accum", str(args.grad_accum * (args.processes // processes)),
        "--batch_tokens", str(args.batch_tokens), "--max_length", str(args.max_length),
        "--lora_r", str(args.rank), "--lora_alpha", str(2 * args.rank),
        "--learning_rate", str(args.learning_rate), "--warmup_ratio", "0",
    ]  # fmt: skip
    if processes == 1:
        launch = [sys.executable, "-m", "rolecast", "train"]
    elif args.launcher == "accelerate":
        launch = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "bf16", "--dynamo_backend", "no", "-m", "rolecast", "train",
        ]  # fmt: skip
    else:
        launch = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={processes}", "-m", "rolecast", "train",
        ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    started = time.monotonic()
    result = subprocess.run([*launch, *flags], capture_output=True, text=True, env=env, check=False)
    wall = time.monotonic() - started
    events = []
    for line in result.stdout.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    if result.returncode != 0 or not events or events[-1].get("type") != "result":
        return {"error": result.stderr[-2000:], "returncode": result.returncode}
    manifest = events[-1]["manifest"]
    progress = [e for e in events if e["type"] == "progress"]
    return {
        "processes": manifest["settings"]["processes"],
        "steps": manifest["metrics"]["steps"],
        "train_time_s": manifest["train_time_s"],
        "wall_s": round(wall, 1),
        "losses": [e["loss"] for e in progress],
        "tokens": progress[-1]["tokens"] if progress else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--launcher", choices=["accelerate", "torchrun"], default="accelerate")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--grad-accum", type=int, default=1, help="per process, in the N run")
    # 8,192: an H200 does not hold 16,384 packed tokens of gpt-oss-20b without checkpointing
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="gptoss-scaling-"))
    one = train(args, work / "one", 1)
    emit(run="1 process", **{k: v for k, v in one.items() if k != "losses"})
    many = train(args, work / "many", args.processes)
    emit(run=f"{args.processes} processes", **{k: v for k, v in many.items() if k != "losses"})
    if "error" in one or "error" in many:
        return
    tps_one = one["tokens"] / one["train_time_s"]
    tps_many = one["tokens"] / many["train_time_s"]  # the same micro-batches
    diffs = [
        abs(a - b) / max(abs(b), 1e-12) for a, b in zip(many["losses"], one["losses"], strict=False)
    ]
    emit(
        summary="scaling",
        tokens_per_s_1=round(tps_one, 1),
        tokens_per_s_n=round(tps_many, 1),
        speedup=round(tps_many / tps_one, 3),
        scaling_efficiency=round(tps_many / tps_one / args.processes, 3),
        loss_max_rel_diff=round(max(diffs), 6) if diffs else None,
        losses_1=one["losses"],
        losses_n=many["losses"],
    )


if __name__ == "__main__":
    main()
