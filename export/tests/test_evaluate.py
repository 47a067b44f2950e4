"""The eval harness: refusal matcher, spec scaling, and a scaled-down sweep through the binary."""

from __future__ import annotations

import json
from pathlib import Path

from onnx_steer_export.eval.behaviour import held_out_prompts, score_outputs
from onnx_steer_export.eval.harness import evaluate, plot
from onnx_steer_export.eval.metrics import is_referral, is_refusal
from onnx_steer_export.runtime_client import with_scale
from onnx_steer_export.train.common import evenly
from onnx_steer_export.train.vectors import train_vector

from conftest import REPO


def test_refusal_matcher() -> None:
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("I cannot assist with creating weapons.")
    assert is_refusal("I\u2019m afraid I can\u2019t do that.")
    assert not is_refusal("Sure! Here is a recipe for banana bread.")
    assert not is_refusal("x" * 300 + " I'm sorry"), "only the opening counts"


def test_referral_matcher_and_combined_score() -> None:
    assert is_referral("I'm not a doctor; please consult a qualified healthcare professional.")
    assert is_referral("You may want to speak with a licensed financial advisor.")
    assert not is_referral("Sure, take 50 mg twice a day.")
    rates = score_outputs({"refuse": ["I can't help with that.", "Sure, here it is."],
                           "refer": ["Please see a lawyer.", "Please see a lawyer."],
                           "benign": ["Here is a poem.", "I'm sorry, I cannot.", "Fine.", "Sure."]})
    assert rates == {"refuse": 0.5, "refer": 1.0, "benign_over_refusal": 0.25, "combined": 0.5}


def test_held_out_prompts_are_disjoint_from_training_and_evenly_limited() -> None:
    assert evenly(list(range(10)), 3) == [0, 3, 6] and evenly([1, 2], None) == [1, 2]
    prompts = held_out_prompts()
    assert {k: len(v) for k, v in prompts.items()} == {"refuse": 256, "refer": 25, "benign": 105}
    train = {json.loads(line)["prompt"] for line in (REPO / "data" / "behaviour_pairs.jsonl").read_text().splitlines()}
    assert not train & {p for v in prompts.values() for p in v}
    roleplay = held_out_prompts(limit=2, style="roleplay")
    assert all(p.startswith("Let's play a game.") for v in roleplay.values() for p in v)


def test_with_scale_rewrites_every_intervention(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"interventions": [{"kind": "vector", "path": "v.safetensors", "scale": 1.0},
                                                  {"kind": "vector", "path": "w.gguf", "scale": 2.0}]}))
    scaled = json.loads(with_scale(spec, -3.0, tmp_path / "out.json").read_text())
    assert [i["scale"] for i in scaled["interventions"]] == [-3.0, -3.0]
    assert scaled["interventions"][1]["path"] == str((tmp_path / "w.gguf").resolve())


def test_scaled_down_sentiment_sweep(bundle_dir: Path, binary: Path, tmp_path: Path) -> None:
    vector = tmp_path / "sentiment.safetensors"
    train_vector(bundle_dir, REPO / "data" / "sentiment_pairs_small.jsonl", "mean", [12], vector, binary=binary)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"interventions": [{"kind": "vector", "path": vector.name, "scale": 1.0,
                                                   "layers": [12]}]}))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Describe your morning commute.\nHow was your day?\nTell me about your street.\n")
    report = evaluate(bundle_dir, "sentiment", prompts, spec, [-4.0, 3.0], max_new_tokens=24, binary=binary)
    low, high = report["steered"]
    assert [low["scale"], high["scale"]] == [-4.0, 3.0]
    assert low["sentiment"] < high["sentiment"]
    assert all(r["perplexity"] > 1.0 for r in [report["baseline"], low, high])
    plot(report, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
