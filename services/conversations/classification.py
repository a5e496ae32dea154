"""How a business message relates to the suggestion shown before it."""

from __future__ import annotations

from services.conversations.models import Relation
from workers.learning.preferences import word_similarity


def normalise_whitespace(text: str) -> str:
    return " ".join(text.split())


def edit_similarity(suggested: str, sent: str) -> float:
    """Word-level similarity in [0, 1] (difflib ratio over lower-cased word/punctuation tokens)."""
    return word_similarity(suggested, sent)


def classify_reply(
    suggested: str | None, sent: str, *, threshold: float
) -> tuple[Relation, float | None]:
    """Classify `sent` against `suggested` (None: the policy abstained)."""
    if suggested is None:
        return Relation.ABSTAINED, None
    if normalise_whitespace(suggested) == normalise_whitespace(sent):
        return Relation.ACCEPTED, 1.0
    similarity = edit_similarity(suggested, sent)
    relation = Relation.EDITED if similarity >= threshold else Relation.REJECTED
    return relation, round(similarity, 6)
