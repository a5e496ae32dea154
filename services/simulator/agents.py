"""The simulated customer and the simulated business rep; all randomness from a passed-in RNG.

The customer has a hidden persona drawn from the scenario and reacts to what the business
actually sent: it reads the message's features (services/simulator/features.py), then may
convert (sigmoid of the scenario's outcome log-odds), leave (annoyance and impatience), or
answer from its templates. The rep decides what to do with a suggestion by reading the same
features, as a person at the business would.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from services.simulator.features import FEATURE_NAMES, Turn, is_needs_question, sentences
from services.simulator.scenarios import Budget, Need, Question, Scenario

# Leaving without an irritant reads as impatience once the patience term reaches this.
IMPATIENT = 0.5

CustomerStatus = Literal["continues", "converted", "left"]
RepDecision = Literal["accept", "edit", "reject", "own", "silent"]


def sigmoid(x: float) -> float:
    """1 / (1 + e^-x), without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


@dataclass(frozen=True)
class Persona:
    """One customer's hidden traits, drawn from the scenario's `Personas`."""

    need: Need
    budget: Budget
    patience: float
    persuaded_by: tuple[str, ...]
    irritated_by: tuple[str, ...]
    concerns: tuple[Question, ...]

    @property
    def name(self) -> str:
        return f"{self.need.name}/{self.budget.name}"


def sample_persona(scenario: Scenario, rng: random.Random) -> Persona:
    """Draw a persona from the scenario's distribution."""
    personas = scenario.personas
    need = rng.choices(personas.needs, weights=[n.weight for n in personas.needs])[0]
    budget = rng.choices(personas.budgets, weights=[b.weight for b in personas.budgets])[0]
    low, high = personas.patience
    return Persona(
        need=need,
        budget=budget,
        patience=rng.uniform(low, high),
        persuaded_by=tuple(rng.sample(personas.persuaders, personas.n_persuaders)),
        irritated_by=tuple(rng.sample(personas.irritants, personas.n_irritants)),
        concerns=tuple(rng.sample(scenario.concerns, rng.randint(0, personas.max_concerns))),
    )


@dataclass(frozen=True)
class CustomerReply:
    """The customer's next message and what it means for the conversation."""

    text: str
    status: CustomerStatus
    p_outcome: float  # the chance of converting this turn
    p_leave: float  # the chance of leaving this turn
    reason: str | None = None  # why the customer left


class SimulatedCustomer:
    """A customer with a hidden persona who reacts to what the business actually sends."""

    def __init__(self, scenario: Scenario, rng: random.Random) -> None:
        self.scenario = scenario
        self.rng = rng
        self.persona = sample_persona(scenario, rng)
        self.annoyance = 0.0
        self.turn = 0
        self.needs_shared = False
        self.open_concerns: list[Question] = list(self.persona.concerns)
        self.pending: Question | None = None  # the concern asked and not answered yet
        self.reasked = False
        self._opening = rng.choice(self.persona.need.openings)

    def opening(self) -> str:
        """The first message of the conversation."""
        return self._opening.text

    def react(self, business_text: str | None, history: Sequence[Turn]) -> CustomerReply:
        """Answer `business_text` (None: the business stayed silent) sent after `history`."""
        self.turn += 1
        dynamics = self.scenario.dynamics
        if business_text is None:
            self.annoyance = dynamics.annoyance_decay * self.annoyance + dynamics.silence_annoyance
            p_leave = sigmoid(self._leave_logit())
            if self.rng.random() < p_leave:
                return self._leave("silence", 0.0, p_leave)
            return CustomerReply(
                self.rng.choice(self.scenario.customer.nudge), "continues", 0, p_leave
            )

        features = self.scenario.features(business_text, history)
        if self.pending is not None and features["answers_question"] >= 0.5:
            self.open_concerns.remove(self.pending)
            self.pending = None
        terms = self._annoyance_terms(features)
        self.annoyance = max(0.0, dynamics.annoyance_decay * self.annoyance + sum(terms.values()))
        p_outcome = sigmoid(self._outcome_logit(features))
        p_leave = sigmoid(self._leave_logit())
        if self.rng.random() < p_outcome:
            text = self.rng.choice(self.scenario.customer.accept)
            return CustomerReply(text, "converted", p_outcome, p_leave)
        if self.rng.random() < p_leave:
            return self._leave(self._main_irritant(terms), p_outcome, p_leave)
        return CustomerReply(
            self._next_line(business_text, features), "continues", p_outcome, p_leave
        )

    def _annoyance_terms(self, features: dict[str, float]) -> dict[str, float]:
        """Each feature's contribution to annoyance, this persona's irritants included."""
        dynamics, personas = self.scenario.dynamics, self.scenario.personas
        terms: dict[str, float] = {}
        for name in FEATURE_NAMES:
            term = dynamics.leave_weights.get(name, 0.0) * features[name]
            if name in self.persona.irritated_by:
                term += personas.irritation_bonus * features[name]
            if term:
                terms[name] = term
        return terms

    def _outcome_logit(self, features: dict[str, float]) -> float:
        dynamics, personas = self.scenario.dynamics, self.scenario.personas
        logit = dynamics.outcome_base + self.persona.budget.outcome_shift
        logit += sum(w * features[k] for k, w in dynamics.outcome_weights.items())
        logit += personas.persuasion_bonus * sum(features[k] for k in self.persona.persuaded_by)
        logit += dynamics.needs_heard_bonus if self.needs_shared else 0.0
        logit -= dynamics.open_concern_penalty * len(self.open_concerns)
        logit -= dynamics.outcome_annoyance * self.annoyance
        return logit

    def _impatience(self) -> float:
        """Log-odds of leaving that grow with every turn, faster for impatient customers."""
        dynamics = self.scenario.dynamics
        return dynamics.leave_impatience * (1.0 - self.persona.patience) * self.turn

    def _leave_logit(self) -> float:
        dynamics = self.scenario.dynamics
        annoyance = dynamics.leave_per_annoyance * self.annoyance
        return dynamics.leave_base + annoyance + self._impatience()

    def _main_irritant(self, terms: dict[str, float]) -> str:
        """The feature that annoyed most this turn; else "impatience" once the conversation
        drags on for this customer, else "default"."""
        irritants = {name: term for name, term in terms.items() if term > 0}
        if not irritants:
            return "impatience" if self._impatience() >= IMPATIENT else "default"
        # max() keeps the first of equal terms, and `terms` is in FEATURE_NAMES order.
        return max(irritants, key=lambda name: irritants[name])

    def _leave(self, reason: str, p_outcome: float, p_leave: float) -> CustomerReply:
        leave = self.scenario.customer.leave
        text = self.rng.choice(leave.get(reason) or leave["default"])
        return CustomerReply(text, "left", p_outcome, p_leave, reason)

    def _next_line(self, business_text: str, features: dict[str, float]) -> str:
        lines = self.scenario.customer
        if self.pending is not None:
            if not self.reasked:
                self.reasked = True
                return self.rng.choice(lines.reask).format(question=self.pending.text)
            self.pending = None  # asked twice in vain; it stays open and may come back later
        if not self.needs_shared and is_needs_question(business_text, self.scenario.needs_phrases):
            self.needs_shared = True
            return self.rng.choice(self.persona.need.details)
        proposed = features["next_step"] > 0
        if self.open_concerns and (
            proposed or self.rng.random() < self.scenario.dynamics.ask_probability
        ):
            self.pending, self.reasked = self.open_concerns[0], False
            return self.pending.text
        return self.rng.choice(lines.decline if proposed else lines.filler)


