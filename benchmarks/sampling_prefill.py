"""Sampled evaluation replies with one prefill per prompt against one per sample, side by side.

`rolecast eval --samples N` draws N replies per dialogue. `generate(num_return_sequences=N)`
alone copies each prompt N times and prefills every copy; `finetune.evaluate.shared_prefill`
prefills each prompt once and copies its cache. This times both on the same prompts (the last
user turns of a persona's dialogues, on the default model unless `--base`), alternating the
two for `--rounds` rounds, checks that they give the same replies, and prints one JSON object.

    python benchmarks/sampling_prefill.py --data ../shared/data/roleplay/haruhi.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from finetune import models
from finetune.evaluate import (
    GenerationSettings,
    candidates,
    eval_items,
    load_for_eval,
    read_eval_dialogues,
)
from finetune.template import prompt_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "shared/data/roleplay/haruhi.jsonl",
    )
    parser.add_argument("--base", default=models.DEFAULT_BASE)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    items = eval_items(read_eval_dialogues(args.data))[: args.prompts]
    contexts = [it.context for it in items]
    model, tokenizer = load_for_eval(args.base, None)
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        batch_size=args.prompts,
        samples=args.samples,
        temperature=0.7,
        top_p=0.95,
    )
    seconds: dict[str, list[float]] = {"shared": [], "per_sample": []}
    replies = {}
    for _ in range(args.rounds):
        for name, share in (("shared", True), ("per_sample", False)):
            start = time.perf_counter()
            replies[name] = candidates(model, tokenizer, contexts, settings, share_prefill=share)
            seconds[name].append(time.perf_counter() - start)
    shared, per_sample = (statistics.median(seconds[k]) for k in ("shared", "per_sample"))
    print(
        json.dumps(
            {
                "base": args.base,
                "device": str(next(model.parameters()).device),
                "prompts": args.prompts,
                "prompt_tokens_mean": round(
                    statistics.mean(len(prompt_ids(tokenizer, c)) for c in contexts)
                ),
                "samples": args.samples,
                "max_new_tokens": args.max_new_tokens,
                "rounds": args.rounds,
                "seconds_median": {"shared": round(shared, 2), "per_sample": round(per_sample, 2)},
                "speedup": round(per_sample / shared, 2),
                "same_replies": replies["shared"] == replies["per_sample"],
            }
        )
    )


if __name__ == "__main__":
    main()
