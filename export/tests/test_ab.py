"""The A/B eval: the shipped optimism set (reproducible, balanced, split by situation and frame), CAA-file
parsing, the seeds' letter swaps, the p(match) arithmetic, and real questions scored through the runtime:
the report, and steering a small vector moving p(match) both ways."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from onnx_steer_export.__main__ import main
from onnx_steer_export.data.ab import (
    FRAMES,
    SITUATIONS,
    TRAIN_FRAMES,
    ABError,
    ABQuestion,
    ab_files,
    ab_pairs,
    answer_letter,
    behaviour_questions,
    format_question,
    load_questions,
    swap_choices,
    with_matching,
    write_ab_files,
)
from onnx_steer_export.data.datasets import DATA, read_jsonl
from onnx_steer_export.eval import ab as ab_eval
from onnx_steer_export.eval.ab import (
    CONTINUATIONS,
    Variant,
    choice_mass,
    evaluate_ab,
    letter_logprobs,
    markdown,
    p_match,
    seed_variants,
    settings,
    summarise,
    write,
)
from onnx_steer_export.runtime_client import score
from onnx_steer_export.train.vectors import train_vector


def committed(name: str) -> list[dict]:
    return read_jsonl(DATA / name)


def test_committed_optimism_set_regenerates_exactly(tmp_path: Path) -> None:
    assert ab_files() == ab_files(), "the generator is deterministic"
    for name, text in ab_files().items():
        assert (DATA / name).read_text() == text, f"{name} differs from what make-splits writes"
    counts = write_ab_files(tmp_path)
    assert counts == {"ab_optimism_train.jsonl": 180, "ab_optimism_test.jsonl": 120, "ab_optimism_pairs.jsonl": 180}
    assert all((tmp_path / name).read_text() == (DATA / name).read_text() for name in counts)


def test_optimism_set_is_large_balanced_and_in_caa_format() -> None:
    train, test = committed("ab_optimism_train.jsonl"), committed("ab_optimism_test.jsonl")
    assert len(train) + len(test) >= 260 and len(train) == 180 and len(test) == 120
    for rows in (train, test):
        matching = [r["answer_matching_behavior"] for r in rows]
        assert matching.count("(A)") == matching.count("(B)") == len(rows) // 2
        for row in rows:
            assert set(row) == {"question", "answer_matching_behavior", "answer_not_matching_behavior"}
            assert {row["answer_matching_behavior"], row["answer_not_matching_behavior"]} == {"(A)", "(B)"}
            assert row["question"].count("\n\nChoices:\n (A) ") == 1 and row["question"].count("\n (B) ") == 1
        assert len({r["question"] for r in rows}) == len(rows)
    # The hopeful reaction is the matching one.
    hopeful = {h for _, h, _ in SITUATIONS}
    for row in train + test:
        letter = answer_letter(row["answer_matching_behavior"])
        chosen = row["question"].split(f" ({letter}) ", 1)[1].split("\n", 1)[0]
        assert chosen in hopeful


def test_splits_share_no_situation_reaction_or_frame() -> None:
    train, test = behaviour_questions()
    train_text = "\n".join(q.question for q in train)
    test_text = "\n".join(q.question for q in test)
    pieces = [p.strip() for frame in FRAMES for p in frame.split("{situation}") if p.strip()]
    assert len(set(pieces)) == len(pieces), "frame wordings are distinct"
    for frame in FRAMES[:TRAIN_FRAMES]:
        assert all(p.strip() not in test_text for p in frame.split("{situation}") if p.strip())
    for frame in FRAMES[TRAIN_FRAMES:]:
        assert all(p.strip() not in train_text for p in frame.split("{situation}") if p.strip())
    in_train = [any(s in train_text for s in situation) for situation in SITUATIONS]
    in_test = [any(s in test_text for s in situation) for situation in SITUATIONS]
    assert not any(a and b for a, b in zip(in_train, in_test)), "a situation or reaction in both splits"
    assert sum(in_train) == 60 and sum(in_test) == 40


def test_pairs_follow_caa_and_come_from_the_train_split_only() -> None:
    pairs = committed("ab_optimism_pairs.jsonl")
    train = committed("ab_optimism_train.jsonl")
    test_questions = {r["question"] for r in committed("ab_optimism_test.jsonl")}
    assert len(pairs) == len(train)
    for pair, row in zip(pairs, train):
        assert pair == {"prompt": row["question"], "positive": row["answer_matching_behavior"].rstrip(")"),
                        "negative": row["answer_not_matching_behavior"].rstrip(")")}
    assert not {p["prompt"] for p in pairs} & test_questions
    assert ab_pairs([ABQuestion("q", "B")]) == [{"prompt": "q", "positive": "(B", "negative": "(A"}]


def test_answer_forms_and_bad_files(tmp_path: Path) -> None:
    assert [answer_letter(v) for v in ("(A)", " (B)", "A", [" (A)"], "(C)", ["(A)", "(B)"], 1)] == \
        ["A", "B", "A", "A", None, None, None]
    good = {"question": format_question("Q?", "yes", "no"), "answer_matching_behavior": " (B)",
            "answer_not_matching_behavior": " (A)"}
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(good) + "\n\n")
    assert load_questions(path) == [ABQuestion(good["question"], "B")]
    path.write_text(json.dumps([good, good]))
    assert len(load_questions(path)) == 2, "a JSON array of the same objects"
    for bad, message in ((dict(good, answer_not_matching_behavior="(B)"), "one each"),
                         ({"question": ""}, "non-empty"), ([1], "not a JSON object")):
        path.write_text(json.dumps(bad) + "\n")
        with pytest.raises(ABError, match=message):
            load_questions(path)
    path.write_text("{nope\n")
    with pytest.raises(ABError, match=r"q.jsonl:1: not JSON"):
        load_questions(path)
    path.write_text("\n")
    with pytest.raises(ABError, match="no questions"):
        load_questions(path)


def test_swapping_choices_moves_the_matching_answer() -> None:
    question = ABQuestion(format_question("Which?\n(A) in the text is not a choice line", "hope", "gloom"), "A")
    swapped = swap_choices(question)
    assert swapped is not None and swapped.matching == "B"
    assert swapped.question == format_question("Which?\n(A) in the text is not a choice line", "gloom", "hope")
    assert swap_choices(swapped) == question
    multi = ABQuestion("Q\n\nChoices:\n (A) one\n   more\n (B) two\n", "B")
    assert swap_choices(multi) == ABQuestion("Q\n\nChoices:\n (A) two\n (B) one\n   more\n", "A")
    assert swap_choices(ABQuestion("no choice lines (A) x (B) y", "A")) is None
    assert with_matching(question, "A") is question


def test_seeds_shuffle_and_rebalance_letters() -> None:
    _, test = behaviour_questions()
    questions = test[:31]
    runs = [seed_variants(questions, seed) for seed in range(3)]
    assert seed_variants(questions, 1) == runs[1], "a seed is reproducible"
    assert len({tuple(v.index for v in run) for run in runs}) == 3, "each seed has its own order"
    assert len({tuple(v.question.matching for v in sorted(run, key=lambda v: v.index)) for run in runs}) == 3
    for run in runs:
        assert sorted(v.index for v in run) == list(range(31))
        letters = [v.question.matching for v in run]
        assert abs(letters.count("A") - letters.count("B")) == 1
        for v in run:
            original = questions[v.index]
            assert v.swapped == (v.question.matching != original.matching)
            assert v.question == (swap_choices(original) if v.swapped else original)
    even = seed_variants(test, 0)
    assert [v.question.matching for v in even].count("A") == 60
    fixed = [ABQuestion("free text, no choice lines", "A")] * 4
    assert all(not v.swapped and v.question.matching == "A" for v in seed_variants(fixed, 0))


def test_p_match_arithmetic() -> None:
    assert p_match({"A": math.log(0.3), "B": math.log(0.1)}, "A") == pytest.approx(0.75)
    assert p_match({"A": math.log(0.3), "B": math.log(0.1)}, "B") == pytest.approx(0.25)
    assert p_match({"A": -2000.0, "B": -1.0}, "A") == pytest.approx(0.0, abs=1e-300), "no overflow"
    assert p_match({"A": -1.0, "B": -1.0}, "B") == 0.5
    assert choice_mass({"A": math.log(0.3), "B": math.log(0.1)}) == pytest.approx(0.4)
    record = {"index": 0, "continuations": [{"text": "(A", "logprob": -1.5}, {"text": "(B", "logprob": -0.5}]}
    assert letter_logprobs(record) == {"A": -1.5, "B": -0.5}
    with pytest.raises(ValueError, match="where '\\(A' was sent"):
        letter_logprobs({"index": 3, "continuations": [{"text": "(B", "logprob": 0}, {"text": "(A", "logprob": 0}]})
    # Two seeds of two questions: per-seed means, then their spread.
    q = [ABQuestion("a", "A"), ABQuestion("b", "B")]
    seeds = [[Variant(0, q[0], False), Variant(1, q[1], False)], [Variant(1, q[1], False), Variant(0, q[0], False)]]

    def rec(pa: float, pb: float) -> dict:
        return {"continuations": [{"text": "(A", "logprob": math.log(pa)}, {"text": "(B", "logprob": math.log(pb)}]}

    summary = summarise(seeds, [rec(0.6, 0.2), rec(0.1, 0.3), rec(0.5, 0.5), rec(0.2, 0.2)])
    assert summary["p_match"]["per_seed"] == pytest.approx([(0.75 + 0.75) / 2, (0.5 + 0.5) / 2])
    assert summary["p_match"]["mean"] == pytest.approx(0.625) and summary["p_match"]["std"] == pytest.approx(0.125)
    assert summary["match_share"]["per_seed"] == [1.0, 0.0]
    assert summary["choice_mass"]["per_seed"] == pytest.approx([0.6, 0.7])
    assert summary["per_question"] == pytest.approx([0.625, 0.625])
    with pytest.raises(ValueError, match="3 score records for 4 questions"):
        summarise(seeds, [rec(0.5, 0.5)] * 3)


def test_settings_cover_specs_and_layer_scale_grid(tmp_path: Path) -> None:
    spec, vector = tmp_path / "s.json", tmp_path / "v.safetensors"
    grid = settings([spec], vector, [10, 12], [-1.0, 1.0])
    assert [(s.label, s.layer, s.scale) for s in grid] == [
        ("unsteered", None, None), ("s", None, -1.0), ("s", None, 1.0), ("layer 10", 10, -1.0), ("layer 10", 10, 1.0),
        ("layer 12", 12, -1.0), ("layer 12", 12, 1.0)]
    assert [(s.label, s.scale) for s in settings([spec], None, [], [])] == [("unsteered", None), ("s", None)]


@pytest.fixture(scope="module")
def small_vector(bundle_dir: Path, binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mean-difference vector at layer 10 from the first 40 training pairs, through the runtime."""
    folder = tmp_path_factory.mktemp("ab_vector")
    pairs = folder / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in read_jsonl(DATA / "ab_optimism_pairs.jsonl")[:40]))
    out = folder / "ab.safetensors"
    train_vector(bundle_dir, pairs, "mean", [10], out, binary=binary)
    return out


