"""`tune`: the validation/held-out split, the candidate grid, the winner under the fluency bound, the budget
cutoff (an injected clock), usage and file errors, and one small sweep through the runtime that writes
every file and picks a fluent winner at least as good as unsteered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onnx_steer_export.__main__ import main
from onnx_steer_export.data.datasets import DATA
from onnx_steer_export.eval.tune import (
    Budget,
    Candidate,
    Prompted,
    TuneError,
    candidate_grid,
    candidate_spec,
    check_pairs,
    evenly_spaced,
    is_fluent,
    layer_label,
    load_contrasts,
    load_eval,
    metric_value,
    select_winner,
    split_indices,
    sweep,
    tuned_spec,
)
from onnx_steer_export.train.vectors import train_vectors


def test_split_is_deterministic_disjoint_and_keeps_prompts_together() -> None:
    keys = [f"q{i}" for i in range(20)]
    validation, held_out = split_indices(keys, 0.5, seed=0)
    assert (validation, held_out) == split_indices(keys, 0.5, seed=0)
    assert len(validation) == len(held_out) == 10
    assert sorted(validation + held_out) == list(range(20)) and not set(validation) & set(held_out)
    assert validation == sorted(validation) and held_out == sorted(held_out)
    assert split_indices(keys, 0.5, seed=1) != (validation, held_out)
    assert len(split_indices(keys, 0.25)[0]) == 5
    # Rows sharing a prompt fall on one side.
    shared = ["a", "b", "a", "c", "b", "d", "a", "e"]
    val, held = split_indices(shared, 0.5, seed=3)
    for key in set(shared):
        rows = {i for i, k in enumerate(shared) if k == key}
        assert rows <= set(val) or rows <= set(held)
    # At least one on each side, whatever the fraction.
    assert [len(part) for part in split_indices(["x", "y", "z"], 0.01)] == [1, 2]
    assert [len(part) for part in split_indices(["x", "y", "z"], 0.99)] == [2, 1]
    for fraction in (0.0, 1.0, 1.5):
        with pytest.raises(TuneError, match="strictly between 0 and 1"):
            split_indices(keys, fraction)
    with pytest.raises(TuneError, match="at least 2 distinct prompts"):
        split_indices(["same", "same"], 0.5)


def test_limit_spreads_evenly() -> None:
    assert evenly_spaced(list(range(10)), 4) == [0, 2, 5, 7]
    assert evenly_spaced(list(range(3)), None) == [0, 1, 2] == evenly_spaced(list(range(3)), 5)


def test_candidate_grid_nests_method_layer_scale() -> None:
    grid = candidate_grid(["vector", "pca"], [8, 12], [-8, 8, 8])
    assert [(c.method, c.layers, c.scale) for c in grid] == [
        ("vector", (8,), -8.0), ("vector", (8,), 8.0), ("vector", (12,), -8.0), ("vector", (12,), 8.0),
        ("pca", (8,), -8.0), ("pca", (8,), 8.0), ("pca", (12,), -8.0), ("pca", (12,), 8.0)]
    assert Candidate("pca", (12,), 8.0).label == "pca layer 12 scale 8"
    # Spans come after the single layers, for vector and pca only.
    grid = candidate_grid(["vector", "svf"], [8], [1.0], spans=[[10, 11, 12]])
    assert [(c.method, c.layers) for c in grid] == [("vector", (8,)), ("vector", (10, 11, 12)), ("svf", (8,))]
    assert Candidate("vector", (10, 11, 12), 0.5).label == "vector layer 10-12 scale 0.5"
    assert Candidate("vector", (8, 12), 0.5).label == "vector layer 8,12 scale 0.5"
    # The trainer refuses an unknown method before it reads anything.
    with pytest.raises(ValueError, match="method must be mean or pca, got 'median'"):
        train_vectors(Path("no-bundle"), Path("no-pairs.jsonl"), {"mean": Path("a"), "median": Path("b")}, [1])


def result(validation: float, nll_increase: float, bound: float = 0.5) -> dict:
    return {"validation": validation, "nll_increase": nll_increase, "eligible": is_fluent(nll_increase, bound)}


def test_winner_is_the_best_fluent_candidate_that_beats_unsteered() -> None:
    assert is_fluent(0.5, 0.5) and is_fluent(-0.1, 0.5) and not is_fluent(0.51, 0.5)
    assert not is_fluent(float("nan"), 0.5)
    # The best metric is not fluent: the next best fluent one wins.
    results = [result(0.60, 0.1), result(0.90, 0.8), result(0.70, 0.4), result(0.65, 0.0)]
    assert select_winner(0.5, results) == 2
    # Nothing fluent beats unsteered (a tie goes to unsteered): None.
    assert select_winner(0.7, results) is None
    assert select_winner(0.95, results) is None
    # Equal metrics: the smaller NLL increase, then the earlier candidate.
    assert select_winner(0.5, [result(0.8, 0.3), result(0.8, 0.1), result(0.8, 0.1)]) == 1
    assert select_winner(0.5, []) is None
    trained = {"pca": {"base": {"kind": "vector", "path": "pca.safetensors"}}}
    spec = tuned_spec(Candidate("pca", (12,), 8.0), trained)
    assert spec == {"interventions": [{"kind": "vector", "path": "pca.safetensors", "scale": 8.0, "layers": [12]}]}
    spec = tuned_spec(Candidate("pca", (10, 11), 0.5), trained)
    assert spec["interventions"][0]["layers"] == [10, 11] and spec["interventions"][0]["scale"] == 0.25
    assert tuned_spec(None, trained) == {"interventions": []}


def test_learned_candidates_take_their_layer_and_scale() -> None:
    trained: dict[str, dict] = {
        "l2s": {"by_layer": {10: {"kind": "l2s", "path": "l2s_10.onnx", "read_layer": 8, "layer": 10, "scale": 1.0},
                             12: {"kind": "l2s", "path": "l2s_12.onnx", "read_layer": 10, "layer": 12, "scale": 1.0}}},
        "svf": {"base": {"kind": "svf", "path": "svf.onnx", "layers": [10, 12], "scale": 1.0}},
        "w2s": {"base": {"kind": "w2s", "router": "w2s_router.onnx", "bank": "w2s_bank.safetensors", "read_layer": 8,
                         "top_k": 1, "scale": 1.0}},
    }
    assert candidate_spec(Candidate("l2s", (12,), 0.5), trained)["interventions"] == [
        {"kind": "l2s", "path": "l2s_12.onnx", "read_layer": 10, "layer": 12, "scale": 0.5}]
    with pytest.raises(TuneError, match="l2s steers one layer per candidate, got 10-12"):
        candidate_spec(Candidate("l2s", (10, 11, 12), 0.5), trained)
    assert candidate_spec(Candidate("svf", (10,), 4.0), trained)["interventions"] == [
        {"kind": "svf", "path": "svf.onnx", "layers": [10], "scale": 4.0}]
    assert candidate_spec(Candidate("w2s", None, 2.0), trained)["interventions"][0]["scale"] == 2.0
    # The shared artifact is not changed by a candidate.
    assert trained["svf"]["base"]["layers"] == [10, 12] and trained["w2s"]["base"]["scale"] == 1.0
    # w2s has one routed "layer"; a method can have its own scales.
    grid = candidate_grid(["vector", "w2s", "svf"], [10, 12], [1.0], {"svf": [2.0, 4.0], "w2s": [0.5, 1.0]})
    assert [(c.method, c.layers, c.scale) for c in grid] == [
        ("vector", (10,), 1.0), ("vector", (12,), 1.0), ("w2s", None, 0.5), ("w2s", None, 1.0),
        ("svf", (10,), 2.0), ("svf", (10,), 4.0), ("svf", (12,), 2.0), ("svf", (12,), 4.0)]
    assert Candidate("w2s", None, 1.0).label == "w2s layer routed scale 1"


def test_harmful_and_benign_prompts_split_separately(tmp_path: Path) -> None:
    harmful, benign = tmp_path / "harmful.txt", tmp_path / "benign.txt"
    harmful.write_text("".join(f"harm {i}\n" for i in range(10)))
    benign.write_text("".join(f"fine {i}\n" for i in range(4)))
    items = [i for i in load_eval(harmful, "refusal", benign) if isinstance(i, Prompted)]
    assert [i.benign for i in items] == [False] * 10 + [True] * 4
    validation, held_out = split_indices([i.prompt for i in items], 0.5, 0, [i.benign for i in items])
    assert sum(items[i].benign for i in validation) == 2 and sum(items[i].benign for i in held_out) == 2
    assert len(validation) == len(held_out) == 7
    with pytest.raises(TuneError, match="needs --benign"):
        load_eval(harmful, "refusal")
    with pytest.raises(TuneError, match="belongs to the refusal metric"):
        load_eval(harmful, "sentiment", benign)
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(TuneError, match="has no prompts"):
        load_eval(tmp_path / "empty.txt", "sentiment")
    # l2s and w2s need completion pairs.
    with pytest.raises(TuneError, match="verbosity_pairs.jsonl:1: l2s and w2s learn from completion pairs"):
        check_pairs(DATA / "verbosity_pairs.jsonl", ["vector", "l2s", "w2s"])
    check_pairs(DATA / "verbosity_pairs.jsonl", ["vector", "svf"])


class FakeClock:
    """Seconds that only move when the work below says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_budget_stops_before_a_candidate_that_would_overrun() -> None:
    clock = FakeClock()
    budget = Budget(0.5, clock)  # 30 s from now
    assert budget.allows(30.0) and not budget.allows(30.1)
    clock.now += 5.0  # training and the baseline took 5 s
    grid = candidate_grid(["vector"], [1, 2], [1.0, 2.0, 3.0])
    firsts: list[float] = []

    def work(candidate: Candidate) -> dict:
        clock.now += 8.0
        return {"layers": candidate.layers, "scale": candidate.scale}

    done, skipped = sweep(grid, work, budget, first_estimate_s=4.0, on_first=firsts.append)
    # Starts at 5, 13, 21 (each expected to end by 30: 13, 21, 29); at 29 the next would end at 37.
    assert [(r["layers"], r["scale"]) for r in done] == [((1,), 1.0), ((1,), 2.0), ((1,), 3.0)]
    assert all(r["seconds"] == 8.0 for r in done) and firsts == [8.0]
    assert skipped == grid[3:]
    # The estimate before the first candidate is the baseline's: too long, nothing runs.
    late = Budget(0.5, clock)
    clock.now += 25.0
    assert sweep(grid, work, late, first_estimate_s=6.0) == ([], grid)
    # No budget: everything runs.
    done, skipped = sweep(grid, work, Budget(None, clock), first_estimate_s=1e9)
    assert len(done) == len(grid) and skipped == []
    with pytest.raises(TuneError, match="positive"):
        Budget(0, clock)


