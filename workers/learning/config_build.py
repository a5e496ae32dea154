"""Build step configs from the operator API's loose JSON (names as in fine-tuning job APIs)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from workers.learning.configs import (
    DMPOConfig,
    DPOConfig,
    GRPOConfig,
    PPOConfig,
    QFitConfig,
    RLOOConfig,
)

ImprovementConfig = PPOConfig | RLOOConfig | GRPOConfig | DMPOConfig | DPOConfig

# Steps from logged preferences: no sampling, no Q (workers/learning/improve.py).
OFFLINE_ALGORITHMS: tuple[str, ...] = ("dmpo", "dpo")

# API name -> field name, per algorithm: the jobs API speaks of epochs and batch sizes.
API_NAMES: dict[str, dict[str, str]] = {
    "ppo": {"n_epochs": "n_ppo_epochs"},
    "rloo": {"n_epochs": "num_iterations", "batch_size": "prompts_per_step"},
    "grpo": {"n_epochs": "num_iterations", "batch_size": "prompts_per_step"},
    "dmpo": {},
    "dpo": {},
}
IMPROVEMENT_CONFIGS: dict[str, type[ImprovementConfig]] = {
    "ppo": PPOConfig,
    "rloo": RLOOConfig,
    "grpo": GRPOConfig,
    "dmpo": DMPOConfig,
    "dpo": DPOConfig,
}


def _build(cls: type[Any], values: dict[str, Any]) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
    # JSON has no tuples; the dataclasses are frozen and hashable.
    cleaned = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**cleaned)


def q_fit_config(values: dict[str, Any]) -> QFitConfig:
    config: QFitConfig = _build(QFitConfig, values)
    return config


def improvement_config(algorithm: str, values: dict[str, Any]) -> ImprovementConfig:
    if algorithm not in IMPROVEMENT_CONFIGS:
        known = sorted(IMPROVEMENT_CONFIGS)
        raise ValueError(f"algorithm must be one of {known}, got {algorithm!r}")
    aliases = API_NAMES[algorithm]
    renamed = {aliases.get(k, k): v for k, v in values.items()}
    config: ImprovementConfig = _build(IMPROVEMENT_CONFIGS[algorithm], renamed)
    return config
