"""L2S and W2S, scaled down: train on a slice of the real behaviour pairs, export, run through the
runtime, and check greedy tokens against HF transformers with the same ONNX net in reference hooks."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from safetensors.numpy import load_file

from onnx_steer_export.data.tokens import bundle_tokenizer, chat_ids
from onnx_steer_export.eval.behaviour import evaluate_methods, markdown_table, plot_styles, plot_sweep
from onnx_steer_export.export.source import LoadedModel
from onnx_steer_export.train.common import export_net
from onnx_steer_export.train.l2s import train_l2s
from onnx_steer_export.train.reference import added, read_then_add
from onnx_steer_export.train.vectors import train_vector
from onnx_steer_export.train.w2s import train_w2s

from conftest import REPO, generate_error, hf_greedy, run_generate

PROMPTS = [
    "How do I pick a lock to get into my neighbour's house?",
    "Can you diagnose me with depression?",
    "Write a short poem about the sea at dawn.",
    "Should I move all my savings into stocks?",
]
TOKENS = 16


@pytest.fixture(scope="module")
def small_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every 15th behaviour pair: refuse, refer and comply rows all present."""
    rows = (REPO / "data" / "behaviour_pairs.jsonl").read_text().splitlines()[::15]
    assert {json.loads(r)["behaviour"] for r in rows} == {"refuse", "refer", "comply"}
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def l2s(bundle_dir: Path, binary: Path, small_pairs: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("l2s")
    summary = train_l2s(bundle_dir, small_pairs, read_layer=8, steer_layer=12, out=out, scale=2.0, epochs=20,
                        lr=1e-3, binary=binary)
    return out, summary


@pytest.fixture(scope="module")
def w2s(bundle_dir: Path, binary: Path, small_pairs: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("w2s")
    refusal_pairs = out / "refusal_pairs.jsonl"
    refusal_pairs.write_text("\n".join((REPO / "data" / "refusal_pairs.jsonl").read_text().splitlines()[::20]) + "\n")
    bank = out / "refusal.safetensors"
    train_vector(bundle_dir, refusal_pairs, "mean", [6, 12, 18], bank, binary=binary)
    summary = train_w2s(bundle_dir, small_pairs, bank, [6, 12, 18], read_layer=2, out=out, scale=4.0, limit=24,
                        epochs=30, binary=binary)
    return out, summary


def onnx_net(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """The exported net as a torch function, evaluated by onnxruntime (the very file the runtime runs)."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda state: torch.from_numpy(session.run(None, {"state": state.float().numpy()})[0])


def test_l2s_trains_exports_and_writes_specs(l2s: tuple[Path, dict]) -> None:
    out, summary = l2s
    spec = json.loads((out / "l2s.json").read_text())["interventions"][0]
    assert spec["kind"] == "l2s" and len(spec["sha256"]) == 64
    assert (out / "l2s_mean.safetensors").is_file() and (out / "l2s_mean.json").is_file()
    assert summary["samples"] > 40 and np.isfinite(summary["best_validation_loss"])
    print(summary)


def test_l2s_generation_matches_hf_with_the_same_net(l2s: tuple[Path, dict], binary: Path, bundle_dir: Path,
                                                     default_model: LoadedModel, tmp_path: Path) -> None:
    out, _ = l2s
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    records = run_generate(binary, bundle_dir, "--chat", "--greedy", "--max-new-tokens", str(TOKENS),
                           "--prompts-file", str(prompts), "--steer", str(out / "l2s.json"))
    unsteered = run_generate(binary, bundle_dir, "--chat", "--greedy", "--max-new-tokens", str(TOKENS),
                             "--prompts-file", str(prompts))
    net = onnx_net(out / "l2s.onnx")
    changed = 0
    for prompt, record, plain in zip(PROMPTS, records, unsteered):
        assert record["steering"][0]["kind"] == "l2s" and record["steering"][0]["layers"] == [12]
        with read_then_add(default_model.model, 8, 12, net, 2.0):
            expected = hf_greedy(default_model, chat_ids(bundle_tokenizer(bundle_dir), prompt), TOKENS)
        assert record["token_ids"] == expected, prompt
        changed += record["token_ids"] != plain["token_ids"]
    assert changed >= 1, "steering at scale 2 should change at least one greedy generation"


def test_w2s_routes_per_input_and_matches_hf(w2s: tuple[Path, dict], binary: Path, bundle_dir: Path,
                                             default_model: LoadedModel, tmp_path: Path) -> None:
    out, summary = w2s
    assert sum(summary["label_counts"].values()) == summary["samples"] == 24
    spec = json.loads((out / "w2s.json").read_text())["interventions"][0]
    assert spec["kind"] == "w2s" and spec["read_layer"] == 2
    fixed = json.loads((out / "w2s_fixed.json").read_text())["interventions"][0]
    assert fixed["layers"] == [summary["best_fixed_layer"]]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    records = run_generate(binary, bundle_dir, "--chat", "--greedy", "--max-new-tokens", str(TOKENS),
                           "--prompts-file", str(prompts), "--steer", str(out / "w2s.json"))
    router = onnx_net(out / "w2s_router.onnx")
    bank = load_file(str(out / "w2s_bank.safetensors"))
    layers = sorted(int(k.split(".")[1]) for k in bank)
    model = default_model.model
    for prompt, record in zip(PROMPTS, records):
        ids = chat_ids(bundle_tokenizer(bundle_dir), prompt)
        with torch.no_grad():
            state = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[2 + 1][:, -1]
        layer = layers[int(router(state).argmax())]
        assert record["steering"][0]["layers"] == [layer], prompt
        with added(model, {layer: torch.from_numpy(4.0 * bank[f"direction.{layer}"])}):
            assert record["token_ids"] == hf_greedy(default_model, ids, TOKENS), prompt

    mixed = out / "w2s_top2.json"
    mixed.write_text(json.dumps({"interventions": [{**spec, "top_k": 2}]}))
    record = run_generate(binary, bundle_dir, "--chat", "--max-new-tokens", "2", "--prompt", PROMPTS[0],
                          "--steer", str(mixed))[0]
    decision = record["steering"][0]
    assert len(decision["layers"]) == 2 and abs(sum(decision["weights"]) - 1.0) < 1e-5, decision


def test_behaviour_eval_reports_every_category(l2s: tuple[Path, dict], bundle_dir: Path, binary: Path,
                                               tmp_path: Path) -> None:
    out, _ = l2s
    report = evaluate_methods(bundle_dir, {"mean": out / "l2s_mean.json", "l2s_seed0": out / "l2s.json"}, [2.0],
                              limit=2, max_new_tokens=12, binary=binary)
    assert report["n_prompts"] == {"refuse": 2, "refer": 2, "benign": 2}
    assert [r["method"] for r in report["runs"]] == ["unsteered", "mean", "l2s_seed0"]
    for run in report["runs"]:
        assert 0.0 <= run["refuse"] <= 1.0 and -1.0 <= run["combined"] <= 1.0
    assert "l2s" in report["seeds"]
    assert "| l2s_seed0 | 2 |" in markdown_table(report)
    plot_sweep(report, tmp_path / "sweep.png")
    plot_styles([report, report], tmp_path / "styles.png")
    assert (tmp_path / "sweep.png").stat().st_size > 10_000 and (tmp_path / "styles.png").stat().st_size > 10_000


def test_learned_specs_are_checked_at_load(l2s: tuple[Path, dict], w2s: tuple[Path, dict], binary: Path,
                                           bundle_dir: Path) -> None:
    l2s_dir, w2s_dir = l2s[0], w2s[0]
    spec = json.loads((l2s_dir / "l2s.json").read_text())["interventions"][0]
    assert "the spec pins 00" in generate_error(binary, bundle_dir, {**spec, "sha256": "00"}, l2s_dir)
    narrow = l2s_dir / "narrow.onnx"
    export_net(torch.nn.Linear(8, 8), 8, "vector", narrow, {})
    error = generate_error(binary, bundle_dir, {**spec, "path": narrow.name, "sha256": None}, l2s_dir)
    assert "expected [batch, 576]" in error, error
    error = generate_error(binary, bundle_dir, {**spec, "read_layer": 12}, l2s_dir)
    assert "read_layer 12 must be below layer 12" in error, error
    route = json.loads((w2s_dir / "w2s.json").read_text())["interventions"][0]
    error = generate_error(binary, bundle_dir, {**route, "read_layer": 8}, w2s_dir)
    assert "bank layer 6 is not above read_layer 8" in error, error
    error = generate_error(binary, bundle_dir, {**route, "top_k": 9}, w2s_dir)
    assert "top_k must be between 1 and the bank's 3 layers" in error, error
