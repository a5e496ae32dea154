"""Sticky, deterministic arm assignment and persona exploration (pure functions)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def unit_interval(*parts: str) -> float:
    """A uniform number in [0, 1) determined by `parts` (SHA-256 of their join)."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def choose_index(weights: Sequence[float], u: float) -> int:
    """Index i with probability weights[i] / sum(weights), as a function of u in [0, 1)."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("at least one weight must be positive")
    threshold = u * total
    running = 0.0
    last_positive = 0
    for i, weight in enumerate(weights):
        if weight <= 0:
            continue
        last_positive = i
        running += weight
        if threshold < running:
            return i
    return last_positive  # u * total rounded up to the last boundary


@dataclass(frozen=True)
class Persona:
    name: str
    instruction: str


DEFAULT_PERSONAS: tuple[Persona, ...] = (
    Persona("concise", "Keep the reply under 20 words."),
    Persona("detailed", "Give a detailed reply with concrete specifics."),
    Persona("warm", "Use a warm, enthusiastic tone."),
    Persona("formal", "Use a formal, polite tone."),
    Persona("emoji", "Include one fitting emoji."),
    Persona("curious", "End with one question about the customer's needs."),
)


@dataclass(frozen=True)
class ExplorationChoice:
    persona: Persona | None
    probability: float  # probability of this choice under the behaviour policy


def parse_personas(config: dict[str, Any] | None) -> tuple[float, tuple[Persona, ...]]:
    if not config:
        return 0.0, ()
    epsilon = float(config.get("epsilon", 0.0))
    raw = config.get("personas")
    personas = tuple(Persona(p["name"], p["instruction"]) for p in raw) if raw else DEFAULT_PERSONAS
    return epsilon, personas


def explore(config: dict[str, Any] | None, *seed_parts: str) -> ExplorationChoice:
    """With probability epsilon pick a persona uniformly; deterministic in `seed_parts`."""
    epsilon, personas = parse_personas(config)
    if epsilon <= 0 or not personas:
        return ExplorationChoice(None, 1.0)
    u = unit_interval("explore", *seed_parts)
    if u >= epsilon:
        return ExplorationChoice(None, 1.0 - epsilon)
    index = min(int(u / epsilon * len(personas)), len(personas) - 1)
    return ExplorationChoice(personas[index], epsilon / len(personas))
