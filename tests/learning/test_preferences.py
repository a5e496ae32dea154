"""The pairing rule for DMPO, by hand: one business only, a winner with a loser, from the state
where they diverge, similar openings only, each conversation in a bounded number of pairs."""

from __future__ import annotations

from workers.learning.chat import Turn
from workers.learning.preferences import (
    LoggedConversation,
    conversation_from_record,
    conversation_record,
    pair_conversations,
    shared_prefix,
    word_similarity,
)


def conv(cid: str, outcome: int, *turns: str, group: str = "acme") -> LoggedConversation:
    """Turns alternate customer, business, customer, ... from the first."""
    roles = ["customer", "business"]
    return LoggedConversation(
        conversation_id=cid,
        group=group,
        system=f"system of {group}",
        turns=tuple(Turn(roles[i % 2], t) for i, t in enumerate(turns)),
        outcome=outcome,
    )


def ids(pairs: list) -> list[tuple[str, str, int]]:  # type: ignore[type-arg]
    return [
        (
            p.chosen.conversation.conversation_id,
            p.rejected.conversation.conversation_id,
            p.shared_turns,
        )
        for p in pairs
    ]


def test_word_similarity() -> None:
    assert word_similarity("Hi there!", "hi   there !") == 1.0
    assert word_similarity("", "") == 1.0
    assert word_similarity("kitchen quote", "") == 0.0
    # difflib ratio over [do, you, renovate, kitchens, ?] vs [do, you, paint, kitchens, ?]
    assert word_similarity("Do you renovate kitchens?", "Do you paint kitchens?") == 0.8


def test_pairs_start_where_the_conversations_diverge() -> None:
    winner = conv("w", 1, "Do you renovate kitchens?", "Yes, shall we book a visit?", "Sure")
    loser = conv("l", 0, "Do you renovate kitchens?", "Please wait.", "Never mind")
    [pair] = pair_conversations(
        [winner, loser], opening_similarity=0.5, max_pairs_per_conversation=1
    )
    assert pair.shared_turns == 1 and pair.opening_similarity == 1.0
    assert pair.chosen.steps() == [
        ((Turn("customer", "Do you renovate kitchens?"),), "Yes, shall we book a visit?")
    ]
    assert pair.rejected.steps() == [
        ((Turn("customer", "Do you renovate kitchens?"),), "Please wait.")
    ]
    # diverging at the customer's second message: the first business turn is shared and left out
    w2 = conv("w2", 1, "Hi", "Hello, how can I help?", "A kitchen", "Book Monday?")
    l2 = conv("l2", 0, "Hi", "Hello, how can I help?", "A bathroom", "We are busy.", "Bye", "Ok.")
    [pair] = pair_conversations([w2, l2], opening_similarity=0.5, max_pairs_per_conversation=1)
    assert pair.shared_turns == 2
    assert [a for _, a in pair.chosen.steps()] == ["Book Monday?"]
    assert [a for _, a in pair.rejected.steps()] == ["We are busy.", "Ok."]
    assert [len(s) for s, _ in pair.rejected.steps()] == [3, 5]  # states include the history


def test_pairs_need_a_winner_and_a_loser_of_one_business_with_similar_openings() -> None:
    a_win = conv("a_win", 1, "Do you renovate kitchens?", "Yes!")
    b_lose = conv("b_lose", 0, "Do you renovate kitchens?", "No.", group="other")
    a_win2 = conv("a_win2", 1, "Do you renovate kitchens?", "Sure!")
    assert (
        pair_conversations(
            [a_win, b_lose, a_win2], opening_similarity=0.0, max_pairs_per_conversation=5
        )
        == []
    )
    a_far = conv("a_far", 0, "Where is my refund for the broken sofa", "Checking.")
    a_near = conv("a_near", 0, "Do you paint kitchens?", "No.")
    pairs = pair_conversations(
        [a_win, a_far, a_near], opening_similarity=0.5, max_pairs_per_conversation=5
    )
    assert ids(pairs) == [("a_win", "a_near", 0)]  # different openings: similar ones only
    assert pairs[0].opening_similarity == 0.8
    everything = pair_conversations(
        [a_win, a_far, a_near], opening_similarity=0.0, max_pairs_per_conversation=5
    )
    assert sorted(ids(everything)) == [("a_win", "a_far", 0), ("a_win", "a_near", 0)]


def test_pairs_are_greedy_longest_shared_first_and_capped_per_conversation() -> None:
    w = conv("w", 1, "Hi", "Hello", "Kitchen", "Book?")
    l_long = conv("l_long", 0, "Hi", "Hello", "Kitchen", "Busy.")  # shares 3 turns with w
    l_short = conv("l_short", 0, "Hi", "Go away.")  # shares 1
    w2 = conv("w2", 1, "Hi", "Welcome!")
    pairs = pair_conversations(
        [l_short, w2, w, l_long], opening_similarity=0.5, max_pairs_per_conversation=1
    )
    assert ids(pairs) == [("w", "l_long", 3), ("w2", "l_short", 1)]
    two = pair_conversations(
        [l_short, w2, w, l_long], opening_similarity=0.5, max_pairs_per_conversation=2
    )
    assert ids(two) == [
        ("w", "l_long", 3),
        ("w", "l_short", 1),
        ("w2", "l_long", 1),
        ("w2", "l_short", 1),
    ]
    # one conversation that is the other's prefix leaves nothing to compare
    prefix = conv("prefix", 0, "Hi", "Hello")
    assert (
        pair_conversations([w, prefix], opening_similarity=0.0, max_pairs_per_conversation=1) == []
    )


def test_conversation_records_round_trip() -> None:
    c = conv("c", 1, "Hi", "Hello")
    assert conversation_from_record(conversation_record(c)) == c
    assert shared_prefix(c.turns, c.turns) == 2
