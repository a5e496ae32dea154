"""PersuasionForGood (Wang et al., 2019) as outcomeloop conversations and Q examples.

    python -m tests.data_sources.persuasionforgood [--data DIR] [--out DIR]

The persuader is the business, the persuadee the customer, and the outcome is that the
persuadee actually donated (their B6 > 0 in full_info.csv). It is observed only after the last
message, so the reward sits on the final decision. Consecutive rows of one speaker are one
message. Writes `train.jsonl` and `dev.jsonl` (the ids of splits.json) in the JSONL import
format. The corpus lives in shared/ beside the repository; nothing here is needed at run time.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from services.policies.prompt import Turn
from workers.learning.examples import StepExample

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = Path(
    os.environ.get("OUTCOMELOOP_PFG_DIR", REPO.parent / "shared" / "data" / "persuasionforgood")
)
BUSINESS_ID = "persuasionforgood"
PERSUADER, PERSUADEE = "0", "1"
SPLITS = ("train", "dev")


def available(data_dir: Path = DEFAULT_DATA_DIR) -> bool:
    return all(
        (data_dir / name).is_file() for name in ("full_dialog.csv", "full_info.csv", "splits.json")
    )


def load_conversations(
    data_dir: Path = DEFAULT_DATA_DIR, *, ids: Iterable[str] | None = None
) -> list[dict[str, Any]]:
    """The dialogues (all, or those named by `ids`, in that order) as JSONL conversation objects."""
    donated: dict[str, bool] = {}
    with (data_dir / "full_info.csv").open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row["B4"] == PERSUADEE:
                donated[row["B2"]] = float(row["B6"]) > 0
    messages: dict[str, list[dict[str, str]]] = {}
    with (data_dir / "full_dialog.csv").open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            text = row["Unit"].strip()
            if not text:
                continue
            role = "business" if row["B4"] == PERSUADER else "customer"
            dialogue = messages.setdefault(row["B2"], [])
            if dialogue and dialogue[-1]["role"] == role:
                dialogue[-1]["text"] += " " + text
            else:
                dialogue.append({"role": role, "text": text})
    wanted = list(messages) if ids is None else list(ids)
    conversations = []
    for dialogue_id in wanted:
        if dialogue_id not in donated:
            raise ValueError(f"dialogue {dialogue_id} has no persuadee row in full_info.csv")
        outcome = int(donated[dialogue_id])
        conversations.append(
            {
                "id": dialogue_id,
                "business_id": BUSINESS_ID,
                "messages": messages[dialogue_id],
                "outcome": outcome,
                "end": "outcome" if outcome else "customer_left",
            }
        )
    return conversations


def load_split(split: str, data_dir: Path = DEFAULT_DATA_DIR) -> list[dict[str, Any]]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    ids = json.loads((data_dir / "splits.json").read_text())[split]
    return load_conversations(data_dir, ids=ids)


def write_jsonl(data_dir: Path, output_dir: Path) -> dict[str, Path]:
    """train.jsonl and dev.jsonl in output_dir; returns their paths by split."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in SPLITS:
        path = output_dir / f"{split}.jsonl"
        with path.open("w", encoding="utf-8") as handle:
            for conversation in load_split(split, data_dir):
                handle.write(json.dumps(conversation, ensure_ascii=False) + "\n")
        paths[split] = path
    return paths


def step_examples(
    conversations: Sequence[dict[str, Any]], *, gamma: float = 1.0
) -> list[StepExample]:
    """One example per business message: the state before it, the message, its return.

    The only reward is the outcome, observed after the last message, so the return of the
    k-th of K business decisions is gamma^(K-1-k) * outcome.
    """
    examples = []
    for conversation in conversations:
        turns = tuple(Turn(m["role"], m["text"]) for m in conversation["messages"])
        decisions = [i for i, turn in enumerate(turns) if turn.role == "business"]
        outcome = int(conversation["outcome"])
        for step, position in enumerate(decisions):
            remaining = len(decisions) - step
            examples.append(
                StepExample(
                    conversation_id=conversation["id"],
                    step=step,
                    n_steps=len(decisions),
                    state=turns[:position],
                    action=turns[position].text,
                    ret=gamma ** (remaining - 1) * outcome,
                    outcome=outcome,
                )
            )
    return examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--out", type=Path, default=Path("persuasionforgood-jsonl"))
    args = parser.parse_args()
    for split, path in write_jsonl(args.data, args.out).items():
        with path.open(encoding="utf-8") as handle:
            print(f"{split}: {sum(1 for _ in handle)} conversations -> {path}")


if __name__ == "__main__":
    main()
