"""The lexical Q: TF-IDF blocks of the conversation and of the reply, and a weighted ridge.

No language model. A decision is read as four bags of word 1-2 grams (sklearn's
TfidfVectorizer, its default words of two or more characters, sublinear tf), each with its own
vocabulary and idf and l2-normalised on its own: the customer's turns of the state, the
business's turns of the state, the customer's latest turn, and the candidate reply. Keeping
the reply a block of its own means a long state cannot dilute it, and the customer's words
(what a persuadee or a buyer says they will do) are not mixed with the business's.
Q(s, a) is a ridge on all four blocks, V(s) a ridge on the three state blocks alone, so V
cannot see the reply. Both penalties come from cross-validation grouped by conversation
(workers/learning/ridge.py, its sparse path). The system prompt is not read: it is the same
for every decision of a business.

Saved without pickle: `lexical.json` (each block's n-grams in column order) and
`lexical.safetensors` (each block's idf weights, Q's coefficients and intercept).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import sparse  # type: ignore[import-untyped]

from workers.learning.chat import Turn
from workers.learning.ridge import fit_ridge, normalised_weights

Array = NDArray[np.float64]
ScoreItem = tuple[str | None, Sequence[Turn], str]  # (system, state, candidate reply)

BLOCKS = ("customer", "business", "latest_customer", "reply")
STATE_BLOCKS = BLOCKS[:3]  # V's: everything but the reply
VOCABULARY_FILE = "lexical.json"
WEIGHTS_FILE = "lexical.safetensors"


def block_texts(state: Sequence[Turn], reply: str) -> dict[str, str]:
    """The text of each block of one decision."""
    customer = [t.text for t in state if t.role == "customer"]
    return {
        "customer": "\n".join(customer),
        "business": "\n".join(t.text for t in state if t.role != "customer"),
        "latest_customer": customer[-1] if customer else "",
        "reply": reply,
    }


@dataclass(frozen=True)
class BlockVocabulary:
    """One block's fitted TF-IDF: its n-grams in column order and their idf weights."""

    terms: tuple[str, ...]
    idf: Array


def _vectorizer(max_ngram: int, min_df: int = 1, terms: Sequence[str] | None = None) -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer  # type: ignore[import-untyped]

    return TfidfVectorizer(
        ngram_range=(1, max_ngram),
        min_df=min_df,
        sublinear_tf=True,
        vocabulary=list(terms) if terms is not None else None,
        dtype=np.float64,
    )


@dataclass(frozen=True)
class LexicalFeatures:
    """The fitted vocabularies of the four blocks."""

    max_ngram: int
    blocks: dict[str, BlockVocabulary]

    @classmethod
    def fit(
        cls, texts: Sequence[dict[str, str]], *, max_ngram: int, min_df: int
    ) -> LexicalFeatures:
        blocks = {}
        for name in BLOCKS:
            vectorizer = _vectorizer(max_ngram, min_df)
            try:
                vectorizer.fit([t[name] for t in texts])
            except ValueError:  # no n-gram in min_df texts (a tiny or empty block)
                blocks[name] = BlockVocabulary((), np.zeros(0))
                continue
            terms = tuple(str(term) for term in vectorizer.get_feature_names_out())
            blocks[name] = BlockVocabulary(terms, np.asarray(vectorizer.idf_, dtype=np.float64))
        return cls(max_ngram, blocks)

    def transform(
        self, texts: Sequence[dict[str, str]], blocks: Sequence[str]
    ) -> sparse.csr_matrix:
        """The named blocks side by side, each row of each block l2-normalised (or zero)."""
        parts = []
        for name in blocks:
            vocabulary = self.blocks[name]
            if not vocabulary.terms:
                parts.append(sparse.csr_matrix((len(texts), 0)))
                continue
            vectorizer = _vectorizer(self.max_ngram, terms=vocabulary.terms)
            vectorizer.idf_ = vocabulary.idf
            parts.append(vectorizer.transform([t[name] for t in texts]))
        return sparse.hstack(parts, format="csr", dtype=np.float64)

    def width(self, blocks: Sequence[str]) -> int:
        return sum(len(self.blocks[name].terms) for name in blocks)


