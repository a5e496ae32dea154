"""Every Prometheus metric of the API process, declared in one place. Labels stay bounded."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from services.conversations.models import Message

HTTP_REQUESTS = Counter(
    "outcomeloop_http_requests_total",
    "HTTP requests by route template, method and status class.",
    ["route", "method", "status"],
)
HTTP_LATENCY = Histogram(
    "outcomeloop_http_request_seconds",
    "HTTP request latency by route template and method.",
    ["route", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
MESSAGES = Counter("outcomeloop_messages_total", "Messages appended to conversations.", ["role"])
SUGGESTION_REPLIES = Counter(
    "outcomeloop_suggestion_replies_total",
    "Business messages that answered a suggestion, by arm and how they relate to it.",
    ["arm", "relation"],
)
SUGGESTIONS = Counter(
    "outcomeloop_suggestions_total",
    "Suggestion requests by arm, backend and result (ok, abstain, fallback, error).",
    ["arm", "backend", "result"],
)
SUGGESTION_LATENCY = Histogram(
    "outcomeloop_suggestion_seconds",
    "Time to generate a suggestion (prompt building and the backend), by arm and backend.",
    ["arm", "backend"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60),
)
OUTCOMES = Counter("outcomeloop_outcomes_total", "Outcomes recorded.")
CONVERSATIONS_ENDED = Counter(
    "outcomeloop_conversations_ended_total", "Conversations closed, by end reason.", ["reason"]
)


def record_message(message: Message, arm: str | None) -> None:
    MESSAGES.labels(role=message.role).inc()
    if message.suggestion_relation is not None:
        SUGGESTION_REPLIES.labels(arm=arm or "none", relation=message.suggestion_relation).inc()
