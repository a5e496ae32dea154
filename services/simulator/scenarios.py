"""Scenarios: everything that decides how a simulated conversation goes, in one readable place.

A `Scenario` holds who the customers are (`Personas`: needs, budgets, patience, what persuades
and what irritates them, how many concerns they bring), what they say (`CustomerLines` and the
`concerns` they may raise, each with the answer a well-informed business gives), how they
react to what the business sends (`Dynamics`: per-feature weights on the per-turn outcome
log-odds and on the annoyance that makes them leave, base rates), how the business's rep
treats a suggestion (`RepBehaviour`: accept, edit, reject, write its own, go silent) and the
longest conversation (`max_turns`). The features it weighs are in
services/simulator/features.py; the agents that read it are in services/simulator/agents.py.

Designing your own:

1. Write the facts first: the `concerns` customers raise, each with an answer that reuses the
   question's key words (that is how `answers_question` recognises an answer) and, for price
   questions, an amount. State one price range everywhere, or answers contradict each other.
2. Describe the customers: a few `Need`s (opening lines, and the details they give when asked
   about their situation), `Budget`s (a log-odds shift; a "just looking" budget keeps some
   customers from ever converting, as in real traffic), the patience range, and which
   features may persuade or irritate one customer beyond the common weights.
3. Give customer lines without question marks except in real questions: a question mark
   makes the next business message owe an answer.
4. Give the rep needs questions, next steps and poor messages of the kinds reps really send
   (vague, pushy, long, off-brand); `own_quality` mixes them. Add the brand's avoided words to
   `off_brand_words` and scenario words for needs questions to `needs_phrases`.
5. Start from the default `Dynamics` and check with `simulate_offline`: a hand-written good
   policy (asks needs, answers, proposes a concrete step, polite, concise) must clearly beat
   a bad one (price first, long, pushy), and the rep alone (a policy that always abstains)
   should land in between, so there is something to learn (tests/simulator does this).
6. Register it in `SCENARIOS`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from services.simulator.features import FEATURE_NAMES, Turn, extract_features


@dataclass(frozen=True)
class Question:
    """Something a customer says or asks, with what a well-informed business answers."""

    text: str
    answer: str


@dataclass(frozen=True)
class Need:
    """What a customer comes for: how they open, and what they tell when asked about it."""

    name: str
    weight: float  # relative frequency among customers
    openings: tuple[Question, ...]  # the first message, with a good reply to it
    details: tuple[str, ...]  # the answer to a question about their situation


@dataclass(frozen=True)
class Budget:
    """How ready a customer is to pay, as a shift of the outcome log-odds."""

    name: str
    weight: float  # relative frequency among customers
    outcome_shift: float


@dataclass(frozen=True)
class Personas:
    """The distribution customers are drawn from; each draw stays hidden from the business."""

    needs: tuple[Need, ...]
    budgets: tuple[Budget, ...]
    # Patience in [0, 1] is drawn uniformly from this range; low patience leaves sooner.
    patience: tuple[float, float] = (0.2, 1.0)
    # Each customer is persuaded by `n_persuaders` of these features (extra outcome log-odds
    # `persuasion_bonus` x feature) and irritated by `n_irritants` of `irritants` (extra
    # annoyance `irritation_bonus` x feature).
    persuaders: tuple[str, ...] = ("next_step", "answers_question", "polite", "emoji")
    n_persuaders: int = 1
    persuasion_bonus: float = 0.8
    irritants: tuple[str, ...] = ("too_long", "emoji", "pushy", "price_before_need", "too_short")
    n_irritants: int = 1
    irritation_bonus: float = 1.0
    # A customer brings 0..max_concerns of the scenario's concerns; each one not yet answered
    # lowers the outcome log-odds by `Dynamics.open_concern_penalty`.
    max_concerns: int = 2


@dataclass(frozen=True)
class CustomerLines:
    """What customers say besides openings, needs details and concerns."""

    accept: tuple[str, ...]  # converting
    decline: tuple[str, ...]  # a next step was proposed, but not yet
    filler: tuple[str, ...]  # nothing to add
    nudge: tuple[str, ...]  # the business went silent
    reask: tuple[str, ...]  # a concern was ignored; "{question}" is the concern
    # Goodbyes by reason: a feature name (the main irritant of the last message), "silence",
    # "impatience", or "default" (required).
    leave: Mapping[str, tuple[str, ...]]


def _default_outcome_weights() -> dict[str, float]:
    return {
        "next_step": 2.2,
        "answers_question": 0.8,
        "asks_needs_early": 0.3,
        "polite": 0.3,
        "ignores_question": -0.8,
        "price_before_need": -1.2,
        "pushy": -1.5,
        "rude": -2.0,
        "too_long": -0.8,
        "too_short": -0.5,
        "contradiction": -1.5,
        "emoji": -0.2,
        "off_brand": -0.8,
        "garbled": -1.5,
    }


def _default_leave_weights() -> dict[str, float]:
    return {
        "pushy": 1.2,
        "rude": 1.8,
        "price_before_need": 0.9,
        "too_long": 0.7,
        "ignores_question": 0.8,
        "contradiction": 1.2,
        "off_brand": 0.6,
        "garbled": 1.2,
        "too_short": 0.3,
        "emoji": 0.1,
        "polite": -0.3,
        "answers_question": -0.4,
        "asks_needs_early": -0.3,
    }


@dataclass(frozen=True)
class Dynamics:
    """How a customer reacts to a business message, from its features.

    Per turn, with f the features of the message just sent:
      annoyance <- max(0, decay * annoyance + sum(leave_weights * f) + irritation)
      P(outcome) = sigmoid(outcome_base + sum(outcome_weights * f) + budget shift + persuasion
                           + needs_heard_bonus [details shared] - open_concern_penalty * open
                           - outcome_annoyance * annoyance)
      P(leave)   = sigmoid(leave_base + leave_per_annoyance * annoyance
                           + leave_impatience * (1 - patience) * turn)
    """

    outcome_base: float = -3.4
    outcome_weights: Mapping[str, float] = field(default_factory=_default_outcome_weights)
    needs_heard_bonus: float = 1.2
    open_concern_penalty: float = 0.9
    outcome_annoyance: float = 0.6
    leave_weights: Mapping[str, float] = field(default_factory=_default_leave_weights)
    annoyance_decay: float = 0.7
    silence_annoyance: float = 1.0
    leave_base: float = -3.2
    leave_per_annoyance: float = 1.3
    leave_impatience: float = 0.35  # log-odds per turn at patience 0
    ask_probability: float = 0.4  # raising an open concern unprompted on a turn


@dataclass(frozen=True)
class RepBehaviour:
    """How the business's rep treats a suggestion, and what it writes on its own.

    A garbled suggestion is always rejected; the others are checked in this order: off-brand
    (fix or reject), too long (trim or reject), premature push (reject or go on), then
    accept / polish / reject by `accept` and `edit`.
    """

    needs_questions: tuple[str, ...]  # good own messages about the customer's situation
    next_steps: tuple[str, ...]  # good own messages proposing a concrete step
    poor_messages: tuple[str, ...]  # vague, pushy, long or off-brand own messages
    accept: float = 0.7  # a fine suggestion is sent verbatim
    edit: float = 0.15  # ... or lightly polished; otherwise rejected for the rep's own
    fix_off_brand: float = 0.7  # an off-brand suggestion is fixed, else rejected
    trim_long: float = 0.5  # a too-long suggestion is cut to `trim_to_sentences`, else rejected
    trim_to_sentences: int = 2
    reject_push: float = 0.7  # a premature push (price before need, hard sell, rude) is rejected
    silence: float = 0.03  # the rep sends nothing this turn
    max_silences: int = 2  # silent this many turns in a row: the business left
    own_quality: float = 0.45  # an own message is a good one (else one of `poor_messages`)
    knows_answer: float = 0.8  # a good own message answers the customer's question
    polish: tuple[str, ...] = ("Thanks!", "Happy to help.")  # appended in a light edit
    off_brand_fixes: Mapping[str, str] = field(default_factory=dict)  # missing word: dropped


@dataclass(frozen=True)
class Scenario:
    """One business and its customers; see the module docstring for how to design one."""

    name: str
    description: str
    outcome_label: str  # the label of POST /outcome
    personas: Personas
    concerns: tuple[Question, ...]
    customer: CustomerLines
    rep: RepBehaviour
    dynamics: Dynamics = field(default_factory=Dynamics)
    off_brand_words: tuple[str, ...] = ()
    needs_phrases: tuple[str, ...] = ()  # scenario words that make a question a needs question
    max_turns: int = 8  # business turns before the conversation times out

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise ValueError(f"scenario {self.name!r}: " + "; ".join(problems))

    def features(self, text: str, history: Sequence[Turn]) -> dict[str, float]:
        """The features of business message `text` after `history`, with this brand's words."""
        return extract_features(
            text,
            history,
            off_brand_words=self.off_brand_words,
            extra_needs_phrases=self.needs_phrases,
        )

    def score(self, text: str, history: Sequence[Turn]) -> float:
        """How much the scenario's customers reward `text` after `history`: its direct effect on
        this turn's outcome log-odds, sum(outcome_weights * f), minus the annoyance it adds
        times `outcome_annoyance`; persona terms and what the message does to later turns are
        left out. A diagnostic the simulator can compute and production cannot (the demo
        reports it per arm; it is never a training signal of the product)."""
        dynamics = self.dynamics
        features = self.features(text, history)
        direct = sum(dynamics.outcome_weights.get(k, 0.0) * v for k, v in features.items())
        annoyance = sum(dynamics.leave_weights.get(k, 0.0) * v for k, v in features.items())
        return direct - dynamics.outcome_annoyance * annoyance

    def known_answer(self, customer_text: str) -> str | None:
        """The good answer to a known opening or concern contained in `customer_text`."""
        openings = [q for need in self.personas.needs for q in need.openings]
        for question in (*openings, *self.concerns):
            if question.text in customer_text:
                return question.answer
        return None


