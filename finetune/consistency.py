"""Persona consistency: how often a generated reply is recognised as its own persona's.

BLEU and ROUGE reward overlap with one reference reply; on short role-play replies a persona's
stock phrases score well without answering the dialogue, and a reply in the right voice that
says something else scores badly. This measure asks another question: does the reply sound like
the persona? A linear classifier (logistic regression on TF-IDF character 1-3-grams, which
suits Chinese and needs no segmenter) is trained on the personas' own training replies and on
the other speakers' turns of the same dialogues (the user, other characters, a narrator) as one
more class, so that a reply that echoes or continues the user's side is not credited to the
persona; a generated reply counts as recognised when the classifier gives its own persona more
than half the probability. The model has no intercept: a reply made of n-grams it never saw (another language,
template debris, noise) gets the same probability for every persona, 1/K, and so is never
recognised, rather than being given to the persona with the most training replies.

Two figures per set of replies: `recognised` (the share, 0-100, recognised as their own
persona) and `own_probability` (the classifier's mean probability of the own persona, 0-100),
which also moves below the threshold. The classifier needs at least two classes: two personas, or
one persona and the other speakers' turns, which is what one persona's dialogues give.

`rolecast eval --persona P --consistency-data FILE [--consistency-data OTHER=FILE ...]` learns
from dialogue files (`learn_from_files`) and reports both figures beside BLEU and ROUGE; the
retrain loop's gate gives it the persona's training split and the other personas' replayed
dialogues.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import DataError

OTHER = "(other speakers)"  # the class of the turns no persona spoke
RECOGNISED = 0.5  # a reply is recognised when its own persona has more probability than this


@dataclass(frozen=True)
class Consistency:
    persona: str
    replies: int
    recognised: float  # percent of replies whose `persona` probability is > RECOGNISED
    own_probability: float  # mean probability of `persona`, percent

    def to_json(self) -> dict[str, Any]:
        return {
            "persona": self.persona,
            "replies": self.replies,
            "recognised": round(self.recognised, 2),
            "own_probability": round(self.own_probability, 2),
        }


class PersonaClassifier:
    """Which persona a reply sounds like, learnt from the personas' training replies."""

    def __init__(self, ngrams: tuple[int, int] = (1, 3), max_features: int = 200_000) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        self.pipeline = make_pipeline(
            TfidfVectorizer(
                analyzer="char", ngram_range=ngrams, sublinear_tf=True, max_features=max_features
            ),
            LogisticRegression(max_iter=2000, class_weight="balanced", fit_intercept=False),
        )
        self.personas: list[str] = []

    def fit(
        self, replies: Mapping[str, Sequence[str]], others: Sequence[str] = ()
    ) -> PersonaClassifier:
        """Learn from each persona's replies (persona -> texts) and the other speakers' turns;
        empty texts are skipped."""
        texts, labels = [], []
        for persona, items in {**replies, OTHER: others}.items():
            kept = [t for t in items if t.strip()]
            texts += kept
            labels += [persona] * len(kept)
        found = sorted(set(labels))
        if len(found) < 2:
            raise DataError(
                "persona consistency needs two kinds of text to learn from (two personas' replies, "
                f"or one persona's replies and the other speakers' turns); got {found or 'none'}"
            )
        self.pipeline.fit(texts, labels)
        self.personas = [str(c) for c in self.pipeline.classes_]
        return self

    def probabilities(self, texts: Sequence[str]) -> list[dict[str, float]]:
        """Each text's probability per persona."""
        if not self.personas:
            raise DataError("the persona classifier has not been trained")
        rows = self.pipeline.predict_proba(list(texts))
        return [dict(zip(self.personas, map(float, row), strict=True)) for row in rows]

    def score(self, persona: str, texts: Sequence[str]) -> Consistency:
        """How consistently `texts` (one persona's generated replies) sound like `persona`."""
        if persona not in self.personas or persona == OTHER:
            raise DataError(f"the classifier knows {self.personas}, not {persona!r}")
        if not texts:
            return Consistency(persona, 0, 0.0, 0.0)
        probabilities = self.probabilities(texts)
        recognised = sum(p[persona] > RECOGNISED for p in probabilities)
        own = sum(p[persona] for p in probabilities)
        return Consistency(
            persona, len(texts), 100 * recognised / len(texts), 100 * own / len(texts)
        )


def turns(messages_of: Sequence[Sequence[Mapping[str, str]]], role: str) -> list[str]:
    """Every turn of `role` ("assistant": the persona's replies, "user": the other speakers')
    in the given dialogues (lists of {role, content} messages)."""
    return [m["content"] for messages in messages_of for m in messages if m["role"] == role]


@dataclass(frozen=True)
class Learnt:
    """A classifier learnt from dialogue files, and what it learnt from."""

    classifier: PersonaClassifier
    replies: dict[str, int]  # persona (and OTHER) -> texts learnt from

    def to_json(self) -> dict[str, Any]:
        return {"classes": sorted(self.replies), "learnt_from": self.replies}


def learn_from_files(files: Mapping[str, Sequence[str | Path]]) -> Learnt:
    """A classifier of each persona's replies in its dialogue files (ShareGPT or OpenAI JSONL;
    rows that cannot be read are skipped) and of every file's user turns as the other speakers.
    """
    from finetune.data import read_rows

    replies: dict[str, list[str]] = {}
    others: list[str] = []
    for persona, paths in files.items():
        if persona == OTHER:
            raise DataError(f"{OTHER!r} is the other speakers' class, not a persona")
        dialogues = [
            row.messages for path in paths for row in read_rows(path) if row.messages is not None
        ]
        replies.setdefault(persona, []).extend(turns(dialogues, "assistant"))
        others += turns(dialogues, "user")
    classifier = PersonaClassifier().fit(replies, others=others)
    counts = {
        p: sum(1 for t in texts if t.strip()) for p, texts in {**replies, OTHER: others}.items()
    }
    return Learnt(classifier, counts)
