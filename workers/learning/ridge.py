"""Weighted ridge regression in closed form, its penalty chosen by cross-validation grouped by
conversation.

The linear Q head and the state-value baseline V are both this: frozen features are fixed, so
the least-squares optimum exists in closed form and no optimiser has to find it. Sparse
features (the lexical kind's TF-IDF blocks: ~10^5 columns) are solved per penalty by conjugate
gradients instead, where a dense SVD would not fit in memory. The folds
keep every conversation whole, because decisions of one conversation share their return and
most of their text: a split that cut through a conversation would reward memorising it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
from numpy.typing import NDArray
from scipy import sparse  # type: ignore[import-untyped]

Array = NDArray[np.float64]
Features: TypeAlias = Array | sparse.csr_matrix
# Conjugate gradients (sparse features) stop at this relative residual of the normal equations.
SPARSE_TOL = 1e-6


@dataclass(frozen=True)
class RidgeFit:
    """y ~ features @ coef + intercept, minimising sum_i w_i r_i^2 + alpha * |coef|^2."""

    coef: Array
    intercept: float
    alpha: float
    cv_mse: dict[float, float]  # alpha -> weighted held-out MSE over the folds (empty: no CV)


def normalised_weights(weights: Sequence[float] | Array) -> Array:
    """Weights scaled to mean 1, so that a penalty alpha means the same at any weight scale."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0:
        raise ValueError("weights must be a non-empty vector")
    if np.any(w < 0) or not np.all(np.isfinite(w)) or w.sum() <= 0:
        raise ValueError("weights must be finite, non-negative and not all zero")
    normalised: Array = w / w.mean()
    return normalised


def group_folds(groups: Sequence[str], n_folds: int) -> list[tuple[Array, Array]]:
    """(train, validation) index arrays; each group lies wholly in one validation fold."""
    from sklearn.model_selection import GroupKFold  # type: ignore[import-untyped]

    n_groups = len(set(groups))
    if n_groups < 2:
        raise ValueError(
            f"grouped cross-validation needs at least 2 conversations, got {n_groups}; "
            "give a single penalty instead"
        )
    splitter = GroupKFold(n_splits=min(n_folds, n_groups))
    index = np.zeros((len(groups), 1))
    return [
        (train.astype(np.int64), held.astype(np.int64))
        for train, held in splitter.split(index, groups=list(groups))
    ]


def ridge_path_errors(
    features: Array,
    targets: Array,
    weights: Array,
    folds: Sequence[tuple[Array, Array]],
    alphas: Sequence[float],
) -> Array:
    """Weighted held-out squared error summed over the folds, one entry per alpha.

    One SVD per fold gives the whole path: with centred, sqrt(w)-scaled features X = U S V^T,
    coef(alpha) = V diag(s / (s^2 + alpha)) U^T y, as sklearn's Ridge with an (unpenalised)
    intercept computes it.
    """
    alpha = np.asarray(alphas, dtype=np.float64)
    errors = np.zeros(len(alpha))
    for train, held in folds:
        x, y, w = features[train], targets[train], weights[train]
        x_mean = np.average(x, axis=0, weights=w)
        y_mean = float(np.average(y, weights=w))
        root = np.sqrt(w)[:, None]
        u, s, vt = np.linalg.svd((x - x_mean) * root, full_matrices=False)
        uty = u.T @ ((y - y_mean) * root[:, 0])
        shrink = s[None, :] / (s[None, :] ** 2 + alpha[:, None])  # (alphas, rank)
        coefs = (shrink * uty[None, :]) @ vt  # (alphas, features)
        predictions = (features[held] - x_mean) @ coefs.T + y_mean  # (held, alphas)
        residual = predictions - targets[held][:, None]
        errors += weights[held] @ residual**2
    return errors


def sparse_ridge_path_errors(
    features: sparse.csr_matrix,
    targets: Array,
    weights: Array,
    folds: Sequence[tuple[Array, Array]],
    alphas: Sequence[float],
) -> Array:
    """ridge_path_errors for sparse features: one sklearn Ridge (conjugate gradients, the
    intercept unpenalised) per fold and alpha."""
    from sklearn.linear_model import Ridge  # type: ignore[import-untyped]

    errors = np.zeros(len(alphas))
    for train, held in folds:
        x, y, w = features[train], targets[train], weights[train]
        for k, alpha in enumerate(alphas):
            model = Ridge(alpha=alpha, solver="sparse_cg", tol=SPARSE_TOL)
            residual = model.fit(x, y, sample_weight=w).predict(features[held]) - targets[held]
            errors[k] += weights[held] @ residual**2
    return errors


def fit_ridge(
    features: Features,
    targets: Array,
    weights: Array,
    groups: Sequence[str],
    alphas: Sequence[float],
    n_folds: int,
) -> RidgeFit:
    """Weighted ridge at the alpha of least grouped-CV error (ties: the larger alpha).

    The final fit is sklearn's Ridge on all rows; with one alpha there is nothing to choose.
    """
    from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

    # One BLAS thread: once OpenBLAS has started its threads, they were seen to slow the
    # process's next torch work several-fold on two cores; these solves are seconds at most.
    with threadpool_limits(1, user_api="blas"):
        return _fit_ridge(features, targets, weights, groups, alphas, n_folds)


def _fit_ridge(
    features: Features,
    targets: Array,
    weights: Array,
    groups: Sequence[str],
    alphas: Sequence[float],
    n_folds: int,
) -> RidgeFit:
    from sklearn.linear_model import Ridge

    if not alphas or any(a <= 0 for a in alphas):
        raise ValueError(f"alphas must be a non-empty list of positive penalties, not {alphas}")
    if features.ndim != 2 or features.shape[0] != len(targets) or len(targets) != len(weights):
        raise ValueError("features (n, d), targets (n,) and weights (n,) must agree in n")
    if len(groups) != len(targets):
        raise ValueError("one group per row")
    grid = sorted(float(a) for a in alphas)
    cv_mse: dict[float, float] = {}
    alpha = grid[0]
    if len(grid) > 1:
        folds = group_folds(groups, n_folds)
        path = sparse_ridge_path_errors if sparse.issparse(features) else ridge_path_errors
        errors = path(features, targets, weights, folds, grid) / weights.sum()
        cv_mse = {a: float(e) for a, e in zip(grid, errors, strict=True)}
        # The most regularised of the best: the flat end of the path generalises no worse.
        best = len(grid) - 1 - int(np.argmin(errors[::-1]))
        alpha = grid[best]
    if sparse.issparse(features):
        model = Ridge(alpha=alpha, fit_intercept=True, solver="sparse_cg", tol=SPARSE_TOL)
    else:
        model = Ridge(alpha=alpha, fit_intercept=True)
    model.fit(features, targets, sample_weight=weights)
    return RidgeFit(
        coef=np.asarray(model.coef_, dtype=np.float64),
        intercept=float(model.intercept_),
        alpha=alpha,
        cv_mse=cv_mse,
    )