def _problems(s: Scenario) -> list[str]:
    known = set(FEATURE_NAMES)
    problems: list[str] = []
    for what, names in (
        ("dynamics.outcome_weights", s.dynamics.outcome_weights),
        ("dynamics.leave_weights", s.dynamics.leave_weights),
        ("personas.persuaders", s.personas.persuaders),
        ("personas.irritants", s.personas.irritants),
    ):
        unknown = sorted(set(names) - known)
        if unknown:
            problems.append(f"{what} names unknown features {unknown}")
    leave_reasons = set(s.customer.leave) - known - {"silence", "impatience", "default"}
    if leave_reasons:
        problems.append(f"customer.leave has unknown reasons {sorted(leave_reasons)}")
    if "default" not in s.customer.leave:
        problems.append("customer.leave needs a 'default' line")
    probabilities = {
        "rep.accept": s.rep.accept,
        "rep.edit": s.rep.edit,
        "rep.fix_off_brand": s.rep.fix_off_brand,
        "rep.trim_long": s.rep.trim_long,
        "rep.reject_push": s.rep.reject_push,
        "rep.silence": s.rep.silence,
        "rep.own_quality": s.rep.own_quality,
        "rep.knows_answer": s.rep.knows_answer,
        "dynamics.annoyance_decay": s.dynamics.annoyance_decay,
        "dynamics.ask_probability": s.dynamics.ask_probability,
    }
    problems += [f"{k}={v} is not in [0, 1]" for k, v in probabilities.items() if not 0 <= v <= 1]
    if s.rep.accept + s.rep.edit > 1:
        problems.append("rep.accept + rep.edit exceeds 1")
    low, high = s.personas.patience
    if not 0 <= low <= high <= 1:
        problems.append(f"personas.patience {s.personas.patience} is not a range within [0, 1]")
    if s.personas.n_persuaders > len(s.personas.persuaders):
        problems.append("personas.n_persuaders exceeds the persuaders listed")
    if s.personas.n_irritants > len(s.personas.irritants):
        problems.append("personas.n_irritants exceeds the irritants listed")
    if s.personas.max_concerns > len(s.concerns):
        problems.append("personas.max_concerns exceeds the concerns listed")
    if s.max_turns < 1 or s.rep.max_silences < 1 or s.rep.trim_to_sentences < 1:
        problems.append("max_turns, rep.max_silences and rep.trim_to_sentences must be >= 1")
    weights = [n.weight for n in s.personas.needs] + [b.weight for b in s.personas.budgets]
    if not s.personas.needs or not s.personas.budgets or any(w <= 0 for w in weights):
        problems.append("personas need at least one need and one budget, with positive weights")
    templates: dict[str, list[tuple[object, ...]]] = {
        "need openings/details": [t for n in s.personas.needs for t in (n.openings, n.details)],
        "customer lines": [
            s.customer.accept,
            s.customer.decline,
            s.customer.filler,
            s.customer.nudge,
            s.customer.reask,
        ],
        "rep templates": [s.rep.needs_questions, s.rep.next_steps, s.rep.poor_messages],
    }
    for what, groups in templates.items():
        if any(not group for group in groups):
            problems.append(f"{what} must not be empty")
    return problems


