"""The demo's report: a terminal table and a self-contained HTML page with SVG plots."""

from __future__ import annotations

import html
import math
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from services.demo import DemoResult, Phase, ScoreSummary
from services.experiments.report import compare
from services.experiments.statistics import difference_interval, minimum_detectable_effect
from services.simulator.paired import PairedComparison


def _pp(value: float) -> str:
    """A difference of two rates, in percentage points."""
    return f"{value * 100:+.1f} pp"


def ab_difference(phase: Phase) -> str:
    """The A/B's own two arms: treatment minus control in points, with Newcombe's interval."""
    if len(phase.arms) != 2:
        return ""
    control, treatment = phase.arms
    if not control.ended or not treatment.ended:
        return f"A/B {short(control.policy)} vs {short(treatment.policy)}: no ended conversations"
    low, high = difference_interval(
        treatment.outcomes, treatment.ended, control.outcomes, control.ended
    )
    return (
        f"A/B {short(control.policy)} {control.outcome_rate:.1%} (n {control.ended}) vs "
        f"{short(treatment.policy)} {treatment.outcome_rate:.1%} (n {treatment.ended}): "
        f"{_pp(treatment.outcome_rate - control.outcome_rate)} (95% CI {_pp(low)} to {_pp(high)})"
    )


def detectable(phase: Phase) -> str:
    """What an A/B of this size can detect: the lift over the control's rate found with 80%
    power at p < 0.05."""
    if len(phase.arms) != 2:
        return ""
    control, treatment = phase.arms
    lift = minimum_detectable_effect(control.outcome_rate, control.ended, treatment.ended)
    if lift is None:
        return f"at n {control.ended} + {treatment.ended} no lift is reliably detectable"
    return (
        f"at n {control.ended} + {treatment.ended} it detects (80% power) only lifts of "
        f"{_pp(lift)} or more over {control.outcome_rate:.1%}"
    )


def verdict(phase: Phase) -> str:
    """Say plainly whether the new policy did better, worse, or not distinguishably."""
    if len(phase.arms) != 2:
        return ""
    control, treatment = phase.arms
    if not control.ended or not treatment.ended:
        return "not enough ended conversations to compare the arms"
    comparison = compare(treatment, control)  # what GET /v1/experiments/{id}/results reports
    diff, p = comparison.difference, comparison.test.p_value
    direction = "higher" if diff > 0 else "lower"
    if p < 0.05:
        return (
            f"{short(treatment.policy)} reached a {direction} outcome rate than "
            f"{short(control.policy)} ({_pp(diff)}, {comparison.test.method} p = {p:.3f})"
        )
    return (
        f"no significant difference: {_pp(diff)} for {short(treatment.policy)} vs "
        f"{short(control.policy)} ({comparison.test.method} p = {p:.2f}); {detectable(phase)}"
    )


def short(policy: str) -> str:
    """A policy id short enough for a table cell (it-8344764c14c3... -> it-8344764c)."""
    return policy if len(policy) <= 11 else policy[:11]


def score_difference(phase: Phase) -> str:
    """The treatment's minus the control's mean simulator score of suggestions, 95% interval."""
    if len(phase.arms) != 2:
        return ""
    control, treatment = (phase.scores.get(a.arm) for a in phase.arms)
    if control is None or treatment is None or control.n < 2 or treatment.n < 2:
        return "too few suggestions to compare their simulator scores"
    diff = treatment.mean - control.mean
    half = ScoreSummary.Z95 * math.sqrt(control.se**2 + treatment.se**2)
    low, high = diff - half, diff + half
    clear = "clearly " if low > 0 or high < 0 else ""
    direction = "higher" if diff > 0 else "lower"
    return (
        f"simulator score of suggestions {clear}{direction}: {diff:+.2f} "
        f"(95% CI {low:+.2f} to {high:+.2f}; {control.n} vs {treatment.n} suggestions)"
    )


def _score(summary: ScoreSummary | None) -> str:
    if summary is None or summary.n == 0:
        return "n/a"
    if summary.n == 1:
        return f"{summary.mean:+.2f}"
    return f"{summary.mean:+.2f} ({summary.low:+.2f} to {summary.high:+.2f})"


