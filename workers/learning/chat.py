"""The conversation as the learning code sees it: logged turns and chat messages.

The bottom of the import graph: the prompt builder of the API (services/policies/prompt.py)
and every learning step use these types; nothing here imports the web, the database or torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

ChatRole = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class ChatMessage:
    role: ChatRole
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class Turn:
    """One logged message of the state: role is 'customer' or 'business'."""

    role: str
    text: str


def chat_turns(turns: Sequence[Turn]) -> list[ChatMessage]:
    """Map the log to chat roles, merging consecutive messages of one side (templates want
    alternation)."""
    merged: list[ChatMessage] = []
    for turn in turns:
        role: ChatRole = "user" if turn.role == "customer" else "assistant"
        if merged and merged[-1].role == role:
            merged[-1] = ChatMessage(role, merged[-1].content + "\n" + turn.text)
        else:
            merged.append(ChatMessage(role, turn.text))
    return merged


def prompt_messages(system: str | None, state: Sequence[Turn]) -> list[ChatMessage]:
    """The chat prompt of a decision: the business's system prompt, then the state's turns."""
    head = [ChatMessage("system", system)] if system else []
    return head + chat_turns(state)
