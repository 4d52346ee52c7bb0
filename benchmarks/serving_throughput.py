"""Embedded server throughput: N adapters x C concurrent streaming requests (mixed-adapter
batches) against the same requests one at a time. Prints one JSON line per mode, then one with
the speed-up.

    python benchmarks/serving_throughput.py                      # default model, CPU or GPU
    python benchmarks/serving_throughput.py --random-weights DIR # a model dir's shape, random

`--random-weights` builds a model from DIR's config.json with random weights (and DIR's
tokenizer); generation speed depends on the shape, not on the values. With random weights the
replies never stop early, and with `ignore_eos` no reply does, so both modes generate exactly
`--max-tokens` per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import openai

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bot.core.sidecar import EmbeddedServer  # noqa: E402

PROMPTS = [
    "Tell me about your day in three sentences.",
    "What is your favourite book and why?",
    "Describe the city you live in.",
    "Give me advice for a rainy afternoon.",
]


def build_model(args: argparse.Namespace, work: Path) -> tuple[str, str]:
    """The model directory to serve and the device it will run on."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    if args.random_weights:
        config = AutoConfig.from_pretrained(args.random_weights)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        tokenizer = AutoTokenizer.from_pretrained(args.random_weights)
        out = work / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        return str(out), device
    from serving.models import resolve_model_path

    return resolve_model_path(args.model), device


def build_adapters(model_dir: str, count: int, rank: int, work: Path) -> list[Path]:
    """`count` LoRA adapters (attention and MLP projections) with random weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    for i in range(count):
        torch.manual_seed(100 + i)
        lora = LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"],
            init_lora_weights=False,
        )
        peft_model = get_peft_model(base, lora)
        path = work / f"adapter{i}"
        peft_model.save_pretrained(path)
        base = peft_model.unload()
        paths.append(path)
    return paths


async def run_mode(
    server: EmbeddedServer, names: list[str], requests: int, concurrency: int, max_tokens: int
) -> dict[str, Any]:
    semaphore = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    tokens = 0

    async with openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0) as c:

        async def one(i: int) -> None:
            nonlocal tokens
            async with semaphore:
                started = time.perf_counter()
                stream = await c.chat.completions.create(
                    model=names[i % len(names)],
                    messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    max_tokens=max_tokens,
                    temperature=0.8,
                    seed=i,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True},
                )
                first = None
                async for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter() - started
                    if chunk.usage:
                        tokens += chunk.usage.completion_tokens
                ttfts.append(first if first is not None else time.perf_counter() - started)
                print(f"{len(ttfts)}/{requests} done", file=sys.stderr, flush=True)

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.perf_counter() - started
    ttfts.sort()
    return {
        "requests": requests,
        "concurrency": concurrency,
        "output_tokens": tokens,
        "wall_s": round(wall, 3),
        "output_tokens_per_s": round(tokens / wall, 2),
        "ttft_p50_s": round(statistics.median(ttfts), 4),
        "ttft_p95_s": round(ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], 4),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--random-weights", help="model dir whose config/tokenizer to use")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32, help="mixed mode")
    parser.add_argument("--sequential-requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--server-log", type=Path, help="keep the server's log here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="rolecast-bench-") as tmp:
        work = Path(tmp)
        model_dir, device = build_model(args, work)
        adapters = build_adapters(model_dir, args.adapters, args.rank, work)
        names = [f"persona{i}@v1" for i in range(len(adapters))]
        serve_args = ["--model", model_dir, "--device", device, "--served-model-name", "base"]
        serve_args += ["--max-num-seqs", str(args.concurrency), "--max-model-len", "2048"]
        for name, path in zip(names, adapters, strict=True):
            serve_args += ["--lora-modules", f"{name}={path}"]
        log_path = args.server_log or work / "server.log"
        server = EmbeddedServer(serve_args=serve_args, log_path=log_path)
        async with server:
            common = {
                "model": "random:" + args.random_weights if args.random_weights else args.model,
                "device": device,
                "adapters": len(adapters),
                "rank": args.rank,
                "max_tokens": args.max_tokens,
            }
            await run_mode(server, names, 4, 4, 8)  # warm-up: first-call costs out of the way
            mixed = await run_mode(server, names, args.requests, args.concurrency, args.max_tokens)
            print(json.dumps({"mode": "mixed_batch", **common, **mixed}), flush=True)
            single = await run_mode(server, names, args.sequential_requests, 1, args.max_tokens)
            print(json.dumps({"mode": "one_at_a_time", **common, **single}), flush=True)
            speedup = mixed["output_tokens_per_s"] / single["output_tokens_per_s"]
            print(json.dumps({"mode": "speedup", **common, "throughput_x": round(speedup, 2)}))


if __name__ == "__main__":
    asyncio.run(main())