def _ppo(metrics: dict[str, Any]) -> str:
    """What the improvement step did: Q of its samples first -> last update, KL to the parent."""
    if "improve_q_mean" not in metrics:
        return ""
    return (
        f"; PPO: Q of samples {_fmt(metrics.get('improve_q_mean_first'))} -> "
        f"{_fmt(metrics.get('improve_q_mean'))}, KL to parent {_fmt(metrics.get('improve_kl_ref'))}"
    )


def _interval(m: dict[str, Any], name: str) -> str:
    value, lo, hi = (m.get(k) for k in (name, f"{name}_lo", f"{name}_hi"))
    if not isinstance(value, int | float):
        return "n/a"
    if isinstance(lo, int | float) and isinstance(hi, int | float):
        return f"{value:.3f} ({lo:.3f} to {hi:.3f})"
    return f"{value:.3f}"


def _corr(values: tuple[float | None, float | None, float | None]) -> str:
    corr, lo, hi = values
    if corr is None:
        return "n/a"
    return f"{corr:+.2f}" + (
        f" ({lo:+.2f} to {hi:+.2f})" if lo is not None and hi is not None else ""
    )


def evidence_lines(result: DemoResult) -> list[str]:
    """Per iteration: the candidate check before traffic, and the A/B rate measured after it."""
    lines = []
    for number, summary in enumerate(result.iterations, start=1):
        m = summary.metrics
        name = f"iteration {number} ({summary.candidate})"
        if "check_flagged" not in m:
            lines.append(f"{name}: no candidate check ran")
            continue
        flag = "FLAGGED (lower bound not above 0)" if m["check_flagged"] else "not flagged"
        lines.append(
            f"{name}, before traffic: mean Q gain of pi_i+1's replies over pi_i's at "
            f"{m.get('check_states')} held-out states {_interval(m, 'check_gain')} by the check Q, "
            f"{flag}; the Q that PPO optimised claims {_fmt(m.get('check_gain_ppo_q'))}"
        )
        measured = ""
        if number < len(result.phases):
            arm = next(
                (a for a in result.phases[number].arms if a.policy == summary.candidate), None
            )
            if arm is not None:
                low, high = arm.interval
                dr_lo, dr_hi = m.get("estimate_dr_lo"), m.get("estimate_dr_hi")
                inside = (
                    "inside"
                    if isinstance(dr_lo, int | float)
                    and isinstance(dr_hi, int | float)
                    and dr_lo <= arm.outcome_rate <= dr_hi
                    else "outside"
                )
                measured = (
                    f"; measured in the A/B: {arm.outcome_rate:.3f} ({low:.3f} to {high:.3f}, "
                    f"n {arm.ended}), {inside} the doubly robust interval"
                )
        lines.append(
            f"{name}, estimated outcome rate from {m.get('estimate_conversations')} held-out "
            f"conversations: direct {_interval(m, 'estimate_direct')}, doubly robust "
            f"{_interval(m, 'estimate_dr')} (ESS {_fmt(m.get('estimate_ess'))}, weights clipped "
            f"{m.get('estimate_clipped')} times); pi_i direct "
            f"{_interval(m, 'estimate_direct_parent')}, logged {_interval(m, 'estimate_logged')}"
            f"{measured}"
        )
        sc = summary.scenario_check
        if sc is not None:
            lines.append(
                f"{name}, Q against the simulator's score of {sc.replies} sampled replies at "
                f"{sc.states} held-out states (within-state correlation): check Q "
                f"{_corr(sc.check_q)}, the Q that PPO optimised {_corr(sc.ppo_q)}"
            )
    return lines


