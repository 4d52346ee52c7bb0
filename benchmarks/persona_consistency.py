"""Persona consistency of the replies `shipped_adapter.py` generated, beside BLEU-4 / ROUGE-L.

    python benchmarks/persona_consistency.py --work runs/shipped

The classifier (`finetune.consistency`) learns from the three personas' training portions
(`<work>/<persona>.clean_train.jsonl`: each persona's replies, and the other speakers' turns) and scores every predictions file under `<work>`: the
base model's and `rolecast train`'s defaults' replies (`defaults/<persona>/eval-greedy`), the
shipped adapter's under each decoding (`final/<run>/eval-<persona>-<decoding>`), and, as the
ceiling, the held-out reference replies themselves. Prints one JSON object per line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.consistency import PersonaClassifier, turns
from finetune.data import load_dialogues
from finetune.evaluate import read_predictions, score_records

PERSONAS = ("haruhi", "atri", "xin")


def classifier_for(work: Path) -> PersonaClassifier:
    """The classifier of the personas' training portions under `work`: each persona's replies,
    and the other speakers' turns as one more class."""
    dialogues = {
        p: [d.messages for d in load_dialogues(work / f"{p}.clean_train.jsonl")] for p in PERSONAS
    }
    return PersonaClassifier().fit(
        {p: turns(dialogues[p], "assistant") for p in PERSONAS},
        others=[t for p in PERSONAS for t in turns(dialogues[p], "user")],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/shipped"))
    args = parser.parse_args()
    work: Path = args.work

    classifier = classifier_for(work)

    def row(
        persona: str, model: str, decoding: str, records: list[dict], column: str, run: str = ""
    ) -> None:
        replies = [r[column] for r in records]
        scores = score_records(
            [{"reference": r["reference"], "adapter": r[column]} for r in records]
        )
        print(
            json.dumps(
                {
                    "persona": persona,
                    "model": model,
                    "run": run,
                    "decoding": decoding,
                    **classifier.score(persona, replies).to_json(),
                    "bleu-4": scores["adapter"]["bleu-4"],
                    "rouge-l": scores["adapter"]["rouge-l"],
                }
            ),
            flush=True,
        )

    for persona in PERSONAS:
        defaults = read_predictions(
            work / "defaults" / persona / "eval-greedy" / "predictions.jsonl"
        )
        row(persona, "references", "-", defaults, "reference")
        row(persona, "base", "greedy", defaults, "base")
        row(persona, "defaults", "greedy", defaults, "adapter")
        for path in sorted(work.glob(f"final/*/eval-{persona}-*/predictions.jsonl")):
            decoding = path.parent.name.removeprefix(f"eval-{persona}-")
            run = path.parent.parent.name
            row(persona, "shipped", decoding, read_predictions(path), "adapter", run)


if __name__ == "__main__":
    main()
