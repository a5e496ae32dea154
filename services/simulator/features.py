"""What a simulated customer (and rep) reads in a business message: small pure functions.

Each feature takes the message text and, where it needs context, the conversation before it
(a sequence of `(role, text)` with role "customer" or "business"), and returns a float in
[0, 1] (0 = absent). `extract_features` returns them all as one dict keyed by `FEATURE_NAMES`;
scenarios weigh them (services/simulator/scenarios.py). Matching is plain lower-cased word and
phrase matching on purpose: cheap, deterministic and easy to reason about when tuning.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from functools import lru_cache

Turn = tuple[str, str]  # (role, text); role is "customer" or "business"

FEATURE_NAMES: tuple[str, ...] = (
    "asks_needs_early",
    "answers_question",
    "ignores_question",
    "next_step",
    "price_before_need",
    "too_short",
    "too_long",
    "polite",
    "pushy",
    "rude",
    "contradiction",
    "emoji",
    "off_brand",
    "garbled",
)

# A needs question is about the customer's situation; scenarios add their own words
# ("square meters", "team") through `extra_needs_phrases`.
NEEDS_PHRASES: tuple[str, ...] = (
    "what would you like",
    "what are you looking for",
    "what do you need",
    "what is your",
    "what's your",
    "what kind",
    "what type",
    "what size",
    "how big",
    "how large",
    "how many",
    "tell me more",
    "tell me about",
    "your current",
    "currently",
    "when do you need",
    "timeline",
    "goal",
    "use it for",
)
PRICE_PHRASES: tuple[str, ...] = (
    "price",
    "prices",
    "pricing",
    "priced",
    "cost",
    "costs",
    "how much",
    "expensive",
    "fee",
    "fees",
    "discount",
    "euro",
    "euros",
    "dollar",
    "dollars",
    "per month",
    "per user",
    "per seat",
)
NEXT_STEP_PHRASES: tuple[str, ...] = (
    "book",
    "booking",
    "visit",
    "call",
    "schedule",
    "appointment",
    "meeting",
    "trial",
    "demo",
    "sign up",
    "set up",
    "come by",
    "stop by",
)
TIME_PHRASES: tuple[str, ...] = (
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
    "today",
    "tomorrow",
    "tonight",
    "this week",
    "next week",
    "morning",
    "afternoon",
    "evening",
    "o'clock",
)
POLITE_PHRASES: tuple[str, ...] = (
    "please",
    "thanks",
    "thank you",
    "happy to",
    "glad to",
    "appreciate",
    "sorry",
    "of course",
)
HARD_SELL_PHRASES: tuple[str, ...] = (
    "buy now",
    "order now",
    "sign now",
    "act now",
    "act fast",
    "hurry",
    "limited",
    "today only",
    "only today",
    "don't miss",
    "last chance",
    "best price",
    "best deal",
    "offer ends",
    "right now",
    "guaranteed",
    "must",
)
RUDE_PHRASES: tuple[str, ...] = (
    "whatever",
    "obviously",
    "as i said",
    "i already told you",
    "not my problem",
    "calm down",
    "take it or leave it",
    "if you can't afford",
    "just buy",
    "trust me",
)
_STOPWORDS_TEXT = (
    "a an the and or but if of to in on at for with from by about as is are was were be been "
    "do does did done can could would will shall should may might must have has had i me my we "
    "our you your it its this that these those there here what which who whom when where why "
    "how much many any some just also so than then very really please hi hello hey yes no not "
    "ok okay get got there's it's i'm we're you're"
)
STOPWORDS: frozenset[str] = frozenset(_STOPWORDS_TEXT.split())

EARLY_BUSINESS_TURNS = 2  # "early" = among the business's first two messages
SHORT_WORDS = 3  # fewer words than this is too short to be helpful
LONG_WORDS = 45  # more words than this starts to be too long; twice as many is fully too long

_WORDS = re.compile(r"[a-z0-9']+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")
_MONEY_SYMBOL = re.compile(r"[$€£]\s?\d")
_CLOCK = re.compile(r"\b\d{1,2}(?::\d{2})?\s?(?:am|pm)\b|\b\d{1,2}:\d{2}\b")
_REPEATED_CHUNK = re.compile(r"(\w{2,}?)\1{2,}")
_LOOKS_LIKE_A_WORD = re.compile(r"^\W*(?:[A-Za-z][A-Za-z'-]*|\d[\w,.:%-]*)\W*$")
_EMOJI = re.compile(r"[\U0001F300-\U0001FAFF\u2600-\u27BF]|(?<!\w)[:;]-?[)D(P](?!\w)")


@lru_cache(maxsize=256)
def _phrase_pattern(phrases: tuple[str, ...]) -> re.Pattern[str]:
    # Longest first so "how much" wins over "how"; ties by text, never by set order.
    alternatives = sorted({re.escape(p.lower()) for p in phrases}, key=lambda p: (-len(p), p))
    if not alternatives:
        return re.compile(r"(?!x)x")  # matches nothing
    return re.compile(r"(?<![\w'])(?:" + "|".join(alternatives) + r")(?![\w'])")


_PRICE = _phrase_pattern(PRICE_PHRASES)
_NEXT_STEP = _phrase_pattern(NEXT_STEP_PHRASES)
_TIME = _phrase_pattern(TIME_PHRASES)
_POLITE = _phrase_pattern(POLITE_PHRASES)
_HARD_SELL = _phrase_pattern(HARD_SELL_PHRASES)
_RUDE = _phrase_pattern(RUDE_PHRASES)


def count_phrases(text: str, phrases: Sequence[str]) -> int:
    """Occurrences of whole-word phrases in `text` (case-insensitive)."""
    return len(_phrase_pattern(tuple(phrases)).findall(text.lower()))


def _count(pattern: re.Pattern[str], text: str) -> int:
    return len(pattern.findall(text.lower()))


def words(text: str) -> list[str]:
    """Lower-cased words of `text`."""
    return _WORDS.findall(text.lower())


def stem(word: str) -> str:
    """A crude stem (plural s off, first five letters) so 'takes'/'take', 'renovation'/'renovate'
    match."""
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        word = word[:-1]
    return word[:5]


def key_words(text: str) -> set[str]:
    """Stems of the content words of `text` (stopwords and short words left out)."""
    return {stem(w) for w in words(text) if len(w) > 2 and w not in STOPWORDS}


def sentences(text: str) -> list[str]:
    """The sentences of `text` (split after . ! or ? followed by a space)."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def questions(text: str) -> list[str]:
    """The question sentences of `text`."""
    return [s for s in sentences(text) if s.endswith("?") and s.strip(" ?")]


