"""The lexical Q: it learns from the reply's words, V cannot see them, it round-trips exactly."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import sparse
from sklearn.feature_extraction.text import TfidfVectorizer

from services.policies.prompt import Turn
from tests.learning.test_q_model import keyword_examples
from workers.learning.configs import QFitConfig
from workers.learning.examples import StepExample
from workers.learning.lexical import (
    BLOCKS,
    STATE_BLOCKS,
    LexicalFeatures,
    LexicalLinear,
    block_texts,
)
from workers.learning.q_model import MANIFEST, QFitResult, QModel, evaluate, fit_q

CONFIG = QFitConfig(kind="lexical", eval_fraction=0.25, seed=1, eval_bootstrap=300)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[QFitResult, list[StepExample]]:
    """Replies that say "book" end in the outcome (G = 1); the state never says it."""
    examples = keyword_examples(48)
    held_out = [e for e in examples if e.conversation_id in {f"c{i}" for i in range(36, 48)}]
    train = [e for e in examples if e not in held_out]
    return fit_q(train, held_out, CONFIG, tmp_path_factory.mktemp("q-lexical")), held_out


def test_it_learns_the_replys_keyword_and_ranks_replies(
    fitted: tuple[QFitResult, list[StepExample]],
) -> None:
    result, _ = fitted
    assert (result.n_train, result.n_eval) == (144, 48)
    metrics = result.metrics
    assert metrics["all"]["auc"] is not None and metrics["all"]["auc"] >= 0.9, metrics
    assert metrics["first_half"]["auc"] is not None and metrics["first_half"]["auc"] >= 0.9
    rank = metrics["rank"]
    assert rank["n"] == 48 and rank["corr_lo"] is not None and rank["corr_lo"] > 0.5, rank
    assert result.fit["head_alpha"] in CONFIG.lexical_alphas
    assert result.fit["v_alpha"] in CONFIG.lexical_alphas
    # No language model is read or stored.
    assert result.model.network is None and result.model.tokenizer is None


def test_a_q_blind_to_the_reply_does_not_rank(
    fitted: tuple[QFitResult, list[StepExample]],
) -> None:
    """The same Q with its reply block's coefficients zeroed: the ranking measure sees it."""
    result, held_out = fitted
    q = result.model.lexical
    assert q is not None and q.blocks == BLOCKS
    coef = q.coef.copy()
    coef[q.features.width(STATE_BLOCKS) :] = 0.0
    blind = QModel(config=result.model.config, lexical=replace(q, coef=coef))
    rank = evaluate(blind, held_out, value=result.value, n_boot=300, seed=1)["rank"]
    assert rank["corr_lo"] is not None and rank["corr_hi"] is not None
    assert rank["corr_lo"] < 0.0 < rank["corr_hi"], rank
    # Given the fitted V, evaluate reproduces fit_q's report of the whole Q.
    full = evaluate(result.model, held_out, value=result.value, n_boot=300, seed=1)
    assert full["rank"] == pytest.approx(result.metrics["rank"])


def test_v_reads_the_state_blocks_alone(fitted: tuple[QFitResult, list[StepExample]]) -> None:
    result, held_out = fitted
    value = result.value
    assert isinstance(value, LexicalLinear)
    assert value.blocks == STATE_BLOCKS
    items = [(e.system, e.state, e.action) for e in held_out]
    other_replies = [(e.system, e.state, "book book now, book it") for e in held_out]
    assert value.predict(items) == value.predict(other_replies)
    assert result.model.score(items) != result.model.score(other_replies)


def test_save_load_score_round_trip(fitted: tuple[QFitResult, list[StepExample]]) -> None:
    result, held_out = fitted
    manifest = json.loads((result.path / MANIFEST).read_text())
    assert manifest["kind"] == "lexical" and manifest["fit"] == result.fit
    assert sorted(p.name for p in result.path.iterdir()) == [
        "lexical.json",
        "lexical.safetensors",
        MANIFEST,
    ]
    loaded = QModel.load(result.path)
    assert loaded.config == result.model.config
    items = [(e.system, e.state, e.action) for e in held_out]
    assert loaded.score(items) == result.model.score(items)
    assert loaded.score([]) == []
    again = evaluate(loaded, held_out, n_boot=300, seed=1)
    assert again["all"] == pytest.approx(result.metrics["all"])


def test_blocks_are_tfidf_of_their_own_text() -> None:
    """Each block is sklearn's TF-IDF of its own text alone, refitted from the saved terms."""
    state = (
        Turn("customer", "Do you do kitchens?"),
        Turn("business", "We do kitchens."),
        Turn("customer", "Price for a small kitchen?"),
    )
    texts = [
        block_texts(state, "About two thousand for a small kitchen."),
        block_texts(state[:1], "Yes, kitchens and baths."),
        block_texts((), "Hello!"),
    ]
    assert texts[0]["customer"] == "Do you do kitchens?\nPrice for a small kitchen?"
    assert texts[0]["latest_customer"] == "Price for a small kitchen?"
    assert texts[0]["business"] == "We do kitchens."
    assert texts[2]["customer"] == texts[2]["latest_customer"] == ""
    features = LexicalFeatures.fit(texts, max_ngram=2, min_df=1)
    matrix = features.transform(texts, BLOCKS).toarray()
    column = 0
    for name in BLOCKS:
        reference = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
        expected = reference.fit_transform([t[name] for t in texts]).toarray()
        width = len(features.blocks[name].terms)
        assert list(features.blocks[name].terms) == list(reference.get_feature_names_out())
        assert matrix[:, column : column + width] == pytest.approx(expected)
        column += width
    assert column == matrix.shape[1]


def test_a_block_without_vocabulary_is_empty(tmp_path: Path) -> None:
    """min_df above every count leaves no n-gram: zero columns, and a fit still works."""
    texts = [block_texts((), "alpha beta"), block_texts((), "gamma delta")]
    features = LexicalFeatures.fit(texts, max_ngram=1, min_df=2)
    assert all(not v.terms for v in features.blocks.values())
    assert features.transform(texts, BLOCKS).shape == (2, 0)
    assert sparse.issparse(features.transform(texts, BLOCKS))
    examples = keyword_examples(4)
    config = replace(CONFIG, lexical_min_df=1000)
    result = fit_q(examples[:12], examples[12:], config, tmp_path)
    scores = result.model.score([(e.system, e.state, e.action) for e in examples[12:]])
    assert scores == pytest.approx([np.mean([e.ret for e in examples[:12]])] * 4)
    assert result.fit == {"head_alpha": None, "v_alpha": None}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lexical_alphas", (), "lexical_alphas must be positive"),
        ("lexical_alphas", (1.0, -1.0), "lexical_alphas must be positive"),
        ("lexical_min_df", 0, "lexical_min_df must be positive"),
        ("lexical_max_ngram", 0, "lexical_max_ngram must be positive"),
    ],
)
def test_config_validation(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QFitConfig(**{field: value})  # type: ignore[arg-type]


def test_a_lexical_fit_needs_no_base_model(tmp_path: Path) -> None:
    examples = keyword_examples(8)
    result = fit_q(examples[:24], examples[24:], QFitConfig(kind="lexical"), tmp_path)
    assert result.model.config.base_model == "" and result.metrics["all"]["n"] == 8
    with pytest.raises(ValueError, match="lexical Q model is its lexical ridge alone"):
        QModel(config=QFitConfig(kind="lexical"))
