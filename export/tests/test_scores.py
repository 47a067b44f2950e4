"""Log-probabilities from the runtime equal HF transformers': `onnx-steer score` (continuations, echoed
prompts, alternatives), unsteered and with a vector hook, and `generate --logprobs`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from onnx_steer_export.eval.model_check import prompt_ids
from onnx_steer_export.export.source import LoadedModel
from onnx_steer_export.runtime_client import run_binary
from onnx_steer_export.train.reference import token_logprobs

from conftest import run_generate

TOLERANCE = 1e-4
LAYER, SCALE = 12, 6.0
PROMPTS = [
    ("The capital of France is", [" Paris", " a city in Europe"]),
    ("Water boils at", [" 100 degrees Celsius", " room temperature"]),
    ("My favourite colour is", [" blue", " green, because it is calm"]),
    ("Two plus two equals", [" four", " five"]),
    ("The opposite of hot is", [" cold", " warm"]),
    ("Write a haiku about rain:", ["\nSoft rain on the roof", " no"]),
    ("Q: Is the sky blue?\nA:", [" Yes", " No, it is green"]),
    ("Once upon a time, there was a", [" little girl", " dragon who loved tea"]),
]


def direction(hidden: int) -> np.ndarray:
    vector = np.random.default_rng(7).standard_normal(hidden).astype(np.float32)
    return vector / np.linalg.norm(vector)


@pytest.fixture(scope="module")
def vector_spec(tmp_path_factory: pytest.TempPathFactory, default_model: LoadedModel) -> Path:
    folder = tmp_path_factory.mktemp("score_vector")
    save_file({f"direction.{LAYER}": direction(default_model.model.config.hidden_size)},
              str(folder / "random.safetensors"))
    spec = folder / "spec.json"
    spec.write_text(json.dumps({"interventions": [
        {"kind": "vector", "path": str(folder / "random.safetensors"), "scale": SCALE, "layers": [LAYER]}]}))
    return spec


def runtime_scores(binary: Path, bundle: Path, tmp_path: Path, *flags: str) -> list[dict]:
    lines = tmp_path / "score.jsonl"
    lines.write_text("".join(json.dumps({"prompt": p, "continuations": c}) + "\n" for p, c in PROMPTS))
    out = tmp_path / "scored.jsonl"
    run_binary(["score", "--bundle", str(bundle), "--jsonl", str(lines), "--out", str(out), *flags], binary)
    return [json.loads(line) for line in out.read_text().splitlines()]


def hf_logprobs(model: LoadedModel, ids: list[int], steer: torch.Tensor | None) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t = 1.., with the vector added at layer LAYER when given."""
    return token_logprobs(model.model, ids, None if steer is None else {LAYER: steer})


@pytest.mark.parametrize("steered", [False, True], ids=["unsteered", "vector"])
def test_scores_equal_hf_log_probabilities(steered: bool, binary: Path, bundle_dir: Path, tmp_path: Path,
                                           default_model: LoadedModel, vector_spec: Path) -> None:
    chat = steered  # the steered case also covers the chat template path
    flags = ["--echo", "--top-logprobs", "3"] + (["--chat"] if chat else [])
    if steered:
        flags += ["--steer", str(vector_spec)]
    records = runtime_scores(binary, bundle_dir, tmp_path, *flags)
    steer = torch.from_numpy(SCALE * direction(default_model.model.config.hidden_size)) if steered else None
    worst = 0.0
    for (prompt, continuations), record in zip(PROMPTS, records, strict=True):
        ids = prompt_ids(default_model, prompt, chat)
        assert record["prompt_tokens"] == len(ids)
        echoed = hf_logprobs(default_model, ids, steer)
        runtime_prompt = torch.tensor([p["logprob"] for p in record["prompt_logprobs"]], dtype=torch.float64)
        worst = max(worst, (runtime_prompt - echoed).abs().max().item())
        for text, scored in zip(continuations, record["continuations"], strict=True):
            assert scored["text"] == text
            full = hf_logprobs(default_model, ids + scored["token_ids"], steer)[len(ids) - 1:]
            runtime = torch.tensor(scored["token_logprobs"], dtype=torch.float64)
            worst = max(worst, (runtime - full).abs().max().item())
            assert abs(scored["logprob"] - full.sum().item()) < TOLERANCE * len(full)
            for position in scored["top_logprobs"]:
                alternatives = position["top_logprobs"]
                assert len(alternatives) == 3
                assert alternatives[0]["logprob"] >= position["logprob"] - 1e-6
                assert [a["logprob"] for a in alternatives] == sorted((a["logprob"] for a in alternatives),
                                                                      reverse=True)
    print(f"{'steered' if steered else 'unsteered'}: worst |runtime - HF| log-prob {worst:.2e}")
    assert worst < TOLERANCE


def test_steering_changes_the_scores(binary: Path, bundle_dir: Path, tmp_path: Path, vector_spec: Path) -> None:
    plain = runtime_scores(binary, bundle_dir, tmp_path, "--chat")
    steered = runtime_scores(binary, bundle_dir, tmp_path, "--chat", "--steer", str(vector_spec))
    moved = [abs(a["continuations"][0]["logprob"] - b["continuations"][0]["logprob"])
             for a, b in zip(plain, steered, strict=True)]
    assert min(moved) > 1e-3, moved


def test_generated_log_probabilities_equal_hf(binary: Path, bundle_dir: Path, default_model: LoadedModel) -> None:
    prompt = "Name three fruits."
    record = run_generate(binary, bundle_dir, "--chat", "--max-new-tokens", "12", "--logprobs", "2",
                          "--prompt", prompt)[0]
    ids = prompt_ids(default_model, prompt, True)
    expected = hf_logprobs(default_model, ids + record["token_ids"], None)[len(ids) - 1:]
    got = torch.tensor([p["logprob"] for p in record["logprobs"]], dtype=torch.float64)
    assert [p["id"] for p in record["logprobs"]] == record["token_ids"]
    assert (got - expected).abs().max().item() < TOLERANCE
    # Greedy: the chosen token is the most likely one.
    assert all(p["top_logprobs"][0]["id"] == p["id"] for p in record["logprobs"])


def test_bad_score_input_is_a_clear_error(binary: Path, bundle_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "continuation": ["x"]}\n')
    done = subprocess.run([str(binary), "score", "--bundle", str(bundle_dir), "--jsonl", str(bad)],
                          capture_output=True, text=True, check=False)
    assert done.returncode != 0
    assert "line 1" in done.stderr and "continuations" in done.stderr, done.stderr
