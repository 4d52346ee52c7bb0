"""One decode step of the embedded server's model, batch of one: the default model with the
shipped adapter through PEFT's per-row path (`adapter_names`, what every step used before) and
through the path `serving.adapters.Adapters.model` takes for a batch whose rows share one
adapter (that adapter active), and the base both ways. Interleaved, side by side in one process;
prints one JSON object.

    python benchmarks/adapter_step.py [--steps 40] [--rounds 5] [--threads 1] [--prompt 300]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from formats.basemodel import SHIPPED_DIR, SHIPPED_NAME, checkpoint
from serving.adapters import BASE_ADAPTER, Adapters


def step_ms(model: Any, extra: dict[str, Any], prompt: torch.Tensor, steps: int) -> float:
    """Median milliseconds of one decode step after a prefill of `prompt`."""
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True, **extra)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            out = model(input_ids=token, past_key_values=past, use_cache=True, **extra)
            times.append(time.perf_counter() - started)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="decode steps per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the server's)")
    parser.add_argument("--prompt", type=int, default=300, help="prompt tokens before decoding")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(checkpoint()), dtype=torch.float32).eval()
    adapters = Adapters(base, threading.Condition(), max_lora_rank=256)
    adapters.load(SHIPPED_NAME, str(SHIPPED_DIR))
    peft = adapters.model([SHIPPED_NAME])[0]
    prompt = torch.randint(
        0, base.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0)
    )

    variants = {
        "adapter_per_row_path": lambda: (peft, {"adapter_names": [SHIPPED_NAME]}),
        "adapter_uniform_path": lambda: adapters.model([SHIPPED_NAME]),
        "base_per_row_path": lambda: (peft, {"adapter_names": [BASE_ADAPTER]}),
        "base_uniform_path": lambda: adapters.model([None]),
    }
    results: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, pick in variants.items():
            adapters.model([SHIPPED_NAME, None])  # layers as for a mixed batch, every variant
            model, extra = pick()
            results[name].append(round(step_ms(model, extra, prompt, args.steps), 3))
    medians = {name: statistics.median(ms) for name, ms in results.items()}
    print(json.dumps({
        "model": "SmolLM2-135M-Instruct", "adapter": SHIPPED_NAME, "batch": 1,
        "prompt_tokens": args.prompt, "threads": args.threads, "rounds_ms": results,
        "median_ms": medians,
        "adapter_uniform_vs_per_row": round(medians["adapter_uniform_path"] / medians["adapter_per_row_path"], 3),
        "base_uniform_vs_per_row": round(medians["base_uniform_path"] / medians["base_per_row_path"], 3),
        "torch": torch.__version__, "python": platform.python_version(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