def talks_price(text: str) -> bool:
    """Mentions a price word or a currency amount."""
    return bool(_count(_PRICE, text) or _MONEY_SYMBOL.search(text))


def money_amounts(text: str) -> set[float]:
    """Numbers stated in sentences that talk about price (e.g. {8000.0, 15000.0})."""
    amounts: set[float] = set()
    for sentence in sentences(text):
        if talks_price(sentence):
            amounts.update(float(n.replace(",", "")) for n in _NUMBER.findall(sentence))
    return amounts


def is_needs_question(text: str, extra_needs_phrases: Sequence[str] = ()) -> bool:
    """A question about the customer's situation (not a price or hard-sell question)."""
    needs = _phrase_pattern((*NEEDS_PHRASES, *extra_needs_phrases))
    for question in questions(text):
        lowered = question.lower()
        if needs.search(lowered) and not talks_price(question) and not _count(_HARD_SELL, lowered):
            return True
    return False


def _business_texts(history: Sequence[Turn]) -> list[str]:
    return [text for role, text in history if role == "business"]


def _last_customer_text(history: Sequence[Turn]) -> str | None:
    for role, text in reversed(history):
        if role == "customer":
            return text
    return None


def asks_needs_early(
    text: str, history: Sequence[Turn], extra_needs_phrases: Sequence[str] = ()
) -> float:
    """1 if this is among the business's first messages and asks about the customer's needs."""
    early = len(_business_texts(history)) < EARLY_BUSINESS_TURNS
    return 1.0 if early and is_needs_question(text, extra_needs_phrases) else 0.0


def answers_question(text: str, history: Sequence[Turn]) -> float:
    """How well `text` answers the customer's last message if it asked something, in [0, 1].

    The share of the question's key words that the answer uses; a price question counts as
    answered only with an amount. 0 when the customer's last message asked nothing.
    """
    last = _last_customer_text(history)
    asked = questions(last) if last else []
    if not asked:
        return 0.0
    question = " ".join(asked)
    wanted = key_words(question)
    overlap = len(wanted & key_words(text)) / len(wanted) if wanted else 0.0
    if talks_price(question):
        return 1.0 if money_amounts(text) else min(overlap, 0.3)
    return overlap


def ignores_question(text: str, history: Sequence[Turn]) -> float:
    """1 if the customer's last message asked something and `text` does not answer it."""
    last = _last_customer_text(history)
    if not last or not questions(last):
        return 0.0
    return 1.0 if answers_question(text, history) < 0.5 else 0.0


