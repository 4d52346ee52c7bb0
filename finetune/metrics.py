"""BLEU-4 and ROUGE-1/2/L computed the way LLaMA-Factory's predict step computes them.

Per prediction/reference pair:

- BLEU-4: nltk's `sentence_bleu` over *characters* (the reference as one list of characters),
  smoothing method3;
- ROUGE-1/2/L: F1 from rouge-chinese on *jieba* tokens joined by spaces; a pair where either
  side has no token scores 0;

each score times 100 and rounded to 4 places, then averaged over pairs. Numbers computed
this way sit beside the tables LLaMA-Factory users publish.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

log = logging.getLogger(__name__)

METRICS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")


@lru_cache(maxsize=1)
def _jieba() -> Any:
    import jieba

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    return jieba


def _segmented(text: str) -> str:
    """`text` as jieba tokens joined by spaces: the form rouge-chinese scores."""
    return " ".join(_jieba().cut(text))


def bleu4(prediction: str, reference: str) -> float:
    """Character BLEU-4 with smoothing method3, x100."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    score = sentence_bleu(
        [list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3
    )
    return round(float(score) * 100, 4)


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F1 on jieba tokens, x100."""
    from rouge_chinese import Rouge

    hypothesis, ref = _segmented(prediction), _segmented(reference)
    if not hypothesis.split() or not ref.split():
        return {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    scores = Rouge().get_scores(hypothesis, ref)[0]
    return {k: round(float(scores[k]["f"]) * 100, 4) for k in ("rouge-1", "rouge-2", "rouge-l")}


def consensus(candidates: Sequence[str]) -> int:
    """Index of the candidate with the highest mean ROUGE-L F1 against the other candidates.

    This is minimum-Bayes-risk selection with ROUGE-L as the utility: among sampled replies,
    the one most like the rest is the model's most typical answer, and the expected score of
    a reply is what MBR maximises. F1 is symmetric, so each pair is scored once; ties go to
    the earliest candidate. An empty candidate agrees with nothing.
    """
    from rouge_chinese import Rouge

    tokens = [_segmented(c) for c in candidates]
    totals = [0.0] * len(candidates)
    scorer = Rouge(metrics=["rouge-l"])
    for i in range(len(candidates)):
        for j in range(i + 1, len(candidates)):
            if not tokens[i].split() or not tokens[j].split():
                continue
            f = float(scorer.get_scores(tokens[i], tokens[j])[0]["rouge-l"]["f"])
            totals[i] += f
            totals[j] += f
    return max(range(len(candidates)), key=lambda i: (totals[i], -i))


def score_pair(prediction: str, reference: str) -> dict[str, float]:
    return {"bleu-4": bleu4(prediction, reference), **rouge(prediction, reference)}


def score_corpus(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean of the per-pair scores."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {m: 0.0 for m in METRICS}
    totals = {m: 0.0 for m in METRICS}
    for p, r in zip(predictions, references, strict=True):
        for k, v in score_pair(p, r).items():
            totals[k] += v
    return {m: totals[m] / len(predictions) for m in METRICS}
