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


def rouge_l_matrix(hypotheses: Sequence[str], references: Sequence[str] | None = None) -> Any:
    """ROUGE-L F1 (0-1) of every hypothesis against every reference (by default against every
    hypothesis, segmented once), as a numpy array.

    The same figure as `rouge` (rouge-chinese's LCS F1 with its 1e-8 guard, on jieba tokens),
    computed with rapidfuzz's compiled LCS so that hundreds of candidates are cheap.
    """
    import numpy as np
    from rapidfuzz.distance import LCSseq
    from rapidfuzz.process import cdist

    hyp = [_segmented(h).split() for h in hypotheses]
    ref = hyp if references is None else [_segmented(r).split() for r in references]
    lcs = cdist(hyp, ref, scorer=LCSseq.similarity, dtype=np.int32).astype(np.float64)
    hyp_len = np.array([len(t) for t in hyp], dtype=np.float64)[:, None]
    ref_len = np.array([len(t) for t in ref], dtype=np.float64)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        precision, recall = lcs / hyp_len, lcs / ref_len
        f1 = 2.0 * precision * recall / (precision + recall + 1e-8)
    return np.nan_to_num(f1)  # an empty side scores 0, as in `rouge`


def consensus(candidates: Sequence[str]) -> int:
    """Index of the candidate with the highest mean ROUGE-L F1 against the other candidates.

    This is minimum-Bayes-risk selection with ROUGE-L as the utility: among sampled replies,
    the one most like the rest is the model's most typical answer, and the expected score of
    a reply is what MBR maximises. Ties go to the earliest candidate; an empty candidate agrees
    with nothing.
    """
    import numpy as np

    f1 = rouge_l_matrix(candidates)
    np.fill_diagonal(f1, 0.0)
    return int(np.argmax(f1.sum(axis=1)))  # argmax takes the first of equal totals


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
