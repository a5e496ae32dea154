from services.policies.prompt import (
    ABSTAIN_MARKER,
    ChatMessage,
    Turn,
    build_prompt,
    chat_turns,
    parse_completion,
    system_prompt,
)


def words(messages: list[ChatMessage]) -> int:
    return sum(len(m.content.split()) + 1 for m in messages)


def test_roles_map_and_consecutive_messages_merge() -> None:
    turns = [Turn("business", "Hello!"), Turn("customer", "hi"), Turn("customer", "price?")]
    assert chat_turns(turns) == [
        ChatMessage("assistant", "Hello!"),
        ChatMessage("user", "hi\nprice?"),
    ]


def test_oldest_turns_are_dropped_to_fit_and_system_is_kept() -> None:
    turns = [
        Turn("customer" if i % 2 == 0 else "business", f"message number {i} " * 3)
        for i in range(10)
    ]
    full = build_prompt(turns, system="be brief", count_tokens=words, max_prompt_tokens=10_000)
    assert not full.truncated and len(full.messages) == 11
    cut = build_prompt(turns, system="be brief", count_tokens=words, max_prompt_tokens=40)
    assert cut.truncated and cut.messages[0] == ChatMessage("system", "be brief")
    assert words(cut.messages) <= 40
    assert cut.messages[-1] == full.messages[-1]
    assert cut.dropped_turns == len(full.messages) - len(cut.messages)


def test_a_single_overlong_turn_is_cut_from_its_start() -> None:
    prompt = build_prompt(
        [Turn("customer", "word " * 500 + "final question?")],
        system="s",
        count_tokens=words,
        max_prompt_tokens=50,
    )
    assert prompt.truncated and words(prompt.messages) <= 50
    assert prompt.messages[-1].content.endswith("final question?")


def test_system_prompt_and_abstain_marker() -> None:
    text = system_prompt(business_name="Acme", business_prompt=None, persona_instruction="Be warm.")
    assert "Acme" in text and "Be warm." in text and ABSTAIN_MARKER in text
    assert system_prompt(
        business_name="A", business_prompt="Custom.", persona_instruction=None
    ).startswith("Custom.")
    assert parse_completion(f"  {ABSTAIN_MARKER} ") is None
    assert parse_completion("   ") is None
    assert parse_completion(" Sure, see you Monday! ") == "Sure, see you Monday!"
    assert parse_completion("Sure\x00, see you\x00") == "Sure, see you"
    assert parse_completion("\x00 \x00") is None