def test_contrast_file_errors(tmp_path: Path) -> None:
    assert load_contrasts(DATA / "sentiment_pairs_small.jsonl")[0].prompt == "How was your weekend?"
    bad = tmp_path / "bad.jsonl"
    for text, message in (("{oops\n", "bad.jsonl:1: not JSON"),
                          ('{"positive_prompt": "a", "negative_prompt": "b"}\n', "needs string prompt"),
                          ('{"prompt": "p", "positive": "", "negative": "n"}\n', "empty positive"),
                          ("\n", "has no pairs")):
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_contrasts(bad)


def fake_bundle(tmp_path: Path) -> Path:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"model": {"num_layers": 30}}))
    return bundle


def test_tune_usage_and_file_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = fake_bundle(tmp_path)
    pairs = str(DATA / "sentiment_pairs_small.jsonl")
    base = ["tune", "--bundle", str(bundle), "--pairs", pairs, "--eval", pairs, "--metric", "logprob",
            "--layers", "10,12", "--scales", "1,2", "--out", str(tmp_path / "out")]

    def with_option(option: str, value: str, *more: str) -> list[str]:
        args = list(base)
        for name, text in zip((option, *more[::2]), (value, *more[1::2])):
            if name in args:
                args[args.index(name) + 1] = text
            else:
                args += [name, text]
        return args

    usage = (
        (with_option("--methods", "vector,lora"), "methods are a comma list of vector, pca, l2s, svf, w2s"),
        (with_option("--read-gap", "0"), "--read-gap must be at least 1"),
        (with_option("--svf-scales", "x"), "scales are comma-separated numbers"),
        ([*base, "--bound-from-reference"], "--bound-from-reference needs a --reference"),
        (with_option("--metric", "vader"), "invalid choice"),
        (with_option("--layers", "12,30"), "--layers/--spans 30 out of range: the bundle has layers 0-29"),
        (with_option("--spans", "28-31"), "--layers/--spans 30,31 out of range"),
        (with_option("--spans", "14-10"), "spans are A-B[,C-D] with A <= B"),
        (with_option("--spans", "12"), "spans are A-B[,C-D] with A <= B"),
        (with_option("--scales", "a,b"), "scales are comma-separated numbers"),
        (with_option("--validation-fraction", "1"), "strictly between 0 and 1"),
        (with_option("--fluency-tokens", "1"), "--fluency-tokens must be at least 2"),
        (with_option("--budget", "0"), "--budget must be a positive number"),
        (with_option("--limit", "1"), "--limit must be at least 2"),
        (with_option("--max-nll-increase", "-1"), "must not be negative"),
        (with_option("--eval", str(tmp_path / "missing.jsonl")), "no such file"),
    )
    for args, message in usage:
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2, args
        assert message in capsys.readouterr().err, args
    # A file of the wrong format for the metric: one error line, exit 2, before anything runs.
    assert main(with_option("--metric", "refusal", "--eval", str(DATA / "harmful_test.jsonl"))) == 2
    assert "the refusal metric needs --benign prompts" in capsys.readouterr().err
    assert main(with_option("--methods", "l2s", "--pairs", str(DATA / "verbosity_pairs.jsonl"))) == 2
    assert "l2s learn from completion pairs" in capsys.readouterr().err
    for metric, message in (("logprob", "the logprob metric needs string prompt"),
                            ("ab", "needs a non-empty string `question`")):
        eval_file = DATA / ("ab_optimism_test.jsonl" if metric == "logprob" else "sentiment_pairs_small.jsonl")
        assert main(with_option("--metric", metric, "--eval", str(eval_file))) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_tune_end_to_end_on_the_runtime(bundle_dir: Path, binary: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A small real sweep: 16 sentiment pairs (trained on and, split in half, evaluated on), both methods,
    2 layers and one span, 2 scales, the logprob metric."""
    monkeypatch.setenv("ONNX_STEER_BIN", str(binary))
    out = tmp_path / "tune"
    pairs = str(DATA / "sentiment_pairs_small.jsonl")
    assert main(["tune", "--bundle", str(bundle_dir), "--pairs", pairs, "--eval", pairs, "--metric", "logprob",
                 "--methods", "vector,pca", "--layers", "10,14", "--spans", "11-13", "--scales", "2,8",
                 "--limit", "16",
                 "--fluency-tokens", "64", "--out", str(out)]) == 0
    assert "time estimate:" in capsys.readouterr().out
    for name in ("tuned.json", "tune.json", "tune.md", "tune.png", "vector.safetensors", "pca.safetensors"):
        assert (out / name).is_file(), name
    assert (out / "tune.png").stat().st_size > 10_000
    report = json.loads((out / "tune.json").read_text())
    assert report["n_used"] == 16 and report["n_validation"] == 8 and report["n_held_out"] == 8
    assert report["same_file"] and report["skipped"] == [] and report["fluency"]["scored"] == 63
    candidates = report["candidates"]
    assert [(c["method"], c["layers"], c["scale"]) for c in candidates] == [
        (m, layers, s) for m in ("vector", "pca") for layers in ([10], [14], [11, 12, 13]) for s in (2.0, 8.0)]
    base = report["unsteered"]["validation"]
    for c in candidates:
        assert c["eligible"] == (c["nll_increase"] <= 0.5) and c["seconds"] > 0
        assert c["delta"] == pytest.approx(c["validation"] - base)
    winner = report["winner"]
    assert winner is not None, "toward the positive side, some fluent candidate raises the margin"
    chosen = [c for c in candidates if c["winner"]]
    assert len(chosen) == 1 and chosen[0]["eligible"] and chosen[0]["validation"] >= base
    assert chosen[0]["validation"] == max(c["validation"] for c in candidates if c["eligible"])
    tuned = json.loads((out / "tuned.json").read_text())
    assert tuned == {"interventions": [{"kind": "vector", "path": f"{winner['method']}.safetensors",
                                        "scale": winner["scale"] / len(winner["layers"]),
                                        "layers": winner["layers"]}]}
    # The written spec runs as it is and reproduces the winner's held-out figure.
    items = load_contrasts(DATA / "sentiment_pairs_small.jsonl")
    held = [items[i] for i in split_indices([c.prompt for c in items], 0.5, 0)[1]]
    assert metric_value(bundle_dir, "logprob", held, [out / "tuned.json"], binary) == pytest.approx(
        report["held_out"]["winner"], abs=1e-5)
    markdown = (out / "tune.md").read_text()
    assert f"**Winner: {winner['method']}, layer {layer_label(winner['layers'])}, scale {winner['scale']:g}**" in markdown
    assert markdown.count("\n| vector |") + markdown.count("\n| pca |") + markdown.count("\n| **") == 12
    assert "| vector | 11-13 | 2 |" in markdown or "| **vector** | 11-13 | 2 |" in markdown


def test_tune_learned_methods_on_generations(bundle_dir: Path, binary: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """l2s, svf and w2s trained from 16 sentiment pairs, ranked by the sentiment of short generations for 6
    benign prompts, with the hand-made reference scored beside them and bounding the fluency."""
    monkeypatch.setenv("ONNX_STEER_BIN", str(binary))
    out = tmp_path / "tune"
    reference = tmp_path / "reference.json"
    train_vectors(bundle_dir, DATA / "sentiment_pairs_small.jsonl", {"mean": tmp_path / "s.safetensors"}, [12])
    reference.write_text(json.dumps({"interventions": [{"kind": "vector", "path": "s.safetensors", "scale": 0.5,
                                                        "layers": [12]}]}))
    assert main(["tune", "--bundle", str(bundle_dir), "--pairs", str(DATA / "sentiment_pairs_small.jsonl"),
                 "--eval", str(DATA / "benign_prompts.txt"), "--metric", "sentiment", "--methods", "l2s,svf,w2s",
                 "--layers", "10,12", "--scales", "0.5", "--svf-scales", "4", "--w2s-scales", "0.5,1",
                 "--w2s-limit", "16", "--limit", "6", "--max-new-tokens", "8", "--reference", str(reference),
                 "--bound-from-reference", "--out", str(out)]) == 0
    report = json.loads((out / "tune.json").read_text())
    assert [(c["method"], c["layers"], c["scale"]) for c in report["candidates"]] == [
        ("l2s", [10], 0.5), ("l2s", [12], 0.5), ("svf", [10], 4.0), ("svf", [12], 4.0), ("w2s", None, 0.5),
        ("w2s", None, 1.0)]
    assert report["n_validation"] == report["n_held_out"] == 3
    reference_row = report["references"][0]
    bound = max(0.0, reference_row["validation"]["nll_increase"])
    assert report["fluency"]["kind"] == "generations" and report["fluency"]["max_nll_increase"] == pytest.approx(bound)
    for c in report["candidates"]:
        assert -1 <= c["validation"] <= 1 and c["eligible"] == (c["nll_increase"] <= bound)
    assert report["trained"]["w2s"]["label_scale"] == 1.0 and report["trained"]["l2s"]["layers"]["12"]["read_layer"] == 10
    assert "held_out" in reference_row and -1 <= reference_row["held_out"]["value"] <= 1
    # The written spec is what the winner was (or empty when unsteered won), and it loads in the runtime.
    tuned = json.loads((out / "tuned.json").read_text())
    if report["winner"] is None:
        assert tuned == {"interventions": []}
    else:
        assert tuned["interventions"][0]["kind"] == report["winner"]["method"]
    assert "reference `" in (out / "tune.md").read_text()
