"""The pre-traffic estimators against their definitions, and their bias where it matters."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.learning.evidence import (
    ScoredDecision,
    doubly_robust_value,
    flat_evidence,
    improvement_check,
    rate_estimates,
)


def decision(conversation: str, index: int, **values: float) -> ScoredDecision:
    fields = {"reward": 0.0, "q_logged": 0.0, "v_new": 0.0, "v_old": 0.0, "rho": 1.0, **values}
    return ScoredDecision(conversation_id=conversation, index=index, **fields)


def dr_by_recursion(trajectory: list[ScoredDecision]) -> float:
    """Jiang & Li (2016), from the last decision back, gamma = 1, no clip:
    DR_t = V(s_t) + rho_t (r_t + DR_{t+1} - Q(s_t, a_t)), DR_T = 0."""
    value = 0.0
    for d in reversed(trajectory):
        value = d.v_new + d.rho * (d.reward + value - d.q_logged)
    return value


step = st.fixed_dictionaries(
    {
        "reward": st.sampled_from([0.0, 1.0]),
        "q_logged": st.floats(-1, 2),
        "v_new": st.floats(-1, 2),
        "rho": st.floats(0, 3),
    }
)


@given(st.lists(step, min_size=1, max_size=6))
@settings(max_examples=200, deadline=None)
def test_doubly_robust_value_equals_the_recursive_definition(steps: list[dict[str, float]]) -> None:
    trajectory = [decision("c", i, **s) for i, s in enumerate(steps)]
    value, final, clipped = doubly_robust_value(trajectory, clip=1e9)
    assert value == pytest.approx(dr_by_recursion(trajectory), rel=1e-9, abs=1e-9)
    assert final == pytest.approx(math.prod(s["rho"] for s in steps), rel=1e-9, abs=1e-12)
    assert clipped == 0


def test_with_a_zero_q_doubly_robust_is_per_decision_importance_sampling() -> None:
    trajectory = [
        decision("c", 0, rho=2.0),
        decision("c", 1, rho=0.5),
        decision("c", 2, rho=3.0, reward=1.0),
    ]
    value, final, _ = doubly_robust_value(trajectory, clip=100.0)
    assert value == pytest.approx(2.0 * 0.5 * 3.0 * 1.0)
    assert final == pytest.approx(3.0)
    # The clip bounds the cumulative weight, and says how often it did.
    value, final, clipped = doubly_robust_value(trajectory, clip=2.5)
    assert value == pytest.approx(2.5)  # 2 -> 1 -> min(2.5, 3)
    assert (final, clipped) == (2.5, 1)


def test_on_policy_with_a_perfect_q_every_conversation_gets_its_own_outcome() -> None:
    # rho = 1 and V = Q of the logged action: DR telescopes to the sum of the rewards.
    trajectory = [
        decision("c", 0, q_logged=0.4, v_new=0.4),
        decision("c", 1, q_logged=0.7, v_new=0.7, reward=1.0),
    ]
    assert doubly_robust_value(trajectory, clip=10.0)[0] == pytest.approx(1.0)


def simulate(n: int, q_hat: float, seed: int) -> list[ScoredDecision]:
    """Two-decision conversations. Behaviour pi_i picks a (prob 0.5) or b at each decision;
    the target picks a with prob 0.8. The outcome comes at the second decision with prob
    0.2 + 0.3 [first was a] + 0.3 [second was a]. Q is a wrong constant, V its mean."""
    rng = np.random.default_rng(seed)
    decisions = []
    for c in range(n):
        picks = rng.random(2) < 0.5
        p = 0.2 + 0.3 * picks[0] + 0.3 * picks[1]
        outcome = float(rng.random() < p)
        for t in range(2):
            rho = (0.8 / 0.5) if picks[t] else (0.2 / 0.5)
            decisions.append(
                decision(
                    f"c{c}",
                    t,
                    rho=rho,
                    q_logged=q_hat,
                    v_new=q_hat,
                    v_old=q_hat,
                    reward=outcome if t == 1 else 0.0,
                )
            )
    return decisions


def test_doubly_robust_is_unbiased_where_the_direct_estimate_is_not() -> None:
    truth = 0.2 + 0.3 * 0.8 + 0.3 * 0.8  # the target's outcome rate: 0.68
    rates = rate_estimates(simulate(4000, q_hat=0.3, seed=0), clip=100.0, n_boot=300, seed=1)
    dr = rates["doubly_robust"]
    assert dr["lo"] is not None and dr["hi"] is not None
    assert dr["lo"] <= truth <= dr["hi"], dr
    assert abs(dr["value"] - truth) < 0.05  # type: ignore[operator]
    assert rates["direct"]["value"] == pytest.approx(0.3)  # only as good as Q
    logged = rates["logged"]["value"]
    assert logged == pytest.approx(0.5, abs=0.03)  # the behaviour's own rate
    # Kish ESS of the final weights (1.6^2, 0.64 twice, 0.16 each with prob 1/4) is below n.
    assert 0 < rates["ess"] < 4000
    assert rates["n_conversations"] == 4000


def test_the_interval_covers_the_truth_about_95_percent_of_the_time() -> None:
    truth = 0.68
    covered = 0
    runs = 40
    for seed in range(runs):
        rates = rate_estimates(simulate(300, q_hat=0.5, seed=seed), n_boot=200, seed=seed)
        lo, hi = rates["doubly_robust"]["lo"], rates["doubly_robust"]["hi"]
        covered += lo is not None and hi is not None and lo <= truth <= hi
    # Binomial(40, 0.95): 34 or fewer has probability < 1%.
    assert covered >= 35, covered


def test_improvement_check_flags_a_lower_bound_below_zero() -> None:
    rng = np.random.default_rng(0)
    better = [
        decision(f"c{c}", t, v_old=0.3, v_new=0.3 + 0.05 + 0.02 * rng.standard_normal())
        for c in range(30)
        for t in range(3)
    ]
    result = improvement_check(better, n_boot=400, seed=0)
    assert result["gain"]["value"] == pytest.approx(0.05, abs=0.01)
    assert result["gain"]["lo"] > 0 and not result["flagged"]  # type: ignore[operator]
    assert (result["n_states"], result["n_conversations"]) == (90, 30)

    noisy = [
        decision(f"c{c}", t, v_old=0.3, v_new=0.3 + 0.01 + 0.2 * rng.standard_normal())
        for c in range(30)
        for t in range(3)
    ]
    assert improvement_check(noisy, n_boot=400, seed=0)["flagged"]
    worse = [decision(f"c{c}", 0, v_old=0.4, v_new=0.3) for c in range(10)]
    check = improvement_check(worse, n_boot=100, seed=0)
    assert check["flagged"] and check["gain"]["hi"] == pytest.approx(-0.1)


def test_the_improvement_interval_resamples_conversations_not_states() -> None:
    # Each conversation's states share one gain: the data are worth 20 draws, not 200.
    rng = np.random.default_rng(3)
    gains = rng.standard_normal(20)
    shared = [decision(f"c{c}", t, v_new=gains[c]) for c in range(20) for t in range(10)]
    width = improvement_check(shared, n_boot=2000, seed=0)["gain"]
    independent = 2 * 1.96 * gains.std() / math.sqrt(20)
    assert width["hi"] - width["lo"] == pytest.approx(independent, rel=0.25)  # type: ignore[operator]


def test_estimates_refuse_bad_ratios_and_flatten_for_metrics() -> None:
    with pytest.raises(ValueError, match="ratios"):
        rate_estimates([decision("c", 0, rho=float("nan"))])
    with pytest.raises(ValueError, match="clip"):
        rate_estimates([decision("c", 0)], clip=0.0)
    decisions = simulate(50, q_hat=0.4, seed=2)
    flat = flat_evidence(
        improvement_check(decisions, n_boot=50), rate_estimates(decisions, n_boot=50)
    )
    for key in ("check_gain", "estimate_direct", "estimate_dr", "estimate_logged"):
        assert {key, f"{key}_lo", f"{key}_hi"} <= flat.keys()
    assert flat["check_states"] == 100 and flat["estimate_conversations"] == 50


def test_a_lower_bound_of_exactly_zero_is_flagged() -> None:
    # Identical policies whose samples happen to agree: no gain is shown.
    same = [decision(f"c{c}", 0, v_old=0.3, v_new=0.3) for c in range(10)]
    check = improvement_check(same, n_boot=100, seed=0)
    assert check["gain"]["lo"] == 0.0 and check["flagged"]


def test_too_few_conversations_give_no_interval_and_a_flag() -> None:
    from workers.learning.evidence import MIN_CLUSTERS

    few = [
        decision(f"c{i % (MIN_CLUSTERS - 1)}", i, q_logged=0.2, v_new=0.5, v_old=0.2)
        for i in range(12)
    ]
    check = improvement_check(few, n_boot=200)
    assert check["gain"]["value"] == pytest.approx(0.3)
    assert check["gain"]["lo"] is None and check["flagged"]
    rates = rate_estimates(few, clip=10.0, n_boot=200)
    assert rates["doubly_robust"]["lo"] is None and rates["direct"]["hi"] is None
    enough = [decision(f"c{i}", 0, q_logged=0.2, v_new=0.5 + i / 100, v_old=0.2) for i in range(12)]
    assert improvement_check(enough, n_boot=200)["gain"]["lo"] is not None
