"""State -> chat prompt: the one place that decides what the policy sees.

The prompt is the business's system prompt (plus an exploration persona, if one was drawn),
then the conversation so far with the customer as `user` and the business as `assistant`.
Earlier *suggestions* do not enter the prompt: the customer never saw them, and what the
business actually sent already reflects whether they were used. They stay in the log (state
s_i of the paper includes them) for Q features and off-policy correction.

Abstaining is a real action: the policy answers exactly ABSTAIN_MARKER, which the API returns
as `"text": null`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from workers.learning.chat import ChatMessage as ChatMessage
from workers.learning.chat import ChatRole as ChatRole
from workers.learning.chat import Turn as Turn
from workers.learning.chat import chat_turns as chat_turns

ABSTAIN_MARKER = "[ABSTAIN]"

DEFAULT_SYSTEM_PROMPT = (
    "You write the next message of {business}, a business chatting with a customer. "
    "Be helpful, honest and brief, move the conversation toward a concrete next step, "
    "and never invent prices or facts you were not given."
)
ABSTAIN_INSTRUCTION = (
    f"If the business should not send anything now, answer exactly {ABSTAIN_MARKER}."
)


@dataclass(frozen=True)
class Prompt:
    messages: list[ChatMessage]
    dropped_turns: int  # oldest turns left out to fit the context window

    @property
    def truncated(self) -> bool:
        return self.dropped_turns > 0


def system_prompt(
    *, business_name: str, business_prompt: str | None, persona_instruction: str | None
) -> str:
    parts = [business_prompt or DEFAULT_SYSTEM_PROMPT.format(business=business_name)]
    if persona_instruction:
        parts.append(persona_instruction)
    parts.append(ABSTAIN_INSTRUCTION)
    return " ".join(parts)


def build_prompt(
    turns: Sequence[Turn],
    *,
    system: str,
    count_tokens: Callable[[list[ChatMessage]], int],
    max_prompt_tokens: int,
) -> Prompt:
    """The chat prompt for this state, dropping the oldest turns until it fits.

    The system prompt and the latest turn are always kept; if even they do not fit, the
    latest turn's text is cut from its start.
    """
    body = chat_turns(turns)
    head = [ChatMessage("system", system)]
    dropped = 0
    while len(body) > 1 and count_tokens(head + body) > max_prompt_tokens:
        body = body[1:]
        dropped += 1
    # A leading assistant turn after truncation would read as the business opening the chat,
    # which is fine; but keep at least the latest turn, cut if it alone is too long.
    if body and count_tokens(head + body) > max_prompt_tokens:
        last = body[-1]
        text = last.content
        while len(text) > 1 and count_tokens([*head, ChatMessage(last.role, text)]) > (
            max_prompt_tokens
        ):
            text = text[len(text) // 4 :]
        body = [ChatMessage(last.role, text)]
        dropped = max(dropped, 1)
    return Prompt(messages=head + body, dropped_turns=dropped)


def parse_completion(text: str) -> str | None:
    """The suggestion text, or None when the policy abstained (or produced nothing). NUL
    characters, which a model can emit and PostgreSQL text cannot store, are dropped."""
    cleaned = text.replace("\x00", "").strip()
    if not cleaned or cleaned.startswith(ABSTAIN_MARKER):
        return None
    return cleaned
