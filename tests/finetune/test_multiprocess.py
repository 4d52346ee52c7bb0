"""Two training processes (torchrun, gloo on CPU) give the loss curve and the adapter of one
process on the same data: the step's loss is normalised by the labels of every process, and
DDP averages the LoRA gradients. The same code runs under `accelerate launch` on GPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.checkpoints import LOSS_LOG
from finetune.config import TrainConfig
from finetune.trainer import train
from tests.finetune.ft_helpers import dialogue, write_jsonl

SETTINGS = {
    "persona": "haruhi",
    "max_steps": 4,
    "batch_tokens": 512,
    "max_length": 512,
    "lora_r": 4,
    "lora_alpha": 8,
    "learning_rate": 1e-2,
}


def test_two_processes_train_like_one(tiny_gptoss_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", [dialogue(i, 1 + i % 2) for i in range(16)])
    one = tmp_path / "one"
    # one process takes two micro-batches per step; two processes take one each
    train(
        TrainConfig(
            data=str(data),
            base=str(tiny_gptoss_dir),
            output=str(one),
            grad_accum=2,
            progress=False,
            **SETTINGS,  # type: ignore[arg-type]
        )
    )
    two = tmp_path / "two"
    flags = [f"--{k}={v}" for k, v in SETTINGS.items()]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = ["-m", "rolecast", "train", "--json", f"--data={data}", f"--base={tiny_gptoss_dir}"]
    result = subprocess.run(
        [*launch, *command, f"--output={two}", "--grad_accum=1", *flags],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[-1]["manifest"]["settings"]["processes"] == 2  # one report, from rank 0
    steps = [e for e in events if e["type"] == "progress"]
    alone = [json.loads(line) for line in (one / LOSS_LOG).read_text().splitlines()]
    assert [e["step"] for e in steps] == [e["step"] for e in alone] == [1, 2, 3, 4]
    for a, b in zip(steps, alone, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
    weights_one = load_file(str(one / "adapter_model.safetensors"))
    weights_two = load_file(str(two / "adapter_model.safetensors"))
    assert weights_one.keys() == weights_two.keys()
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, rtol=1e-3, atol=1e-5)
