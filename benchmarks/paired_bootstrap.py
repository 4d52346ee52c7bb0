"""Paired bootstrap of two sets of replies to the same dialogues: is A's BLEU-4 / ROUGE-L higher?

Each side is a predictions file of `rolecast eval` and a column in it (`adapter`, `base`,
`baseline`), or, for B, one constant reply (`--constant TEXT`, e.g. a persona's typical reply).
Per dialogue the metrics of `rolecast eval` are computed for both; the mean difference A - B is
resampled over dialogues. Prints one JSON object: the mean difference and its 95% interval.

    python benchmarks/paired_bootstrap.py runs/final/haruhi/eval-mbr16/predictions.jsonl \\
        --against runs/final/haruhi/eval-rp1.0/predictions.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from finetune.evaluate import TUNED, read_predictions
from finetune.metrics import score_pair

METRICS = ("bleu-4", "rouge-l")


def per_dialogue(replies: list[str], references: list[str]) -> dict[str, list[float]]:
    scores = [score_pair(p, r) for p, r in zip(replies, references, strict=True)]
    return {m: [s[m] for s in scores] for m in METRICS}


def interval(diffs: list[float], rounds: int, rng: random.Random) -> dict[str, float]:
    n = len(diffs)
    means = sorted(sum(rng.choices(diffs, k=n)) / n for _ in range(rounds))
    return {
        "mean": round(sum(diffs) / n, 2),
        "low": round(means[int(0.025 * rounds)], 2),
        "high": round(means[int(0.975 * rounds) - 1], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("predictions", type=Path, help="A: a predictions.jsonl")
    parser.add_argument("--column", default=TUNED, help="A's column.")
    against = parser.add_mutually_exclusive_group(required=True)
    against.add_argument("--against", type=Path, help="B: a predictions.jsonl of the same ids.")
    against.add_argument("--constant", help="B: this reply to every dialogue.")
    parser.add_argument("--against-column", default=TUNED, help="B's column.")
    parser.add_argument("--rounds", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    a = read_predictions(args.predictions)
    references = [r["reference"] for r in a]
    if args.against is not None:
        b = read_predictions(args.against)
        if [r["id"] for r in b] != [r["id"] for r in a]:
            raise SystemExit("the two predictions files do not hold the same dialogues")
        b_replies = [r[args.against_column] for r in b]
    else:
        b_replies = [args.constant] * len(a)
    score_a = per_dialogue([r[args.column] for r in a], references)
    score_b = per_dialogue(b_replies, references)
    rng = random.Random(args.seed)
    result = {"dialogues": len(a)}
    for m in METRICS:
        diffs = [x - y for x, y in zip(score_a[m], score_b[m], strict=True)]
        result[m] = interval(diffs, args.rounds, rng)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