RENOVATION = Scenario(
    name="renovation",
    description="A renovation company answers a lead; the outcome is a booked visit.",
    outcome_label="visit_booked",
    personas=Personas(
        needs=(
            Need(
                name="kitchen",
                weight=0.4,
                openings=(
                    Question(
                        "Hi, do you renovate kitchens?",
                        "Yes, we renovate kitchens, from new fronts to a full remodel.",
                    ),
                    Question(
                        "Hello, our kitchen is falling apart and we want a new one.",
                        "Sorry to hear that, new kitchens are exactly what we do.",
                    ),
                ),
                details=(
                    "It's about 12 square meters, we want new cabinets and a new worktop.",
                    "It's small, maybe 8 square meters, and we'd like to open it to the "
                    "living room.",
                ),
            ),
            Need(
                name="bathroom",
                weight=0.4,
                openings=(
                    Question(
                        "Hi, how much does a bathroom renovation cost?",
                        "A bathroom renovation usually costs between 8,000 and 15,000 euros, "
                        "depending on size and materials.",
                    ),
                    Question(
                        "Hello, we'd like to redo our bathroom before the summer.",
                        "Happy to help, bathrooms are one of our specialities.",
                    ),
                ),
                details=(
                    "It's 6 square meters, we want a walk-in shower instead of the bathtub.",
                    "Everything is from the eighties, tiles, toilet, sink, all of it.",
                ),
            ),
            Need(
                name="house",
                weight=0.2,
                openings=(
                    Question(
                        "We just bought an old house and want to renovate it completely.",
                        "Congratulations on the house! Full renovations are our speciality.",
                    ),
                ),
                details=(
                    "It's a 1930s house, 120 square meters, it needs new floors, wiring "
                    "and a kitchen.",
                ),
            ),
        ),
        budgets=(
            Budget("comfortable", 0.3, 0.4),
            Budget("tight", 0.5, -0.3),
            Budget("just looking", 0.2, -2.5),
        ),
    ),
    concerns=(
        Question(
            "How long would the work take?",
            "Most projects like yours take about three weeks of work on site.",
        ),
        Question(
            "Do you give a written quote before starting?",
            "Yes, you get a written quote after our free visit, before any work starts.",
        ),
        Question(
            "Is there a guarantee on your work?",
            "Yes, all our work comes with a five-year guarantee.",
        ),
        Question(
            "Can I see photos of earlier projects?",
            "Of course, I can send you photos of earlier projects like yours.",
        ),
        Question(
            "Roughly how much would it cost?",
            "Most projects like yours cost between 8,000 and 15,000 euros; the visit gives "
            "you an exact quote.",
        ),
    ),
    customer=CustomerLines(
        accept=(
            "Yes, that works for me, please book it.",
            "Great, see you then.",
            "Perfect, let's do the visit.",
        ),
        decline=(
            "Not sure yet, I'm still comparing offers.",
            "Maybe, I need to talk to my partner first.",
            "Hmm, not this week.",
        ),
        filler=("Ok.", "I see.", "Sounds good so far.", "Alright."),
        nudge=("Hello, anyone there...", "I'm still waiting for an answer."),
        reask=(
            "You didn't answer my question. {question}",
            "Sorry, I still need to know this. {question}",
        ),
        leave={
            "pushy": ("Please stop pushing me, I'll look elsewhere.",),
            "rude": ("No need to be rude. Goodbye.",),
            "price_before_need": ("You don't even know what I need yet. Bye.",),
            "too_long": ("That's a wall of text, I'll find someone else.",),
            "ignores_question": ("You're not answering my questions, never mind.",),
            "contradiction": ("You told me a different price before, I don't trust this.",),
            "off_brand": ("That doesn't sound very professional. Bye.",),
            "garbled": ("I can't read that. Never mind.",),
            "silence": ("Nobody answers, I'll try another company.",),
            "impatience": ("This is taking too long, I'll look around.",),
            "default": ("Thanks, I'll think about it. Bye.", "I'll look around a bit more, bye."),
        },
    ),
    rep=RepBehaviour(
        needs_questions=(
            "What would you like to change, and how big is the room?",
            "Happy to help! Which room is it, and what would you like to change?",
            "Could you tell me more about the space and what you have in mind?",
        ),
        next_steps=(
            "Could we visit on Thursday at 10am to measure and give you a free quote?",
            "Shall I book a free visit for Monday morning so we can measure?",
            "Can we stop by tomorrow afternoon to see the space and quote you?",
        ),
        poor_messages=(
            "Ok.",
            "Let me check.",
            "We can do that.",
            "Our renovations start at 7,000 euros.",
            "We are the best renovation company in town and this is the best deal you will "
            "find, so you must book now!",
            "Sure, whatever works for you lol.",
            "We have been renovating homes for over twenty years and have completed hundreds "
            "of kitchens, bathrooms and full houses across the region, always with our own "
            "team of carpenters, plumbers, electricians and tilers, which means we control "
            "the quality from the first visit to the final clean-up, and our customers keep "
            "recommending us to their friends and family.",
        ),
        off_brand_fixes={"cheap": "affordable"},
    ),
    off_brand_words=("cheap", "dude", "lol", "mate", "bro", "guys"),
    needs_phrases=("which room", "square meters", "what style", "the space", "have in mind"),
    max_turns=8,
)


