"""The embedded server's forward pass over one adapter, the base, or a mix of them: a batch whose
rows all use one adapter runs with that adapter active (or the LoRA layers off), a mixed batch
through PEFT's per-row path, and every switch between them gives what each row alone gives."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from serving.adapters import Adapters
from tests.adapters import make_adapter

IDS = torch.tensor([[1, 17, 256, 9, 1024, 33, 7, 400]])


@pytest.fixture(scope="module")
def two_adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("layer-adapters")
    return [make_adapter(tiny_model_dir, root / name, seed) for name, seed in (("a", 1), ("b", 2))]


def logits(adapters: Adapters, rows: list[str | None]) -> list[torch.Tensor]:
    model, extra = adapters.model(rows)
    with torch.no_grad():
        out: Any = model(input_ids=IDS.repeat(len(rows), 1), **extra)
    return list(out.logits)


def test_every_switch_gives_what_each_row_gives_alone(
    tiny_model_dir: Path, two_adapters: list[Path]
) -> None:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    adapters = Adapters(base, threading.Condition(), max_lora_rank=64)
    (plain,) = logits(adapters, [None])  # no PEFT yet: the base model itself
    for name, path in zip("ab", two_adapters, strict=True):
        adapters.load(name, str(path))

    # each row alone, through PEFT's per-row path (a batch of two different rows)
    mixed_a, mixed_base = logits(adapters, ["a", None])
    mixed_b, _ = logits(adapters, ["b", None])
    expected = {"a": mixed_a, "b": mixed_b, None: plain}
    torch.testing.assert_close(mixed_base, plain)
    assert not torch.allclose(mixed_a, plain, atol=1e-3)  # the adapters change the output
    assert not torch.allclose(mixed_a, mixed_b, atol=1e-3)

    # uniform batches, and back and forth between them and mixed ones
    sequence: list[list[str | None]] = [
        ["a"], [None, None], ["b", "b"], ["a", "b", None], [None], ["b"], ["a"], ["a", None],
        ["a", "a"],
    ]  # fmt: skip
    for rows in sequence:
        for row, got in zip(rows, logits(adapters, rows), strict=True):
            torch.testing.assert_close(got, expected[row], msg=lambda m, r=rows: f"{r}: {m}")

    # a removed adapter leaves the others as they were, uniform or mixed
    adapters.retire("b")
    adapters.finish_drained()
    for rows in ([None], ["a"], ["a", None], [None]):
        for row, got in zip(rows, logits(adapters, rows), strict=True):
            torch.testing.assert_close(got, expected[row], msg=lambda m, r=rows: f"{r}: {m}")

    # a newly loaded adapter after the layers were set for the base
    adapters.load("b", str(two_adapters[1]))
    for rows in ([None], ["b"], ["a", "b"], ["b"]):
        for row, got in zip(rows, logits(adapters, rows), strict=True):
            torch.testing.assert_close(got, expected[row], msg=lambda m, r=rows: f"{r}: {m}")