def paired_line(pc: PairedComparison) -> str:
    """One paired comparison, labelled as the simulator-only evaluation it is."""
    first, second = pc.rate("first"), pc.rate("second")
    both, only_first, only_second, neither = pc.cells
    low, high = pc.interval
    errors = sum(pc.backend_errors.values())
    return (
        f"simulator only, the same {pc.n} simulated customers under both policies (paired): "
        f"{short(pc.first)} {first[0]:.0%} ({first[1] * 100:.0f}-{first[2] * 100:.0f}), "
        f"{short(pc.second)} {second[0]:.0%} ({second[1] * 100:.0f}-{second[2] * 100:.0f}); "
        f"difference {_pp(pc.difference)} (95% CI {_pp(low)} to {_pp(high)}), exact McNemar "
        f"p = {pc.p_value:.2f} ({only_second} customers converted only under "
        f"{short(pc.second)}, {only_first} only under {short(pc.first)}, {both} under both, "
        f"{neither} under neither)"
        + (f"; {errors} suggestions failed and counted as abstentions" if errors else "")
        + f"; {pc.seconds:.0f}s. Real customers cannot be replayed: only the A/B measures"
    )


def print_report(result: DemoResult, console: Console) -> None:
    # Sized for 80 columns: short phase and policy names, two-letter usage columns.
    table = Table(
        title=f"outcomeloop demo: {result.scenario.name} (seed {result.config.seed})",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        pad_edge=False,
    )
    for column in ("phase", "policy", "n", "outcome (CI)", "acc", "edi", "rej", "abs"):
        table.add_column(column, justify="left" if column in ("phase", "policy") else "right")
    table.add_column("sim. score", justify="right")
    for number, phase in enumerate(result.phases):
        for side, arm in enumerate(phase.arms):
            low, high = arm.interval
            role = ("ctl", "trt")[side] if len(phase.arms) == 2 else arm.arm[:5]
            score = phase.scores.get(arm.arm)
            table.add_row(
                f"{number} {role}",
                short(arm.policy),
                str(arm.ended),
                f"{arm.outcome_rate:.0%} ({low * 100:.0f}-{high * 100:.0f})",
                *(
                    f"{arm.relation_rate(r):.0%}"
                    for r in ("accepted", "edited", "rejected", "abstained")
                ),
                "n/a"
                if score is None or score.n < 2
                else f"{score.mean:+.2f}±{(score.high - score.low) / 2:.2f}",
            )
    console.print(table)
    for number, phase in enumerate(result.phases):
        console.print(f"phase {number}: {phase.name}")
    console.print(
        "ctl/trt: the A/B's control and treatment arms; outcome: the rate with its 95% "
        "interval. acc/edi/rej/abs: suggestions accepted, "
        "edited, rejected, abstained. sim. score (± the 95% half-width): the simulator's own "
        "score of the suggestions (Scenario.score: their direct effect on the outcome "
        "log-odds); a diagnostic production does not have"
    )
    for name, rate in result.reference_rates.items():
        console.print(f"reference (simulator, offline): {name}: {rate:.1%}")
    for number, summary in enumerate(result.iterations, start=1):
        m = summary.metrics
        ab = ab_difference(result.phases[number]) if number < len(result.phases) else ""
        console.print(
            f"iteration {summary.iteration_id[:8]} ({short(summary.parent)} -> "
            f"{short(summary.candidate or '')}): {summary.status}"
            + (f"; {ab}" if ab else "; no A/B ran")
        )
        console.print(
            f"  Q held-out AUC {_fmt(m.get('q_auc'))} "
            f"(first half {_fmt(m.get('q_auc_first_half'))}), MSE {_fmt(m.get('q_mse'))}, "
            f"Brier {_fmt(m.get('q_brier'))}, ranking corr(Q - V, G - V) "
            f"{_interval(m, 'q_rank_corr')}, {m.get('data_examples', 0)} decisions"
            f"{_ppo(m)}; {summary.seconds:.0f}s"
        )
    for line in evidence_lines(result):
        console.print(line)
    for phase in result.phases[1:]:
        console.print(f"[bold]{phase.name}[/]: {verdict(phase)}; {score_difference(phase)}")
    for pc in result.paired:
        console.print(paired_line(pc))
    for note in result.notes:
        console.print(f"note: {note}")
    console.print(f"wall time {result.seconds / 60:.1f} min; store {result.store}")


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else "n/a"


def _svg_frame(
    width: int, height: int, label: str, left: int, right: int, top: int, plot_h: float
) -> list[str]:
    """An SVG opening tag and a 0-100% grid with labels."""
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="{label}">'
    ]
    for tick in range(0, 101, 25):
        y = top + plot_h * (1 - tick / 100)
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{tick}%</text>'
        )
    return parts