SAAS = Scenario(
    name="saas",
    description="A project-management SaaS answers a prospect; the outcome is a subscription.",
    outcome_label="subscription",
    personas=Personas(
        needs=(
            Need(
                name="startup",
                weight=0.45,
                openings=(
                    Question(
                        "Hi, what does your tool do exactly?",
                        "It's a project-management tool: tasks, timelines and team chat in "
                        "one place.",
                    ),
                    Question(
                        "How much is it per user?",
                        "It's $12 per user per month, billed monthly.",
                    ),
                ),
                details=(
                    "We're a team of 6 and we use spreadsheets today.",
                    "Just 5 of us, mostly developers, and our boards are getting messy.",
                ),
            ),
            Need(
                name="agency",
                weight=0.35,
                openings=(
                    Question(
                        "We're an agency looking for a better way to track client projects.",
                        "Happy to help, many agencies use us to track client projects.",
                    ),
                ),
                details=(
                    "About 20 people, and we juggle 15 client projects at once.",
                    "We're 12, and clients keep asking us for status updates.",
                ),
            ),
            Need(
                name="enterprise",
                weight=0.2,
                openings=(
                    Question(
                        "Hello, we're evaluating tools for our operations department.",
                        "Thanks for reaching out, we work with many operations teams.",
                    ),
                ),
                details=("Around 80 users, and we need single sign-on.",),
            ),
        ),
        budgets=(
            Budget("approved", 0.35, 0.5),
            Budget("needs sign-off", 0.45, -0.4),
            Budget("just looking", 0.2, -2.5),
        ),
        patience=(0.3, 1.0),
    ),
    concerns=(
        Question(
            "Does it integrate with Slack?",
            "Yes, it integrates with Slack, Google Drive and GitHub out of the box.",
        ),
        Question(
            "Is our data secure with you?",
            "Your data is encrypted and stored securely in the EU, and we are ISO 27001 certified.",
        ),
        Question(
            "Can we cancel anytime?",
            "Yes, you can cancel anytime, there is no long contract.",
        ),
        Question(
            "How long does the setup take?",
            "Setup takes about an hour, and we help you import your projects.",
        ),
        Question(
            "What would it cost for a team like ours?",
            "It's $12 per user per month, billed monthly.",
        ),
    ),
    customer=CustomerLines(
        accept=(
            "Sounds good, let's start.",
            "Ok, sign us up.",
            "Great, we'll go with it.",
        ),
        decline=(
            "Not yet, we're still comparing a few tools.",
            "I need to check with my manager first.",
            "Maybe later this quarter.",
        ),
        filler=("Ok.", "I see.", "Interesting.", "Got it."),
        nudge=("Hello, anyone there...", "Still waiting for an answer."),
        reask=(
            "You didn't answer my question. {question}",
            "That's important for us. {question}",
        ),
        leave={
            "pushy": ("Too much sales pressure, no thanks.",),
            "rude": ("That's quite rude. Bye.",),
            "price_before_need": ("You haven't even asked what we need. Bye.",),
            "too_long": ("Too much text, I'll read your website instead.",),
            "ignores_question": ("You keep dodging my questions, never mind.",),
            "contradiction": ("That's not the price you gave before, I'll pass.",),
            "off_brand": ("Not the tone I expect from a vendor. Bye.",),
            "garbled": ("That message is broken. We'll look elsewhere.",),
            "silence": ("No answer, we'll look at other tools.",),
            "impatience": ("This is taking too long, we'll look at other tools.",),
            "default": ("Thanks, we'll think about it.", "I'll check a few alternatives, bye."),
        },
    ),
    rep=RepBehaviour(
        needs_questions=(
            "How big is your team, and what tools do you use today?",
            "Happy to help! What kind of projects does your team run?",
            "Could you tell me more about your team and how you work today?",
        ),
        next_steps=(
            "Shall I set up a free 14-day trial for your team, with a short demo call on Tuesday?",
            "Can we schedule a 20-minute demo tomorrow at 11am?",
            "I can start your free trial today and book an onboarding call for Friday.",
        ),
        poor_messages=(
            "Ok.",
            "Let me check.",
            "Sure.",
            "Our plans start at $9 per user per month.",
            "This is the best deal on the market and the discount is limited, sign now!",
            "Whatever works, bro.",
            "Our platform offers tasks, subtasks, dependencies, Gantt charts, Kanban boards, "
            "time tracking, invoicing, resource planning, custom fields, automations, "
            "dashboards, reports, guest access, single sign-on, an API, webhooks, mobile apps "
            "for iOS and Android and integrations with more than a hundred tools, all "
            "available on every plan with no extra fees.",
        ),
        accept=0.65,
        off_brand_fixes={"cheap": "affordable"},
    ),
    dynamics=Dynamics(outcome_base=-3.6, needs_heard_bonus=1.3),
    off_brand_words=("cheap", "bro", "lol", "hack", "ninja", "rockstar", "dude"),
    needs_phrases=("your team", "tools do you use", "what kind of projects", "how you work"),
    max_turns=8,
)

SCENARIOS: dict[str, Scenario] = {s.name: s for s in (RENOVATION, SAAS)}