@dataclass(frozen=True)
class LexicalLinear:
    """A ridge on some of the blocks: Q (all of them) or V (the state's)."""

    features: LexicalFeatures
    blocks: tuple[str, ...]
    coef: Array
    intercept: float

    def predict(self, items: Sequence[ScoreItem]) -> list[float]:
        """The model's value of each (system, state, reply); V's ignores the reply."""
        if not items:
            return []
        texts = [block_texts(state, reply) for _, state, reply in items]
        values = self.features.transform(texts, self.blocks) @ self.coef + self.intercept
        return [float(v) for v in values]


@dataclass(frozen=True)
class LexicalFit:
    q: LexicalLinear
    value: LexicalLinear  # V(s): the state blocks only
    q_alpha: float | None  # None: no vocabulary, nothing to penalise
    v_alpha: float | None


def fit_lexical(
    items: Sequence[ScoreItem],
    targets: Sequence[float],
    weights: Sequence[float],
    groups: Sequence[str],
    *,
    max_ngram: int,
    min_df: int,
    alphas: Sequence[float],
    n_folds: int,
) -> LexicalFit:
    """Vocabularies from the training texts, then Q and V by weighted ridge, each penalty of
    least cross-validated error (folds grouped by conversation)."""
    texts = [block_texts(state, reply) for _, state, reply in items]
    features = LexicalFeatures.fit(texts, max_ngram=max_ngram, min_df=min_df)
    y = np.asarray(targets, dtype=np.float64)
    w = normalised_weights(weights)

    def ridge_on(blocks: tuple[str, ...]) -> tuple[LexicalLinear, float | None]:
        matrix = features.transform(texts, blocks)
        if matrix.shape[1] == 0:  # no vocabulary at all: the weighted mean return
            return LexicalLinear(features, blocks, np.zeros(0), float(w @ y / w.sum())), None
        fit = fit_ridge(matrix, y, w, groups, alphas, n_folds)
        return LexicalLinear(features, blocks, fit.coef, fit.intercept), fit.alpha

    (q, q_alpha), (value, v_alpha) = ridge_on(BLOCKS), ridge_on(STATE_BLOCKS)
    return LexicalFit(q=q, value=value, q_alpha=q_alpha, v_alpha=v_alpha)


def save_lexical(q: LexicalLinear, path: Path) -> None:
    from safetensors.numpy import save_file

    vocabulary = {"max_ngram": q.features.max_ngram, "blocks": list(q.blocks)}
    vocabulary["terms"] = {name: list(v.terms) for name, v in q.features.blocks.items()}
    (path / VOCABULARY_FILE).write_text(json.dumps(vocabulary, ensure_ascii=False) + "\n")
    tensors = {f"idf.{name}": v.idf for name, v in q.features.blocks.items()}
    tensors["coef"] = q.coef
    tensors["intercept"] = np.array([q.intercept])
    save_file(
        {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in tensors.items()},
        str(path / WEIGHTS_FILE),
    )


def load_lexical(path: Path) -> LexicalLinear:
    from safetensors.numpy import load_file

    vocabulary = json.loads((path / VOCABULARY_FILE).read_text(encoding="utf-8"))
    tensors = load_file(str(path / WEIGHTS_FILE))
    blocks = {
        name: BlockVocabulary(tuple(terms), tensors[f"idf.{name}"])
        for name, terms in vocabulary["terms"].items()
    }
    features = LexicalFeatures(int(vocabulary["max_ngram"]), blocks)
    return LexicalLinear(
        features, tuple(vocabulary["blocks"]), tensors["coef"], float(tensors["intercept"][0])
    )