def test_score_client_orders_records_and_checks_counts(bundle_dir: Path, binary: Path) -> None:
    items = [{"prompt": format_question(f"Q{i}", "x", "y"), "continuations": list(CONTINUATIONS)} for i in range(3)]
    records = score(bundle_dir, items, binary=binary)
    assert [r["index"] for r in records] == [0, 1, 2]
    assert all(len(r["continuations"]) == 2 for r in records)
    assert score(bundle_dir, [], binary=binary) == []


def test_evaluate_ab_report_on_the_runtime(bundle_dir: Path, binary: Path, small_vector: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[dict]] = []

    def spy(bundle: Path, items: list[dict], specs: list[Path], chat: bool = True, binary: Path | None = None
            ) -> list[dict]:
        assert chat
        seen.append([json.loads(s.read_text()) for s in specs])
        return score(bundle, items, specs, chat, binary)

    monkeypatch.setattr(ab_eval, "score", spy)
    report = evaluate_ab(bundle_dir, DATA / "ab_optimism_test.jsonl", vector=small_vector, layers=[10],
                         scales=[-8.0, 8.0], seeds=2, limit=12, binary=binary)
    assert seen[0] == [] and seen[1] == [{"interventions": [
        {"kind": "vector", "path": str(small_vector.resolve()), "scale": -8.0, "layers": [10]}]}]
    runs = report["runs"]
    assert report["n_questions"] == 12 and report["seeds"] == 2 and report["unswappable"] == 0
    assert [(r["label"], r["layer"], r["scale"]) for r in runs] == [
        ("unsteered", None, None), ("layer 10", 10, -8.0), ("layer 10", 10, 8.0)]
    for run in runs:
        assert 0 < run["p_match"]["min"] <= run["p_match"]["mean"] <= run["p_match"]["max"] < 1
        assert 0 < run["choice_mass"]["mean"] <= 1
    # Steering moves p(match) (which way, and by how much beyond the seeds' spread, is what the committed
    # report on the whole test split measures: `make eval-ab`).
    assert all(abs(run["p_match"]["mean"] - runs[0]["p_match"]["mean"]) > 1e-4 for run in runs[1:])
    assert report["best_layer"]["layer"] == 10
    out = tmp_path / "reports" / "ab"
    out.parent.mkdir()
    write(report, out)
    assert json.loads(out.with_suffix(".json").read_text())["runs"][2]["scale"] == 8.0
    assert "| layer 10 | 10 | 8 |" in markdown(report)
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_eval_ab_command_line_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q", "answer_matching_behavior": "(A)", "answer_not_matching_behavior": "(A)"}\n')
    for args, message in ((["--vector", str(bad)], "--vector needs --layers"),
                          (["--layers", "3"], "--layers needs --vector"), (["--seeds", "0"], "at least 1"),
                          (["--questions", str(bad)], "bad.jsonl:1: answer_matching_behavior")):
        with pytest.raises(SystemExit) as exit:
            main(["eval-ab", "--bundle", str(bundle), "--out", str(tmp_path / "r"), *args])
        assert exit.value.code == 2 and message in capsys.readouterr().err


