"""Play simulated conversations: through the real HTTP API, or offline against a Python policy.

Through the API the runner does exactly what a business chat frontend does, with a business
key: create the conversation, log the customer's message, ask for a suggestion, let the rep
send (the suggestion, an edit of it, or its own words) with the `suggestion_id` it answered,
and at the end record the outcome and close. Offline, `simulate_offline` plays the same
dynamics with a Python function in place of the API, for quick checks and hand-written
policies.

Each conversation draws from its own RNGs, seeded by (seed, index, agent): the same seed
replays the same customers, and two policies compared under one seed meet the same personas.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from services.conversations.classification import classify_reply
from services.settings import Settings
from services.simulator.agents import SimulatedCustomer, SimulatedRep
from services.simulator.features import Turn
from services.simulator.scenarios import Scenario

log = logging.getLogger(__name__)

Policy = Callable[[list[Turn]], str | None]
Progress = Callable[[int, int], None]  # (conversations done, conversations in all)

TRANSPORT_ATTEMPTS = 3  # every write carries an idempotency key, so a retry is safe
# Offline replies are classified as the API would with its default threshold.
OFFLINE_EDIT_THRESHOLD: float = Settings.model_fields["edit_similarity_threshold"].default


@dataclass(frozen=True)
class ConversationRecord:
    """How one simulated conversation went."""

    conversation_id: str
    persona: str
    arm: str | None  # of the first suggestion served; None if no suggestion was served
    policy: str | None
    outcome: bool
    end_reason: str  # outcome | customer_left | business_left | timeout
    turns: int  # business turns played (a message or a silence)
    accepted: int  # business messages per relation to the suggestion shown, as classified
    edited: int
    rejected: int
    abstained: int
    silences: int  # turns the rep sent nothing
    suggestion_errors: int  # suggestion requests answered 4xx/5xx (the rep wrote its own)
    transcript: tuple[Turn, ...]
    # Scenario.score of each suggestion shown (abstentions excluded), in order: a diagnostic.
    suggestion_scores: tuple[float, ...] = ()


@dataclass(frozen=True)
class ArmSummary:
    conversations: int
    outcomes: int

    @property
    def rate(self) -> float:
        return self.outcomes / self.conversations if self.conversations else 0.0


@dataclass(frozen=True)
class SimulationReport:
    """All conversations of one run, with outcome rates overall and per arm."""

    scenario: str
    seed: int
    records: tuple[ConversationRecord, ...]

    @property
    def outcome_rate(self) -> float:
        return sum(r.outcome for r in self.records) / len(self.records) if self.records else 0.0

    def by_arm(self) -> dict[str, ArmSummary]:
        """Conversations and outcomes per arm ("none" when no suggestion was served)."""
        counts: dict[str, list[int]] = {}
        for record in self.records:
            seen = counts.setdefault(record.arm or "none", [0, 0])
            seen[0] += 1
            seen[1] += record.outcome
        return {arm: ArmSummary(n, k) for arm, (n, k) in sorted(counts.items())}


class HttpResponse(Protocol):
    @property
    def status_code(self) -> int: ...
    @property
    def text(self) -> str: ...
    def json(self) -> Any: ...


class HttpClient(Protocol):
    """What the runner needs of a client: `httpx.Client(base_url=...)` fits, and so does
    `fastapi.testclient.TestClient` (which is built on another httpx-compatible client)."""

    def post(
        self, url: str, *, json: Any = None, headers: dict[str, str] | None = None
    ) -> HttpResponse: ...


class SimulationError(RuntimeError):
    """The API refused a write the simulator relies on."""


@dataclass(frozen=True)
class _Shown:
    """A suggestion shown to the rep."""

    suggestion_id: str
    text: str | None  # None: the policy abstained
    arm: str | None
    policy: str | None


class _Channel(Protocol):
    """Where a conversation is played: the HTTP API, or offline against a policy function."""

    def open(self, metadata: dict[str, Any]) -> str: ...
    def say(self, role: str, text: str, shown: _Shown | None = None) -> str | None: ...
    def suggest(self, history: list[Turn], turn: int) -> _Shown | None: ...
    def outcome(self, label: str) -> None: ...
    def close(self, reason: str) -> None: ...


class _ApiChannel:
    """One conversation through the HTTP API, as a business chat frontend logs it."""

    def __init__(self, client: HttpClient, api_key: str, client_conversation_id: str) -> None:
        self.client = client
        self.headers = {"Authorization": f"Bearer {api_key}"}
        self.client_conversation_id = client_conversation_id
        self.url = ""
        self.messages = 0

    def _post(self, path: str, body: dict[str, Any]) -> HttpResponse:
        for attempt in range(1, TRANSPORT_ATTEMPTS + 1):
            try:
                return self.client.post(path, json=body, headers=self.headers)
            # A real server is reached through httpx; the in-process TestClient has no network.
            except httpx.TransportError as exc:
                if attempt == TRANSPORT_ATTEMPTS:
                    raise
                log.warning("POST %s failed (%s); retrying", path, exc)
                time.sleep(0.5 * attempt)
        raise AssertionError("unreachable")

    def _write(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self._post(path, body)
        if response.status_code >= 400:
            raise SimulationError(f"POST {path} -> {response.status_code}: {response.text}")
        result: dict[str, Any] = response.json()
        return result

    def open(self, metadata: dict[str, Any]) -> str:
        created = self._write(
            "/v1/conversations",
            {"client_conversation_id": self.client_conversation_id, "metadata": metadata},
        )
        self.url = f"/v1/conversations/{created['id']}"
        return str(created["id"])

    def say(self, role: str, text: str, shown: _Shown | None = None) -> str | None:
        self.messages += 1
        body: dict[str, Any] = {
            "role": role,
            "text": text,
            "client_message_id": f"m{self.messages}",
        }
        if shown is not None:
            body["suggestion_id"] = shown.suggestion_id
        relation = self._write(f"{self.url}/messages", body)["suggestion_relation"]
        return str(relation) if relation is not None else None

    def suggest(self, history: list[Turn], turn: int) -> _Shown | None:
        response = self._post(f"{self.url}/suggestions", {"client_request_id": f"t{turn}"})
        if response.status_code >= 400:
            log.info("no suggestion (%s): %s", response.status_code, response.text[:200])
            return None
        body = response.json()
        return _Shown(body["suggestion_id"], body["text"], body["arm"], body["policy"])

    def outcome(self, label: str) -> None:
        self._write(f"{self.url}/outcome", {"label": label, "client_event_id": "simulator"})

    def close(self, reason: str) -> None:
        self._write(f"{self.url}/close", {"reason": reason})


class _OfflineChannel:
    """One conversation against a policy function; replies are classified as the API would."""

    def __init__(self, policy: Policy, conversation_id: str) -> None:
        self.policy = policy
        self.name = getattr(policy, "__name__", type(policy).__name__)
        self.conversation_id = conversation_id

    def open(self, metadata: dict[str, Any]) -> str:
        return self.conversation_id

    def say(self, role: str, text: str, shown: _Shown | None = None) -> str | None:
        if shown is None:
            return None
        relation, _ = classify_reply(shown.text, text, threshold=OFFLINE_EDIT_THRESHOLD)
        return relation.value

    def suggest(self, history: list[Turn], turn: int) -> _Shown | None:
        text = self.policy(list(history))
        return _Shown(f"{self.conversation_id}-t{turn}", text or None, "offline", self.name)

    def outcome(self, label: str) -> None:
        return None

    def close(self, reason: str) -> None:
        return None


def _play(channel: _Channel, scenario: Scenario, *, seed: int, index: int) -> ConversationRecord:
    """One conversation from the customer's opening to its end."""
    customer = SimulatedCustomer(scenario, random.Random(f"{seed}:{index}:customer"))
    rep = SimulatedRep(scenario, random.Random(f"{seed}:{index}:rep"))
    conversation_id = channel.open(
        {
            "simulator": {
                "scenario": scenario.name,
                "seed": seed,
                "index": index,
                "persona": customer.persona.name,
            }
        }
    )
    history: list[Turn] = []
    counts: Counter[str] = Counter()
    scores: list[float] = []
    arm = policy = None
    text, status = customer.opening(), "continues"
    turns = silent_in_a_row = 0
    while True:
        channel.say("customer", text)
        history.append(("customer", text))
        if status == "converted":
            channel.outcome(scenario.outcome_label)
            end_reason = "outcome"
            break
        if status == "left":
            end_reason = "customer_left"
            break
        if turns >= scenario.max_turns:
            end_reason = "timeout"
            break
        turns += 1
        shown = channel.suggest(history, turns)
        if shown is None:
            counts["suggestion_errors"] += 1
        else:
            if arm is None:
                arm, policy = shown.arm, shown.policy
            if shown.text is not None:
                scores.append(scenario.score(shown.text, history))
        action = rep.respond(shown.text if shown else None, history)
        if action.text is None:
            counts["silences"] += 1
            silent_in_a_row += 1
            if silent_in_a_row >= scenario.rep.max_silences:
                end_reason = "business_left"
                break
            reply = customer.react(None, history)
        else:
            silent_in_a_row = 0
            relation = channel.say("business", action.text, shown)
            if relation is not None:
                counts[relation] += 1
            reply = customer.react(action.text, history)
            history.append(("business", action.text))
        text, status = reply.text, reply.status
    channel.close(end_reason)
    return ConversationRecord(
        conversation_id=conversation_id,
        persona=customer.persona.name,
        arm=arm,
        policy=policy,
        outcome=end_reason == "outcome",
        end_reason=end_reason,
        turns=turns,
        accepted=counts["accepted"],
        edited=counts["edited"],
        rejected=counts["rejected"],
        abstained=counts["abstained"],
        silences=counts["silences"],
        suggestion_errors=counts["suggestion_errors"],
        transcript=tuple(history),
        suggestion_scores=tuple(scores),
    )


