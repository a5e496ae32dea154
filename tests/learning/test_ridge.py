"""The closed-form ridge: its CV path against sklearn fold by fold, its folds keep groups whole."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from workers.learning.ridge import (
    fit_ridge,
    group_folds,
    normalised_weights,
    ridge_path_errors,
    sparse_ridge_path_errors,
)


def grouped_data(
    n_groups: int, per_group: int, n_features: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    groups = [f"c{g}" for g in range(n_groups) for _ in range(per_group)]
    group_effect = rng.normal(size=n_groups).repeat(per_group)  # shared within a conversation
    x = rng.normal(size=(len(groups), n_features)) * rng.uniform(0.1, 10, n_features)
    beta = rng.normal(size=n_features) * (rng.random(n_features) < 0.3)
    y = x @ beta + group_effect + rng.normal(scale=0.5, size=len(groups))
    w = rng.uniform(0.2, 3.0, len(groups))
    return x, y, w, groups


def cv_errors_by_sklearn(
    x: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    folds: list[tuple[np.ndarray, np.ndarray]],
    alphas: list[float],
) -> list[float]:
    """The slow obvious path: one sklearn Ridge per fold and alpha."""
    errors = []
    for alpha in alphas:
        total = 0.0
        for train, held in folds:
            model = Ridge(alpha=alpha).fit(x[train], y[train], sample_weight=w[train])
            residual = model.predict(x[held]) - y[held]
            total += float(np.sum(w[held] * residual**2))
        errors.append(total)
    return errors


@pytest.mark.parametrize(("n_groups", "n_features"), [(12, 5), (9, 40)])  # n > d and n < d
def test_path_errors_match_one_sklearn_ridge_per_fold_and_alpha(
    n_groups: int, n_features: int
) -> None:
    x, y, w, groups = grouped_data(n_groups, 3, n_features, seed=n_features)
    folds = group_folds(groups, 4)
    alphas = [0.01, 0.3, 1.0, 30.0, 1000.0]
    fast = ridge_path_errors(x, y, w, folds, alphas)
    assert fast == pytest.approx(cv_errors_by_sklearn(x, y, w, folds, alphas), rel=1e-7)


def test_folds_keep_each_group_whole_and_cover_every_row() -> None:
    groups = [f"c{i % 7}" for i in range(40)]
    folds = group_folds(groups, 5)
    assert len(folds) == 5
    held = np.concatenate([h for _, h in folds])
    assert sorted(held.tolist()) == list(range(40))
    for train, held_out in folds:
        assert not {groups[i] for i in train} & {groups[i] for i in held_out}
    assert len(group_folds(groups[:6], 5)) == 5  # c0..c5
    assert len(group_folds(["a", "a", "b"], 5)) == 2  # never more folds than groups
    with pytest.raises(ValueError, match="at least 2 conversations"):
        group_folds(["a", "a"], 5)


def test_fit_is_sklearn_ridge_at_the_alpha_of_least_cv_error() -> None:
    x, y, w, groups = grouped_data(15, 4, 8, seed=3)
    alphas = [0.1, 1.0, 10.0, 100.0, 1000.0]
    fit = fit_ridge(x, y, w, groups, alphas, n_folds=5)
    slow = cv_errors_by_sklearn(x, y, w, group_folds(groups, 5), alphas)
    assert fit.alpha == alphas[int(np.argmin(slow))]
    assert list(fit.cv_mse.values()) == pytest.approx([e / w.sum() for e in slow], rel=1e-7)
    reference = Ridge(alpha=fit.alpha).fit(x, y, sample_weight=w)
    assert fit.coef == pytest.approx(reference.coef_, rel=1e-8, abs=1e-10)
    assert fit.intercept == pytest.approx(reference.intercept_, rel=1e-8, abs=1e-10)


def test_cv_picks_a_small_penalty_for_signal_and_a_large_one_for_noise() -> None:
    rng = np.random.default_rng(0)
    groups = [f"c{i // 2}" for i in range(200)]
    x = rng.normal(size=(200, 10))
    w = np.ones(200)
    alphas = [0.01, 1.0, 100.0, 1e4, 1e6]
    signal = fit_ridge(x, x @ np.arange(10.0), w, groups, alphas, n_folds=5)
    noise = fit_ridge(x, rng.normal(size=200), w, groups, alphas, n_folds=5)
    assert signal.alpha <= 1.0 and noise.alpha >= 100.0


def test_one_alpha_needs_no_cross_validation_and_bad_input_is_refused() -> None:
    x, y, w, _ = grouped_data(1, 6, 3, seed=1)
    fit = fit_ridge(x, y, w, ["only"] * 6, [5.0], n_folds=5)
    assert fit.alpha == 5.0 and fit.cv_mse == {}
    with pytest.raises(ValueError, match="at least 2 conversations"):
        fit_ridge(x, y, w, ["only"] * 6, [1.0, 5.0], n_folds=5)
    with pytest.raises(ValueError, match="positive penalties"):
        fit_ridge(x, y, w, ["only"] * 6, [0.0], n_folds=5)
    with pytest.raises(ValueError, match="agree in n"):
        fit_ridge(x, y[:-1], w, ["only"] * 6, [1.0], n_folds=5)
    assert normalised_weights([2.0, 4.0]).tolist() == [2 / 3, 4 / 3]
    with pytest.raises(ValueError, match="non-negative"):
        normalised_weights([1.0, -1.0])


def test_sparse_features_give_the_dense_closed_form() -> None:
    """The sparse path (conjugate gradients, the lexical kind's) against the dense SVD path on
    the same numbers: the same CV errors, the same alpha, the same coefficients."""
    from scipy import sparse

    x, y, w, groups = grouped_data(20, 4, 30, seed=5)
    x[np.random.default_rng(5).random(x.shape) < 0.7] = 0.0  # mostly zeros, as TF-IDF rows
    folds = group_folds(groups, 5)
    alphas = [0.1, 1.0, 10.0, 100.0]
    dense = ridge_path_errors(x, y, w, folds, alphas)
    assert sparse_ridge_path_errors(sparse.csr_matrix(x), y, w, folds, alphas) == pytest.approx(
        dense, rel=1e-6
    )
    fit = fit_ridge(sparse.csr_matrix(x), y, w, groups, alphas, n_folds=5)
    reference = fit_ridge(x, y, w, groups, alphas, n_folds=5)
    assert fit.alpha == reference.alpha
    assert fit.coef == pytest.approx(reference.coef, rel=1e-4, abs=1e-5)
    assert fit.intercept == pytest.approx(reference.intercept, rel=1e-6)