@dataclass(frozen=True)
class RepAction:
    """What the rep sends: `text` None means it stayed silent."""

    decision: RepDecision
    text: str | None


class SimulatedRep:
    """A business rep who reads each suggestion before sending, editing or replacing it."""

    def __init__(self, scenario: Scenario, rng: random.Random) -> None:
        self.scenario = scenario
        self.rng = rng
        words = sorted(scenario.off_brand_words, key=len, reverse=True)
        self._off_brand = (
            re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE)
            if words
            else None
        )

    def respond(self, suggestion: str | None, history: Sequence[Turn]) -> RepAction:
        """Decide what to send after `history`, given the suggestion shown (None: none)."""
        rep = self.scenario.rep
        if self.rng.random() < rep.silence:
            return RepAction("silent", None)
        if suggestion is None:
            return RepAction("own", self.own_message(history))
        text, edited = suggestion, False
        features = self.scenario.features(text, history)
        if features["garbled"]:
            return RepAction("reject", self.own_message(history))
        if features["off_brand"]:
            if self.rng.random() >= rep.fix_off_brand:
                return RepAction("reject", self.own_message(history))
            text, edited = self.fix_off_brand(text), True
        if features["too_long"]:
            if self.rng.random() >= rep.trim_long:
                return RepAction("reject", self.own_message(history))
            text, edited = " ".join(sentences(text)[: rep.trim_to_sentences]), True
        premature = features["price_before_need"] or features["pushy"] or features["rude"]
        if premature and self.rng.random() < rep.reject_push:
            return RepAction("reject", self.own_message(history))
        if edited:
            return RepAction("edit", text)
        draw = self.rng.random()
        if draw < rep.accept:
            return RepAction("accept", text)
        if draw < rep.accept + rep.edit:
            touches = [p for p in rep.polish if p.lower() not in text.lower()]
            if touches:
                return RepAction("edit", f"{text} {self.rng.choice(touches)}")
            return RepAction("accept", text)
        return RepAction("reject", self.own_message(history))

    def fix_off_brand(self, text: str) -> str:
        """Replace the brand's avoided words (or drop them) and tidy the spacing."""
        if self._off_brand is None:
            return text
        fixes = {k.lower(): v for k, v in self.scenario.rep.off_brand_fixes.items()}
        fixed = self._off_brand.sub(lambda m: fixes.get(m.group(0).lower(), ""), text)
        fixed = re.sub(r"\s+([,.!?])", r"\1", re.sub(r"\s{2,}", " ", fixed)).strip()
        return fixed or text

    def own_message(self, history: Sequence[Turn]) -> str:
        """The rep's own words: a good message with probability `own_quality`, else a poor one."""
        rep = self.scenario.rep
        if self.rng.random() >= rep.own_quality:
            return self.rng.choice(rep.poor_messages)
        last = next((text for role, text in reversed(history) if role == "customer"), "")
        answer = self.scenario.known_answer(last) if self.rng.random() < rep.knows_answer else None
        asked = any(
            is_needs_question(text, self.scenario.needs_phrases)
            for role, text in history
            if role == "business"
        )
        follow_up = self.rng.choice(rep.next_steps if asked else rep.needs_questions)
        return f"{answer} {follow_up}" if answer else follow_up