def test_end_to_end_ten_questions_unsteered(bundle_dir: Path, binary: Path) -> None:
    questions = load_questions(DATA / "ab_optimism_test.jsonl")
    picked = [questions[i * len(questions) // 10] for i in range(10)]
    items = [{"prompt": q.question, "continuations": list(CONTINUATIONS)} for q in picked]
    records = score(bundle_dir, items, binary=binary)
    for question, record in zip(picked, records):
        a, b = record["continuations"]
        # Both answers are "(" + the letter; the shared "(" has one log-probability, so the ratio compares letters.
        assert a["tokens"][0] == b["tokens"][0] == "(" and len(a["token_ids"]) == len(b["token_ids"]) == 2
        assert a["token_logprobs"][0] == pytest.approx(b["token_logprobs"][0], abs=1e-5)
        assert a["logprob"] == pytest.approx(sum(a["token_logprobs"]), abs=1e-4)
        logprobs = letter_logprobs(record)
        p = p_match(logprobs, question.matching)
        assert 0 < p < 1
        assert p + p_match(logprobs, question.other) == pytest.approx(1.0)
        assert 0 < choice_mass(logprobs) <= 1 + 1e-6
    report = evaluate_ab(bundle_dir, DATA / "ab_optimism_test.jsonl", seeds=2, limit=10, binary=binary)
    (run,) = report["runs"]
    assert 0 < run["p_match"]["min"] <= run["p_match"]["max"] < 1
    assert len(run["per_question"]) == 10 and all(0 < p < 1 for p in run["per_question"])
