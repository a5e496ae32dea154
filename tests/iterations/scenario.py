"""A small synthetic log where the business's wording decides the outcome: enough signal for
Q to learn on a tiny model, and the same shape as real traffic (imported JSONL)."""

from __future__ import annotations

import json
import random

GOOD = ["Shall we book a visit on Monday?", "I can book you in tomorrow, does 10am work?"]
BAD = ["Please wait.", "We are busy, maybe later."]
OPENERS = ["Hi, do you renovate kitchens?", "How much is a new bathroom?", "Can you help me?"]


def scenario_lines(business_id: str, n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        good = rng.random() < 0.5
        reply = rng.choice(GOOD if good else BAD)
        messages = [
            {"role": "customer", "text": rng.choice(OPENERS)},
            {"role": "business", "text": reply, "suggestion": reply},
            {"role": "customer", "text": "Ok, sounds good." if good else "Never mind."},
        ]
        if good:
            messages[-1]["outcome"] = True
        lines.append(
            json.dumps(
                {
                    "id": f"s{seed}-{i}",
                    "business_id": business_id,
                    "messages": messages,
                    "end": "outcome" if good else "customer_left",
                }
            )
        )
    return lines
