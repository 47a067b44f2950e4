"""The cross-dataset safety data: the XSTest-style suite (ten types, matched contrasts, splits that share no
wording or item), advice prompts split the same way, and HarmBench kept out of every training file."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from onnx_steer_export.data.datasets import DATA, read_jsonl, write_splits
from onnx_steer_export.data.overrefusal import (
    ADVICE_ITEMS,
    ADVICE_WORDINGS,
    SPLITS,
    TYPES,
    advice_prompts,
    cut,
    harmbench_prompts,
    overrefusal_suite,
)
from onnx_steer_export.data.transcoding import ENCODINGS, PAYLOADS, WORDINGS, transcoding_prompts

TYPE_BY_NAME = {kind.name: kind for kind in TYPES}


def test_suite_has_ten_types_and_a_matched_unsafe_contrast_for_every_safe_prompt() -> None:
    suite = overrefusal_suite()
    assert suite == overrefusal_suite(), "the generator is deterministic"
    rows = [row for split in SPLITS for row in suite[split]]
    labels = Counter(row["label"] for row in rows)
    assert labels["safe"] >= 250 and labels["unsafe"] >= 200
    assert len(TYPES) == 10 and {row["type"] for row in rows} == set(TYPE_BY_NAME)
    for split in SPLITS:
        safe = {(r["type"], r["wording"], r["item"]): r["prompt"] for r in suite[split] if r["label"] == "safe"}
        unsafe = {(r["type"], r["wording"], r["item"]): r["prompt"] for r in suite[split] if r["label"] == "unsafe"}
        assert safe.keys() == unsafe.keys() and not set(safe.values()) & set(unsafe.values())
    # Every type has at least 10 safe test prompts (so a 10% bound per type allows one refusal).
    test_types = Counter(r["type"] for r in suite["test"] if r["label"] == "safe")
    assert min(test_types.values()) >= 10, test_types
    # Homonyms keep the trigger word on both sides.
    kill = [r["prompt"] for r in suite["train"] + suite["validation"] + suite["test"]
            if r["type"] == "homonyms" and TYPE_BY_NAME["homonyms"].items[r["item"]][0].startswith("kill")]
    assert kill and all(" kill " in prompt for prompt in kill)


def test_no_test_prompt_shares_a_wording_or_an_item_with_train_or_validation() -> None:
    suite = overrefusal_suite()

    def used(split: str, side: int) -> tuple[set[str], set[str]]:
        kinds = [(TYPE_BY_NAME[r["type"]], r) for r in suite[split]]
        return ({kind.wordings[r["wording"]][side] for kind, r in kinds},
                {kind.items[r["item"]][side] for kind, r in kinds})

    for side in (0, 1):
        test_wordings, test_items = used("test", side)
        for split in ("train", "validation"):
            wordings, items = used(split, side)
            assert not test_wordings & wordings and not test_items & items, (split, side)
    prompts = {split: {r["prompt"] for r in suite[split]} for split in SPLITS}
    assert not prompts["test"] & (prompts["train"] | prompts["validation"])


def test_advice_prompts_cover_three_domains_and_split_by_wording_and_situation() -> None:
    advice = advice_prompts()
    assert {r["domain"] for split in SPLITS for r in advice[split]} == set(ADVICE_ITEMS)
    test_wordings = {r["wording"] for r in advice["test"]}
    for split in ("train", "validation"):
        assert not test_wordings & {r["wording"] for r in advice[split]}
        for domain in ADVICE_ITEMS:
            assert not ({r["item"] for r in advice["test"] if r["domain"] == domain}
                        & {r["item"] for r in advice[split] if r["domain"] == domain})
    assert len(advice["test"]) >= 30 and all(r["prompt"] == ADVICE_WORDINGS[r["wording"]].format(
        ADVICE_ITEMS[r["domain"]][r["item"]]) for r in advice["test"])


def test_transcoding_requests_decode_to_their_payload_and_split_by_wording_and_payload() -> None:
    prompts = transcoding_prompts()
    for split in ("train", "validation"):
        for key in ("wording", "payload"):
            assert not {r[key] for r in prompts["test"]} & {r[key] for r in prompts[split]}, (split, key)
    assert {r["encoding"] for r in prompts["train"]} == set(ENCODINGS), "training meets every encoding"
    for row in (r for split in SPLITS for r in prompts[split]):
        plain = PAYLOADS[row["payload"]]
        encoded = ENCODINGS[row["encoding"]](plain)
        assert row["prompt"] == WORDINGS[row["wording"]].format(name=row["encoding"], data=encoded, plain=plain)
    assert len(prompts["train"]) >= 90 and len(prompts["test"]) >= 20


def test_cuts_must_cover_every_value() -> None:
    assert sorted(i for part in cut("abcdef", (3, 2, 1), "x").values() for i in part) == list(range(6))
    with pytest.raises(ValueError, match="do not add up to 6"):
        cut("abcdef", (3, 2, 2), "x")


def test_committed_files_regenerate_exactly_and_harmbench_trains_nothing(tmp_path: Path) -> None:
    write_splits(tmp_path)
    names = [f"overrefusal_{label}_{s}.jsonl" for s in SPLITS for label in ("safe", "unsafe")] + [
        f"advice_{s}.jsonl" for s in SPLITS] + [f"transcoding_{s}.jsonl" for s in SPLITS]
    for name in [*names, "harmbench_test.jsonl"]:
        assert (tmp_path / name).read_text() == (DATA / name).read_text(), f"{name} differs from make-splits"
    harmbench = {r["prompt"] for r in harmbench_prompts()}
    assert len(harmbench) == 200 == len(read_jsonl(DATA / "harmbench_test.jsonl"))
    for path in DATA.glob("*train*"):
        text = path.read_text()
        rows = [json.loads(line) for line in text.splitlines()] if path.suffix == ".jsonl" else [
            {"prompt": line} for line in text.splitlines()]
        assert not harmbench & {str(r.get("prompt", r.get("positive_prompt", ""))) for r in rows}, path


def test_behaviour_pairs_answer_safe_prompts_refuse_contrasts_and_refer_advice() -> None:
    behaviours = {r["prompt"]: r["behaviour"] for r in read_jsonl(DATA / "behaviour_pairs.jsonl")}
    expected = {"overrefusal_safe_train.jsonl": "comply", "overrefusal_unsafe_train.jsonl": "refuse",
                "advice_train.jsonl": "refer"}
    for name, wanted in expected.items():
        rows = read_jsonl(DATA / name)
        assert rows and all(behaviours[r["prompt"]] == wanted for r in rows), name
    referrals = {r["prompt"]: r["positive"] for r in read_jsonl(DATA / "behaviour_pairs.jsonl")}
    assert all("doctor" in referrals[r["prompt"]] for r in read_jsonl(DATA / "advice_train.jsonl")
               if r["domain"] == "medical")
    for split in ("validation", "test"):
        for name in (f"overrefusal_safe_{split}.jsonl", f"overrefusal_unsafe_{split}.jsonl", f"advice_{split}.jsonl"):
            assert not {r["prompt"] for r in read_jsonl(DATA / name)} & behaviours.keys(), name
