"""Every Prometheus metric of the API process, declared in one place. Labels stay bounded."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session

from services.audit import repository as audit
from services.conversations.models import Message
from services.experiments import repository as experiments
from services.experiments.report import sample_ratio_check
from services.iterations import repository as iterations

log = logging.getLogger(__name__)

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
# By experiment and arm (bounded: arms of experiments, not conversations), so that the outcome
# rate per arm is rate(outcomes) / rate(ended) in Prometheus. "none": no arm served it.
OUTCOMES = Counter(
    "outcomeloop_outcomes_total", "Outcomes recorded, by experiment and arm.", ["experiment", "arm"]
)
CONVERSATIONS_ENDED = Counter(
    "outcomeloop_conversations_ended_total",
    "Conversations closed, by experiment, arm and end reason.",
    ["experiment", "arm", "reason"],
)


def record_message(message: Message, arm: str | None) -> None:
    MESSAGES.labels(role=message.role).inc()
    if message.suggestion_relation is not None:
        SUGGESTION_REPLIES.labels(arm=arm or "none", relation=message.suggestion_relation).inc()


# The latest iteration's metrics that say whether Q and the candidate can be trusted.
PIPELINE_METRICS = (
    "q_auc",
    "q_rank_corr",
    "q_rank_corr_lo",
    "check_gain",
    "check_gain_lo",
    "estimate_dr",
    "kl_ref",
)


class PipelineCollector(Collector):
    """The policy-iteration pipeline, read from the database at scrape time (so every API
    process reports the same numbers): iterations by status, the latest duration of each step,
    and the latest iteration's Q and check metrics."""

    def __init__(self) -> None:
        self.sessions: Callable[[], Session] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.sessions is None:
            return
        try:
            with self.sessions() as session:
                statuses = iterations.status_counts(session)
                durations = iterations.latest_step_durations(session)
                latest: dict[str, Any] = iterations.latest_metrics(session)
                decisions = audit.action_counts(session)
                srm = {}
                for experiment in experiments.list_experiments(session, status="running"):
                    if len(experiment.arms) < 2:
                        continue
                    units = experiments.arm_units(session, experiment_id=experiment.id)
                    srm[experiment.id] = sample_ratio_check(session, experiment, units).p_value
        except Exception as exc:  # a scrape never fails the API; the gap shows in Grafana
            log.warning("pipeline metrics unavailable: %s", exc)
            return
        by_status = GaugeMetricFamily(
            "outcomeloop_iterations", "Policy iterations by status.", labels=["status"]
        )
        for status, count in sorted(statuses.items()):
            by_status.add_metric([status], count)
        yield by_status
        steps = GaugeMetricFamily(
            "outcomeloop_iteration_step_seconds",
            "Seconds the most recently finished run of each pipeline step took.",
            labels=["step"],
        )
        for step, seconds in sorted(durations.items()):
            steps.add_metric([step], seconds)
        yield steps
        values = GaugeMetricFamily(
            "outcomeloop_latest_iteration_metric",
            "Q and candidate-check metrics of the latest iteration that has them.",
            labels=["metric"],
        )
        for name in PIPELINE_METRICS:
            value = latest.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                values.add_metric([name], float(value))
        yield values
        ratio = GaugeMetricFamily(
            "outcomeloop_experiment_srm_p_value",
            "Sample-ratio check of each running experiment with two arms or more: the p-value "
            "of its arms' units against their weights (below 0.001: assignment is broken).",
            labels=["experiment"],
        )
        for experiment_id, p_value in sorted(srm.items()):
            ratio.add_metric([experiment_id], p_value)
        yield ratio
        made = GaugeMetricFamily(
            "outcomeloop_decisions",
            "Operator and guardrail decisions recorded in the audit trail, by action.",
            labels=["action"],
        )
        for action, count in sorted(decisions.items()):
            made.add_metric([action], count)
        yield made


PIPELINE = PipelineCollector()
REGISTRY.register(PIPELINE)