def next_step(text: str) -> float:
    """A concrete next step: 0.5 for an action (book, visit, call, trial, demo...), 1 with a
    day or time too."""
    if not _count(_NEXT_STEP, text):
        return 0.0
    lowered = text.lower()
    has_time = bool(_count(_TIME, lowered) or _CLOCK.search(lowered))
    return 1.0 if has_time else 0.5


def price_before_need(
    text: str, history: Sequence[Turn], extra_needs_phrases: Sequence[str] = ()
) -> float:
    """1 if `text` talks price while the business never asked about needs and the customer's
    last message did not ask about price (answering a price question is not pushing)."""
    if not talks_price(text):
        return 0.0
    last = _last_customer_text(history)
    if last and any(talks_price(q) for q in questions(last)):
        return 0.0
    earlier = [*_business_texts(history), text]
    if any(is_needs_question(t, extra_needs_phrases) for t in earlier):
        return 0.0
    return 1.0


def too_short(text: str) -> float:
    """1 for a message of fewer than SHORT_WORDS words."""
    return 1.0 if len(words(text)) < SHORT_WORDS else 0.0


def too_long(text: str) -> float:
    """0 up to LONG_WORDS words, rising linearly to 1 at twice as many."""
    n = len(words(text))
    return min(1.0, max(0.0, (n - LONG_WORDS) / LONG_WORDS))


def polite(text: str) -> float:
    """0.5 per polite phrase (please, thanks, happy to, ...), at most 1."""
    return min(1.0, 0.5 * _count(_POLITE, text))


def pushy(text: str, history: Sequence[Turn]) -> float:
    """Hard-sell words in `text`, worse when repeated here or in earlier business messages.

    0 without a hard-sell word here; otherwise (hits here + half the hits before) / 2, at most 1.
    """
    hits = _count(_HARD_SELL, text) + text.count("!!")
    if not hits:
        return 0.0
    before = sum(_count(_HARD_SELL, t) for t in _business_texts(history))
    return min(1.0, (hits + 0.5 * before) / 2)


def rude(text: str) -> float:
    """0.5 per dismissive phrase (whatever, obviously, as I said, ...), at most 1."""
    return min(1.0, 0.5 * _count(_RUDE, text))


def contradiction(text: str, history: Sequence[Turn]) -> float:
    """1 if `text` states a price amount the business has not stated before, when it has
    stated one."""
    before: set[float] = set()
    for earlier in _business_texts(history):
        before |= money_amounts(earlier)
    now = money_amounts(text)
    return 1.0 if before and now and not now <= before else 0.0


def emoji(text: str) -> float:
    """0.5 per emoji or emoticon, at most 1."""
    return min(1.0, 0.5 * len(_EMOJI.findall(text)))


def off_brand(text: str, off_brand_words: Sequence[str]) -> float:
    """1 if `text` uses a word the brand avoids (configured per scenario)."""
    return 1.0 if off_brand_words and count_phrases(text, off_brand_words) else 0.0


def garbled(text: str) -> float:
    """1 for text no person would send: broken characters, a chunk repeated over and over
    ("WeWeWe"), or mostly non-words."""
    if "\ufffd" in text or any(unicodedata.category(c) == "Cc" and c not in "\n\t" for c in text):
        return 1.0
    if _REPEATED_CHUNK.search(text):
        return 1.0
    tokens = [t for t in text.split() if not _EMOJI.fullmatch(t)]
    wordlike = sum(1 for t in tokens if _LOOKS_LIKE_A_WORD.match(t))
    return 1.0 if tokens and wordlike < 0.5 * len(tokens) else 0.0


def extract_features(
    text: str,
    history: Sequence[Turn],
    *,
    off_brand_words: Sequence[str] = (),
    extra_needs_phrases: Sequence[str] = (),
) -> dict[str, float]:
    """All features of the business message `text` sent after `history`, keyed by
    FEATURE_NAMES."""
    return {
        "asks_needs_early": asks_needs_early(text, history, extra_needs_phrases),
        "answers_question": answers_question(text, history),
        "ignores_question": ignores_question(text, history),
        "next_step": next_step(text),
        "price_before_need": price_before_need(text, history, extra_needs_phrases),
        "too_short": too_short(text),
        "too_long": too_long(text),
        "polite": polite(text),
        "pushy": pushy(text, history),
        "rude": rude(text),
        "contradiction": contradiction(text, history),
        "emoji": emoji(text),
        "off_brand": off_brand(text, off_brand_words),
        "garbled": garbled(text),
    }