def _report(scenario: Scenario, seed: int, records: list[ConversationRecord]) -> SimulationReport:
    report = SimulationReport(scenario.name, seed, tuple(records))
    log.debug(
        "simulated %d %s conversations (seed %d): outcome rate %.3f",
        len(records),
        scenario.name,
        seed,
        report.outcome_rate,
    )
    return report


def run_conversations(
    client: HttpClient,
    api_key: str,
    scenario: Scenario,
    n: int,
    seed: int,
    progress: Progress | None = None,
) -> SimulationReport:
    """Play `n` conversations through the API behind `client` (an `httpx.Client` with a
    base URL, or a `fastapi.testclient.TestClient`) with a business `api_key`; `progress` is
    called with (done, n) after each conversation."""
    run_id = uuid.uuid4().hex[:8]  # conversation ids stay unique when a seed is replayed
    records = []
    for index in range(n):
        channel = _ApiChannel(client, api_key, f"sim-{scenario.name}-{seed}-{run_id}-{index}")
        records.append(_play(channel, scenario, seed=seed, index=index))
        if progress is not None:
            progress(index + 1, n)
    return _report(scenario, seed, records)


def simulate_offline(
    scenario: Scenario, n: int, seed: int, policy: Policy, *, concurrency: int = 1
) -> SimulationReport:
    """Play `n` conversations without HTTP; `policy` maps the conversation so far
    ([(role, text), ...]) to a suggestion, or None to abstain. With concurrency > 1 that many
    conversations are played at once (a policy that batches, such as a served model, is then
    busy); each conversation's RNGs are its own, so the records are the same either way for a
    deterministic policy, in index order."""

    def play(index: int) -> ConversationRecord:
        channel = _OfflineChannel(policy, f"offline-{seed}-{index}")
        return _play(channel, scenario, seed=seed, index=index)

    if concurrency <= 1:
        records = [play(index) for index in range(n)]
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(concurrency, max(n, 1))) as pool:
            records = list(pool.map(play, range(n)))
    return _report(scenario, seed, records)
