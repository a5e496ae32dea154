"""The demo's sizes: the --full preset's A/B is sized by the power calculation it states."""

from __future__ import annotations

import dataclasses

import pytest

from services.demo import DemoConfig, Phase, _powered_size
from services.experiments.report import ArmResult
from services.experiments.statistics import minimum_detectable_effect


def first_phase(outcomes: int, n: int, seconds: float) -> Phase:
    return Phase("pi0", "e", [ArmResult("pi0", "pi0", n, n, outcomes)], seconds)


@pytest.mark.parametrize(("outcomes", "base"), [(20, 0.2), (0, 0.05), (90, 0.6)])
def test_the_full_ab_detects_the_target_lift_over_pi0s_rate(outcomes: int, base: float) -> None:
    config = DemoConfig.full_config()
    config = dataclasses.replace(config, conversations=100)
    assert config.target_lift == 0.10
    total, note = _powered_size(config, first_phase(outcomes, 100, seconds=1000.0))
    per_arm = total // 2
    # the A/B at that size detects the lift, one conversation fewer per arm does not
    assert minimum_detectable_effect(base, per_arm, per_arm) <= 0.10 + 1e-9
    assert minimum_detectable_effect(base, per_arm - 1, per_arm - 1) > 0.10 - 1e-3
    assert f"{per_arm} conversations per arm" in note
    assert f"expected {round(total * 10 / 60)} min" in note  # 10 s a conversation in phase 0


def test_default_and_quick_sizes_are_not_powered() -> None:
    assert DemoConfig().target_lift is None and DemoConfig.quick_config().target_lift is None
    assert DemoConfig().paired_customers > 0