def _bars_svg(phases: list[Phase], width: int = 640, height: int = 260) -> str:
    """Outcome rate per arm and phase, with 95% interval whiskers."""
    bars = [(p.name, a) for p in phases for a in p.arms]
    if not bars:
        return ""
    left, bottom, top = 50, 60, 20
    plot_h = height - bottom - top
    slot = (width - left - 10) / len(bars)
    parts = _svg_frame(width, height, "outcome rate per arm", left, 10, top, plot_h)
    colours = ["#4c78a8", "#f58518", "#54a24b", "#e45756"]
    for i, (phase, arm) in enumerate(bars):
        x = left + i * slot + slot * 0.15
        w = slot * 0.7
        h = plot_h * arm.outcome_rate
        low, high = arm.interval
        colour = colours[(0 if arm.arm in ("pi0", "control") else 1) % len(colours)]
        parts.append(
            f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{w:.1f}" '
            f'height="{h:.1f}" fill="{colour}"><title>{html.escape(phase)} / '
            f"{html.escape(arm.policy)}: {arm.outcome_rate:.1%} "
            f"({low:.1%}-{high:.1%}, n={arm.ended})</title></rect>"
        )
        cx = x + w / 2
        y_low, y_high = top + plot_h * (1 - low), top + plot_h * (1 - high)
        parts.append(
            f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{y_low:.1f}" y2="{y_high:.1f}" stroke="#222"/>'
        )
        for y in (y_low, y_high):
            parts.append(
                f'<line x1="{cx - 5:.1f}" x2="{cx + 5:.1f}" y1="{y:.1f}" '
                f'y2="{y:.1f}" stroke="#222"/>'
            )
        label = f"{arm.policy}"
        parts.append(
            f'<text x="{cx:.1f}" y="{height - bottom + 16}" font-size="11" '
            f'text-anchor="middle">{html.escape(label[:14])}</text>'
        )
        parts.append(
            f'<text x="{cx:.1f}" y="{height - bottom + 30}" font-size="10" '
            f'fill="#666" text-anchor="middle">{html.escape(phase[:18])}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _iterations_svg(result: DemoResult, width: int = 640, height: int = 220) -> str:
    """Per iteration, the two arms of its own A/B test (control and candidate), with their 95%
    intervals: the comparison the A/B supports (not pi_0-alone traffic against a later arm)."""
    tests = [(index, phase) for index, phase in enumerate(result.phases) if len(phase.arms) == 2]
    if not tests:
        return ""
    left, bottom, top = 50, 40, 20
    plot_h, plot_w = height - bottom - top, width - left - 30
    slot = plot_w / len(tests)
    parts = _svg_frame(width, height, "the arms of each A/B test", left, 30, top, plot_h)
    colours = ("#4c78a8", "#f58518")
    for n, (index, phase) in enumerate(tests):
        for side, arm in enumerate(phase.arms):
            x = left + n * slot + slot * (0.35 + 0.3 * side)
            y = top + plot_h * (1 - arm.outcome_rate)
            low, high = arm.interval
            parts.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + plot_h * (1 - low):.1f}" '
                f'y2="{top + plot_h * (1 - high):.1f}" stroke="{colours[side]}"/>'
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{colours[side]}"><title>'
                f"{html.escape(arm.policy)}: {arm.outcome_rate:.1%} ({low:.1%}-{high:.1%}, "
                f"n={arm.ended})</title></circle>"
                f'<text x="{x:.1f}" y="{height - bottom + 14}" font-size="10" '
                f'text-anchor="middle">{html.escape(short(arm.policy))}</text>'
            )
        lift = _pp(phase.arms[1].outcome_rate - phase.arms[0].outcome_rate)
        parts.append(
            f'<text x="{left + (n + 0.5) * slot:.1f}" y="{height - bottom + 28}" font-size="11" '
            f'text-anchor="middle">iteration {index}: {html.escape(lift)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def render_html(result: DemoResult) -> str:
    rows = []
    for phase in result.phases:
        for arm in phase.arms:
            low, high = arm.interval
            rows.append(
                "<tr>"
                + "".join(
                    f"<td>{html.escape(str(c))}</td>"
                    for c in (
                        phase.name,
                        arm.arm,
                        arm.policy,
                        arm.ended,
                        f"{arm.outcome_rate:.1%} ({low:.1%}-{high:.1%})",
                        f"{arm.relation_rate('accepted'):.0%}",
                        f"{arm.relation_rate('edited'):.0%}",
                        f"{arm.relation_rate('rejected'):.0%}",
                        f"{arm.relation_rate('abstained'):.0%}",
                        _score(phase.scores.get(arm.arm)),
                    )
                )
                + "</tr>"
            )
    iteration_rows = []
    for s in result.iterations:
        m = s.metrics
        iteration_rows.append(
            "<tr>"
            + "".join(
                f"<td>{html.escape(str(c))}</td>"
                for c in (
                    s.iteration_id[:8],
                    s.parent,
                    s.candidate or "",
                    s.status,
                    m.get("data_examples", ""),
                    _fmt(m.get("q_auc")),
                    _fmt(m.get("q_auc_first_half")),
                    _fmt(m.get("q_mse")),
                    _fmt(m.get("q_brier")),
                    _fmt(m.get("improve_q_mean_first")),
                    _fmt(m.get("improve_q_mean")),
                    _fmt(m.get("improve_kl_ref")),
                    f"{s.seconds:.0f}s",
                )
            )
            + "</tr>"
        )
    verdicts = "".join(
        f"<li><b>{html.escape(p.name)}</b>: {html.escape(ab_difference(p))}; "
        f"{html.escape(verdict(p))}; {html.escape(score_difference(p))}</li>"
        for p in result.phases[1:]
    )
    verdicts += "".join(f"<li>{html.escape(paired_line(pc))}</li>" for pc in result.paired)
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in result.notes)
    evidence = "".join(f"<li>{html.escape(line)}</li>" for line in evidence_lines(result))
    reference = "".join(
        f"<li>{html.escape(k)}: {v:.1%}</li>" for k, v in result.reference_rates.items()
    )
    c = result.config
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>outcomeloop demo report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;
color:#222}}.wide{{overflow-x:auto}}table{{border-collapse:collapse;margin:1em 0;font-size:14px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}th{{font-weight:600}}
td:nth-child(-n+3){{text-align:left;overflow-wrap:anywhere}}h2{{margin-top:1.5em}}</style></head>
<body><h1>outcomeloop demo: {html.escape(result.scenario.name)}</h1>
<p>{html.escape(result.scenario.description)} Seed {c.seed}; {c.conversations} simulated
conversations per phase; {c.iterations} iteration(s); wall time {result.seconds / 60:.1f} min.</p>
<h2>Outcome rate per arm</h2>{_bars_svg(result.phases)}
<div class="wide"><table><tr><th>phase</th><th>arm</th><th>policy</th><th>n</th>
<th>outcome rate (95% CI)</th><th>accepted</th><th>edited</th><th>rejected</th>
<th>abstained</th><th>simulator score (95% CI)</th></tr>{"".join(rows)}</table></div>
<p>Simulator score: the simulator's own score of the suggestions (their direct effect on the
outcome log-odds, <code>Scenario.score</code>); a diagnostic that production does not have.</p>
<h2>Per iteration</h2>{_iterations_svg(result)}
<div class="wide"><table><tr><th>iteration</th><th>parent</th><th>candidate</th><th>status</th>
<th>decisions</th>
<th>Q AUC</th><th>Q AUC (first half)</th><th>Q MSE</th><th>Brier</th>
<th>PPO: Q of samples, first update</th><th>last update</th><th>KL to parent</th>
<th>time</th></tr>
{"".join(iteration_rows)}</table></div>
<h2>Evidence before traffic</h2><ul>{evidence or "<li>no iteration ran</li>"}</ul>
<h2>Verdict</h2><ul>{verdicts or "<li>no A/B test ran</li>"}</ul>
<h2>Reference</h2><ul>{reference}</ul><h2>Notes</h2><ul>{notes}</ul>
</body></html>
"""
