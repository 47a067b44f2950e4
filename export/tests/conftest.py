"""Shared fixtures: the default bundle (exported by `make bundle`), the release binary, HF models."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from onnx_steer_export import REPO
from onnx_steer_export.export.source import LoadedModel, load
from onnx_steer_export.runtime_client import find_binary
from onnx_steer_export.train.reference import greedy


@pytest.fixture(scope="session")
def bundle_dir() -> Path:
    path = Path(os.environ.get("ONNX_STEER_BUNDLE", REPO / "onnx" / "smollm2-135m-instruct"))
    assert (path / "manifest.json").is_file(), f"default bundle missing at {path}; run `make bundle`"
    return path


@pytest.fixture(scope="session")
def binary() -> Path:
    return find_binary()


@pytest.fixture(scope="session")
def default_model() -> LoadedModel:
    torch.manual_seed(0)
    return load("default")


def run_generate(binary: Path, bundle: Path, *args: str) -> list[dict]:
    """Run `onnx-steer generate --json` and return one record per prompt."""
    done = subprocess.run(
        [str(binary), "generate", "--bundle", str(bundle), "--json", *args],
        capture_output=True, text=True, check=False, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def hf_greedy(loaded: LoadedModel, input_ids: list[int], max_new_tokens: int) -> list[int]:
    """HF `generate(do_sample=False)` new tokens, without the trailing EOS (the runtime drops it too)."""
    return greedy(loaded.model, input_ids, max_new_tokens, loaded.tokenizer.pad_token_id)


def generate_error(binary: Path, bundle_dir: Path, spec: dict, where: Path) -> str:
    """stderr of a generation with a one-intervention spec written in `where`, which must fail."""
    path = where / "spec.json"
    path.write_text(json.dumps({"interventions": [spec]}))
    done = subprocess.run([str(binary), "generate", "--bundle", str(bundle_dir), "--prompt", "Hi",
                           "--max-new-tokens", "2", "--steer", str(path)], capture_output=True, text=True,
                          check=False)
    assert done.returncode != 0, done.stdout
    return done.stderr


def rss_kib(process: subprocess.Popen) -> int:
    status = Path(f"/proc/{process.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))
