"""W2S, Where to Steer: a router picks the steering layer per input (the method in full below).

Bank: one steering vector per candidate layer (taken from a vector file, e.g. the refusal vector of
`make steer`). Labels: for each training input and candidate layer l, steer with `scale · v_l` at l
and score log p(desired) − log p(undesired) of the input's two completions with the runtime's own scores
(behaviour_pairs.jsonl: refusal for harmful, compliance for benign inputs); the best layer is the label.
Router: standardise → Linear(d→64) → ReLU → Linear(64→K) → softmax, on the last prompt token's state at
an early read layer (read through the runtime), trained with cross-entropy.
The baseline is the best single fixed layer: the candidate with the highest mean training score.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file
from tqdm import tqdm

from ..data.tokens import bundle_tokenizer, chat_ids
from ..export.digest import sha256
from ..runtime_client import capture_last_token, score
from .common import OutputView, Standardize, evenly, export_net, fit, save_tensors, split_indices, write_spec

ROUTER_UNITS = 64


class Router(torch.nn.Module):
    def __init__(self, states: np.ndarray, num_layers: int) -> None:
        super().__init__()
        self.standardize = Standardize(states)
        self.classify = torch.nn.Sequential(torch.nn.Linear(states.shape[1], ROUTER_UNITS), torch.nn.ReLU(),
                                            torch.nn.Linear(ROUTER_UNITS, num_layers))

    def logits(self, state: torch.Tensor) -> torch.Tensor:
        return self.classify(self.standardize(state))

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(state), dim=-1)


def layer_scores(bundle: Path, records: list[dict], bank: dict[int, np.ndarray], scale: float,
                 binary: Path | None = None) -> np.ndarray:
    """[N, K] behaviour score of each input steered at each candidate layer: log p(desired) − log
    p(undesired) of its two completions after its chat prompt, scored by the runtime (`onnx-steer score`)."""
    items = [{"prompt": r["prompt"], "continuations": [r["positive"], r["negative"]]} for r in records]
    scores = np.zeros((len(records), len(bank)), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        for k, (layer, vector) in enumerate(tqdm(bank.items(), desc="w2s labels", unit="layer")):
            vector_file, spec = Path(tmp) / f"layer_{layer}.safetensors", Path(tmp) / f"layer_{layer}.json"
            save_tensors({f"direction.{layer}": vector}, str(vector_file))
            write_spec(spec, [{"kind": "vector", "path": vector_file.name, "scale": scale, "layers": [layer]}])
            for row, record in enumerate(score(bundle, items, [spec], binary=binary)):
                desired, undesired = record["continuations"]
                scores[row, k] = desired["logprob"] - undesired["logprob"]
    return scores


def layers_problem(layers: list[int], read_layer: int) -> str | None:
    """Why the router cannot read at `read_layer` and choose among `layers`, or None."""
    if min(layers) > read_layer:
        return None
    return (f"every candidate layer must be above --read-layer {read_layer} (got {layers}): the router reads the "
            "state before the chosen layer runs")


def train_w2s(bundle: Path, data: Path, bank_path: Path, layers: list[int], read_layer: int, out: Path,
              scale: float = 1.0, limit: int | None = None, epochs: int = 200, lr: float = 1e-3,
              batch_size: int = 64, validation_fraction: float = 0.2, seed: int = 0, name: str = "w2s",
              binary: Path | None = None) -> dict:
    """Label, train and export the router; writes `{name}_router.onnx`, `{name}_bank.safetensors`,
    `{name}.json`, the fixed-layer baseline `{name}_fixed.json` and the per-input scores
    `{name}_labels.json`; returns a summary."""
    problem = layers_problem(layers, read_layer)
    if problem:
        raise ValueError(problem)
    source = load_file(str(bank_path))
    missing = [layer for layer in layers if f"direction.{layer}" not in source]
    if missing:
        raise ValueError(f"{bank_path} has no direction for layers {missing}")
    bank = {layer: source[f"direction.{layer}"].astype(np.float32) for layer in sorted(layers)}
    records = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    records = evenly(records, limit)

    tokenizer = bundle_tokenizer(bundle)
    prompts = [chat_ids(tokenizer, r["prompt"]) for r in records]
    scores = layer_scores(bundle, records, bank, scale, binary)
    labels = scores.argmax(1)
    states = capture_last_token(bundle, prompts, [read_layer], binary)[read_layer]
    split = split_indices(len(records), validation_fraction, seed)
    torch.manual_seed(seed)
    router = Router(states[split.train], len(bank))
    # Cross-entropy wants the router's logits.
    history = fit(OutputView(router), torch.from_numpy(states), torch.from_numpy(labels), split,
                  torch.nn.functional.cross_entropy, epochs, lr, batch_size, seed, desc=f"train-w2s seed {seed}")
    with torch.no_grad():
        routed = router(torch.from_numpy(states)).argmax(1).numpy()
    val = split.validation
    fixed = int(scores[split.train].mean(0).argmax())
    candidates = list(bank)

    bank_file = out / f"{name}_bank.safetensors"
    out.mkdir(parents=True, exist_ok=True)
    save_tensors({f"direction.{layer}": v for layer, v in bank.items()}, str(bank_file),
              metadata={"source": bank_path.name, "bundle": bundle.name})
    router_file = out / f"{name}_router.onnx"
    digest = export_net(router, states.shape[1], "probs", router_file, {
        "kind": "w2s", "hidden_size": states.shape[1], "read_layer": read_layer, "layers": candidates,
        "bundle": bundle.name, "seed": seed})
    write_spec(out / f"{name}.json", [{
        "kind": "w2s", "router": router_file.name, "router_sha256": digest, "bank": bank_file.name,
        "bank_sha256": sha256(bank_file), "read_layer": read_layer, "top_k": 1, "scale": scale}])
    write_spec(out / f"{name}_fixed.json", [{"kind": "vector", "path": bank_file.name, "scale": scale,
                                             "layers": [candidates[fixed]]}])
    label_counts = {str(candidates[k]): int((labels == k).sum()) for k in range(len(candidates))}
    (out / f"{name}_labels.json").write_text(json.dumps({
        "layers": candidates, "scale": scale,
        "inputs": [{"prompt": r["prompt"], "behaviour": r.get("behaviour"), "scores": [round(float(x), 3) for x in row],
                    "label": candidates[int(k)]} for r, row, k in zip(records, scores, labels)]}, indent=1) + "\n")
    return {**history, "samples": len(records), "label_counts": label_counts,
            "best_fixed_layer": candidates[fixed],
            "validation_accuracy": float((routed[val] == labels[val]).mean()),
            "validation_score": {"router": float(scores[val, routed[val]].mean()),
                                 "fixed_layer": float(scores[val, fixed].mean()),
                                 "oracle": float(scores[val].max(1).mean())}}
