from hypothesis import given
from hypothesis import strategies as st

from services.conversations.classification import classify_reply, edit_similarity
from services.conversations.models import Relation


def test_verbatim_up_to_whitespace_is_accepted() -> None:
    relation, similarity = classify_reply(
        "Happy to help!  When works for you?",
        " Happy to help! When works\nfor you? ",
        threshold=0.5,
    )
    assert relation is Relation.ACCEPTED
    assert similarity == 1.0


def test_small_edit_is_edited_and_rewrite_is_rejected() -> None:
    suggested = "We can come by on Tuesday at 10am to measure the kitchen."
    edited, sim_edit = classify_reply(
        suggested, "We can come by on Wednesday at 10am to measure the kitchen.", threshold=0.5
    )
    rejected, sim_reject = classify_reply(
        suggested, "Sorry, we are fully booked this month.", threshold=0.5
    )
    assert edited is Relation.EDITED and sim_edit is not None and 0.8 < sim_edit < 1.0
    assert rejected is Relation.REJECTED and sim_reject is not None and sim_reject < 0.3


def test_abstained_suggestion_has_no_similarity() -> None:
    assert classify_reply(None, "anything", threshold=0.5) == (Relation.ABSTAINED, None)


def test_threshold_decides_between_edit_and_reject() -> None:
    a, b = "one two three four", "one two five six"
    similarity = edit_similarity(a, b)
    assert similarity == 0.5
    assert classify_reply(a, b, threshold=0.5)[0] is Relation.EDITED
    assert classify_reply(a, b, threshold=0.51)[0] is Relation.REJECTED


@given(st.text(max_size=60), st.text(max_size=60))
def test_similarity_is_bounded_and_one_on_identity(a: str, b: str) -> None:
    assert 0.0 <= edit_similarity(a, b) <= 1.0
    assert edit_similarity(a, a) == 1.0
