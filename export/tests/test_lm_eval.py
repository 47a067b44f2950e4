"""lm-evaluation-harness against the server (scaled down from `make lm-eval`): its local-completions model on
`onnx-steer serve` and its own hf model give the same accuracy and log-likelihoods on the local tasks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_lm_eval_local_completions_matches_hf(binary: Path, bundle_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "lm_eval"
    subprocess.run([sys.executable, str(REPO / "bench" / "lm_eval_parity.py"), "--bundle", str(bundle_dir),
                    "--limit", "12", "--tokenizer", str(tmp_path / "tokenizer"), "--out", str(out)],
                   check=True, env={**os.environ, "ONNX_STEER_BIN": str(binary)})
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["within_tolerance"] and report["max_difference_points"] <= 1.0
    assert {row["task"] for row in report["tasks"]} == {"onnx_steer_optimism_ab", "onnx_steer_sentiment"}
    for row in report["tasks"]:
        assert row["docs"] == 12 and row["different_picks"] == 0
        # Each request's log-likelihood sums a few tokens' log-probabilities, each within 1e-4 of HF's.
        assert row["max_loglikelihood_difference"] < 5e-4, row
