"""Consensus (MBR) selections tried on kept samples: how many, at which temperature, from how
many adapters.

`rolecast eval --samples N` keeps every sampled reply beside the chosen one (`adapter_samples`
in its predictions). Given such predictions of several adapters on one split (seeds of one
setting, as `train_quality.py --seeds ... --decodings mbr64 mbr64-t1` makes them), this scores,
for each decoding alone and for all of them together, and for each k in `--k`:

- `one`: each adapter's consensus of its own first k samples per decoding (the mean over
  adapters, and the lowest and highest);
- `pool`: the consensus of the first k samples of every adapter together, i.e. MBR over an
  ensemble of the adapters, as if they were served side by side.

Nothing is generated: a selection is made from the kept samples and scored with the metrics of
`rolecast eval`. Prints one JSON object per row. `--output FILE` also writes the pooled selection
of all the decodings at the largest k as a predictions file, for `rolecast eval --predictions`
and `paired_bootstrap.py`.

    python benchmarks/mbr_selection.py --runs runs/quality/select/rs256-lr5e-4-e4-mix{,-s43,-s44,-s45} \\
        --decodings mbr64 mbr64-t1
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finetune.evaluate import SAMPLES_SUFFIX, TUNED, choose, read_predictions, write_predictions
from finetune.metrics import score_corpus

SAMPLES = TUNED + SAMPLES_SUFFIX


def load(runs: Sequence[Path], decodings: Sequence[str]) -> tuple[list[dict], dict]:
    """The dialogues (id, prompt, reference), and each (run, decoding)'s samples per dialogue,
    checked to be aligned."""
    samples: dict[tuple[Path, str], list[list[str]]] = {}
    dialogues: list[dict] | None = None
    for run in runs:
        for decoding in decodings:
            records = read_predictions(run / f"eval-{decoding}" / "predictions.jsonl")
            if dialogues is None:
                dialogues = [{k: r[k] for k in ("id", "prompt", "reference")} for r in records]
            elif [r["id"] for r in records] != [d["id"] for d in dialogues]:
                raise SystemExit(f"{run} eval-{decoding}: not the same dialogues as the others")
            if any(SAMPLES not in r for r in records):
                raise SystemExit(f"{run} eval-{decoding}: no kept samples (made before they were)")
            samples[run, decoding] = [r[SAMPLES] for r in records]
    assert dialogues is not None
    return dialogues, samples


def selection(pools: Sequence[Sequence[list[str]]], k: int) -> list[str]:
    """Per dialogue, the consensus of the first k samples of each of `pools` together."""
    per_dialogue = zip(*pools, strict=True)
    return [choose([s for pool in samples for s in pool[:k]]) for samples in per_dialogue]


def scores(predictions: list[str], references: list[str]) -> dict[str, Any]:
    return {m: round(v, 2) for m, v in score_corpus(predictions, references).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True)
    parser.add_argument("--decodings", nargs="+", default=["mbr64", "mbr64-t1"])
    parser.add_argument("--k", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument(
        "--output", type=Path, help="Write the pooled selection (all decodings, largest k) here."
    )
    args = parser.parse_args()

    dialogues, samples = load(args.runs, args.decodings)
    references = [d["reference"] for d in dialogues]
    groups = [[d] for d in args.decodings]
    if len(args.decodings) > 1:
        groups.append(list(args.decodings))
    for decodings in groups:
        for k in args.k:
            row = {"decodings": decodings, "k_per_decoding": k}
            one = [
                scores(selection([samples[run, d] for d in decodings], k), references)
                for run in args.runs
            ]
            for metric in ("bleu-4", "rouge-l"):
                values = [s[metric] for s in one]
                row[f"one {metric}"] = {
                    "mean": round(sum(values) / len(values), 2),
                    "min": min(values),
                    "max": max(values),
                }
            pooled = selection([samples[run, d] for run in args.runs for d in decodings], k)
            row["pool"] = {"adapters": len(args.runs), **scores(pooled, references)}
            print(json.dumps(row, ensure_ascii=False), flush=True)
            if decodings == groups[-1] and k == max(args.k):  # all decodings, largest k
                chosen = pooled
    if args.output:
        write_predictions([{**d, TUNED: c} for d, c in zip(dialogues, chosen, strict=True)],
                          args.output)  # fmt: skip
        print(f"{len(chosen)} pooled predictions written to {args.output}", flush=True)


if __name__ == "__main__":
    main()
