"""Fixtures shared by the policy-improvement tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_model import OPINIONATED_GENERATION, with_generation_config


@pytest.fixture(scope="session")
def opinionated_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a generation_config.json full of sampling defaults, none of which
    may reach the sampler behind the scorer's back."""
    return with_generation_config(
        tiny_model, tmp_path_factory.mktemp("opinionated") / "model", **OPINIONATED_GENERATION
    )
