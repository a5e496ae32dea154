"""Preferences from the log, for the offline improvement steps: pairs of whole conversations
(DMPO, workers/learning/dmpo.py) and a business's edits of suggestions (DPO, dpo.py).

A logged conversation is a sequence of turns in which consecutive business messages form one
business turn, cut after the business turn that preceded the outcome (the episode ends there).
Each business turn is a decision: its state is the turns before it, its action what the
business sent. No torch here.

The pairing rule (`pair_conversations`), for DMPO's (winner, loser) trajectories from one
starting state:

* Only conversations of one business (one system prompt) are paired, and only one that reached
  the outcome (the winner) with one that did not (the loser).
* The pair's starting state is the longest prefix of turns the two share (the state where they
  diverge); each trajectory is its business turns from there on. Turns before it are identical
  on both sides and would cancel.
* If the customers' openings (the customer turns before the first business turn) differ, the
  two start from different states; they are paired only if the openings' word similarity is at
  least `opening_similarity` (a similar opening: the same situation, worded differently).
* Candidates are taken greedily, the longest shared prefix first, then the most similar
  opening, then by conversation ids (deterministic); a conversation joins at most
  `max_pairs_per_conversation` pairs.
"""

from __future__ import annotations

import difflib
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from workers.learning.chat import Turn

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def word_similarity(a: str, b: str) -> float:
    """Word-level similarity in [0, 1] (difflib ratio over lower-cased word/punctuation tokens)."""
    left, right = _WORD.findall(a.lower()), _WORD.findall(b.lower())
    if not left and not right:
        return 1.0
    return difflib.SequenceMatcher(None, left, right, autojunk=False).ratio()


@dataclass(frozen=True)
class LoggedConversation:
    """An ended conversation as the preference steps read it."""

    conversation_id: str
    group: str  # the business: conversations are paired within one group only
    system: str | None
    turns: tuple[Turn, ...]  # business messages merged per turn; cut after the outcome's turn
    outcome: int  # 1: reached the outcome

    def decisions(self, start: int = 0) -> list[int]:
        """Indices of the business turns at or after `start`."""
        return [i for i, t in enumerate(self.turns) if t.role == "business" and i >= start]

    def opening(self) -> str:
        """The customer's words before the first business turn."""
        words = []
        for turn in self.turns:
            if turn.role == "business":
                break
            words.append(turn.text)
        return "\n".join(words)


@dataclass(frozen=True)
class Trajectory:
    """A conversation's business turns from `start` on: (state, action) per turn."""

    conversation: LoggedConversation
    start: int

    def steps(self, max_turns: int | None = None) -> list[tuple[tuple[Turn, ...], str]]:
        turns = self.conversation.turns
        indices = self.conversation.decisions(self.start)[:max_turns]
        return [(turns[:i], turns[i].text) for i in indices]


@dataclass(frozen=True)
class PreferencePair:
    """A winning and a losing trajectory from one starting state (or similar openings)."""

    chosen: Trajectory
    rejected: Trajectory
    shared_turns: int  # turns both share before they diverge
    opening_similarity: float  # 1.0 when the openings are the same


def shared_prefix(a: Sequence[Turn], b: Sequence[Turn]) -> int:
    """How many leading turns two conversations have in common (role and text)."""
    n = 0
    for left, right in zip(a, b, strict=False):
        if left != right:
            break
        n += 1
    return n


def pair_conversations(
    conversations: Sequence[LoggedConversation],
    *,
    opening_similarity: float,
    max_pairs_per_conversation: int,
) -> list[PreferencePair]:
    """(winner, loser) pairs by the rule in this module's docstring."""
    groups: dict[str, list[LoggedConversation]] = defaultdict(list)
    for conversation in conversations:
        groups[conversation.group].append(conversation)
    candidates: list[tuple[int, float, str, str, LoggedConversation, LoggedConversation]] = []
    for members in groups.values():
        winners = [c for c in members if c.outcome and c.decisions()]
        losers = [c for c in members if not c.outcome and c.decisions()]
        openings = {c.conversation_id: c.opening() for c in members}
        for w in winners:
            for lo in losers:
                shared = shared_prefix(w.turns, lo.turns)
                if shared >= len(w.turns) or shared >= len(lo.turns):
                    continue  # one is a prefix of the other: nothing left to compare
                opening_w, opening_l = openings[w.conversation_id], openings[lo.conversation_id]
                if opening_w == opening_l:
                    similarity = 1.0
                else:
                    similarity = word_similarity(opening_w, opening_l)
                    if similarity < opening_similarity:
                        continue
                if not w.decisions(shared) or not lo.decisions(shared):
                    continue
                candidates.append(
                    (shared, similarity, w.conversation_id, lo.conversation_id, w, lo)
                )
    candidates.sort(key=lambda c: (-c[0], -c[1], c[2], c[3]))
    used: dict[str, int] = defaultdict(int)
    pairs = []
    for shared, similarity, w_id, l_id, w, lo in candidates:
        if used[w_id] >= max_pairs_per_conversation or used[l_id] >= max_pairs_per_conversation:
            continue
        used[w_id] += 1
        used[l_id] += 1
        pairs.append(
            PreferencePair(Trajectory(w, shared), Trajectory(lo, shared), shared, similarity)
        )
    return pairs


@dataclass(frozen=True)
class EditPair:
    """A suggestion the business edited or replaced: what it sent is preferred at that state."""

    conversation_id: str
    system: str | None
    state: tuple[Turn, ...]
    chosen: str  # the business's turn as sent
    rejected: str  # the suggestion
    relation: str  # "edited" | "rejected"
    outcome: int

    def as_record(self) -> dict[str, object]:
        return {
            "conversation_id": self.conversation_id,
            "system": self.system,
            "state": [[t.role, t.text] for t in self.state],
            "chosen": self.chosen,
            "rejected": self.rejected,
            "relation": self.relation,
            "outcome": self.outcome,
        }

    @classmethod
    def from_record(cls, record: dict[str, object]) -> EditPair:
        state = record["state"]
        assert isinstance(state, list)
        return cls(
            conversation_id=str(record["conversation_id"]),
            system=None if record["system"] is None else str(record["system"]),
            state=tuple(Turn(str(role), str(text)) for role, text in state),
            chosen=str(record["chosen"]),
            rejected=str(record["rejected"]),
            relation=str(record["relation"]),
            outcome=int(str(record["outcome"])),
        )


def conversation_record(conversation: LoggedConversation) -> dict[str, object]:
    return {
        "conversation_id": conversation.conversation_id,
        "group": conversation.group,
        "system": conversation.system,
        "turns": [[t.role, t.text] for t in conversation.turns],
        "outcome": conversation.outcome,
    }


def conversation_from_record(record: dict[str, object]) -> LoggedConversation:
    turns = record["turns"]
    assert isinstance(turns, list)
    return LoggedConversation(
        conversation_id=str(record["conversation_id"]),
        group=str(record["group"]),
        system=None if record["system"] is None else str(record["system"]),
        turns=tuple(Turn(str(role), str(text)) for role, text in turns),
        outcome=int(str(record["outcome"])),
    )
