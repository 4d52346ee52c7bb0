"""What a run leaves in its output directory: checkpoints to resume from, the loss log, and at
the end the adapter with its manifest (`rolecast.json`, `formats.manifest`) and loss curve.

    <output>/checkpoints/step-<N>/   adapter weights, optimizer, scheduler, RNG states, state.json
    <output>/loss.jsonl              one line per optimizer step (and per validation)
    <output>/adapter_config.json, adapter_model.safetensors, tokenizer files, rolecast.json,
    <output>/loss.png                once the run is done

A checkpoint's `state.json` is written last, so a checkpoint with one is complete.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune.data import Dialogue
from finetune.errors import ConfigError
from formats import lora
from formats.manifest import MANIFEST

log = logging.getLogger(__name__)

LOSS_LOG = "loss.jsonl"
LOSS_PNG = "loss.png"
CHECKPOINTS = "checkpoints"


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    micro: int = 0  # micro-batches of `epoch` already consumed
    tokens: int = 0
    train_seconds: float = 0.0
    batch_tokens: int | None = None  # the micro-batch size, which a resumed run must keep


def checkpoint_dirs(output: Path) -> list[Path]:
    root = output / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.name.startswith("step-") and (p / "state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def checkpoint_batch_tokens(output: Path) -> int | None:
    """The micro-batch size of the run whose latest checkpoint is under `output` (None: no
    checkpoint, or one from before the size was recorded)."""
    checkpoints = checkpoint_dirs(output)
    if not checkpoints:
        return None
    state = json.loads((checkpoints[-1] / "state.json").read_text(encoding="utf-8"))
    value = state.get("batch_tokens")
    return int(value) if value else None


def refuse_to_overwrite(output: Path, resume: bool) -> None:
    """A half-done or finished run is not silently overwritten."""
    if output.exists() and any(output.iterdir()) and not resume:
        if (output / MANIFEST).exists() or checkpoint_dirs(output):
            raise ConfigError(
                f"{output} already holds a run; pass --resume to continue it or choose another --output"
            )


def save_checkpoint(
    output: Path, model: Any, optimizer: Any, scheduler: Any, state: TrainState, keep: int
) -> Path:
    path = output / CHECKPOINTS / f"step-{state.step}"
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    torch.save(scheduler.state_dict(), path / "scheduler.pt")
    rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, path / "rng.pt")
    (path / "state.json").write_text(json.dumps(state.__dict__), encoding="utf-8")
    for old in checkpoint_dirs(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any) -> TrainState:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng = torch.load(path / "rng.pt", weights_only=False)
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return TrainState(**json.loads((path / "state.json").read_text(encoding="utf-8")))


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines past `step` (written after the checkpoint we resume from)."""
    if not path.exists():
        return
    lines = [
        ln
        for ln in path.read_text(encoding="utf-8").splitlines()
        if ln.strip() and json.loads(ln)["step"] <= step
    ]
    path.write_text("".join(ln + "\n" for ln in lines), encoding="utf-8")


def save_adapter(output: Path, model: Any, allow_unservable: bool = False) -> None:
    """Write the trained adapter; refuse one no server could load, unless it was asked for
    (`--allow_unservable`: then say why). No tokenizer files: the tokenizer is the base
    model's, and vLLM would take files beside the adapter for a per-LoRA tokenizer
    (`formats.lora.TOKENIZER_FILES`)."""
    model.save_pretrained(output)
    problems = lora.problems(output)
    if problems and allow_unservable:
        log.warning("the adapter cannot be served: %s", "; ".join(problems))
    elif problems:
        raise ConfigError("the adapter cannot be served: " + "; ".join(problems))


def common_system_prompt(dialogues: Sequence[Dialogue]) -> str | None:
    """The persona's system prompt: the one most dialogues start with (for `rolecast compare`)."""
    counts = Counter(
        d.messages[0]["content"]
        for d in dialogues
        if d.messages and d.messages[0]["role"] == "system"
    )
    return counts.most_common(1)[0][0] if counts else None
