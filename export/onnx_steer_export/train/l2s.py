"""L2S, Learning to Steer: a small net predicts an input-specific steering vector (the method in full below).

Targets: for each training input, `δ = h⁺ − h⁻` at the steer layer L*, the last-token states of the
same chat prompt followed by the desired and by the undesired completion (behaviour_pairs.jsonl:
refuse, or refer to a professional, depending on the input). Inputs whose desired behaviour is to
comply (benign requests) get δ = 0: answering normally is the model's own behaviour.
Net g: standardise → Linear(d→100) → tanh → Linear(100→d, no bias), its last layer initialised from a
truncated SVD of the centred δ's. Input: the last prompt token's state at the read layer L′ < L*.
Loss: MSE(g, δ) + λ₁·mean|g − δ| − 0.1·cos(g, δ); Adam.
The runtime runs g once per row at prefill and adds `scale · g(x)` at L*.

The mean-difference baseline with the same L* is the mean of the same δ's; it is written too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..data.pairs import load_pairs
from ..data.tokens import bundle_tokenizer, chat_ids
from ..runtime_client import capture_last_token
from .common import Standardize, export_net, fit, save_tensors, split_indices, write_spec

HIDDEN_UNITS = 100


class L2SNet(torch.nn.Module):
    def __init__(self, states: np.ndarray, targets: np.ndarray, hidden_units: int = HIDDEN_UNITS) -> None:
        super().__init__()
        d = states.shape[1]
        self.standardize = Standardize(states)
        self.encode = torch.nn.Linear(d, hidden_units)
        self.decode = torch.nn.Linear(hidden_units, d, bias=False)
        centred = targets - targets.mean(0)
        _, singular, vt = np.linalg.svd(centred, full_matrices=False)
        rank = min(hidden_units, vt.shape[0])
        init = np.zeros((d, hidden_units), dtype=np.float32)
        init[:, :rank] = (vt[:rank].T * singular[:rank] / np.sqrt(len(targets)))
        with torch.no_grad():
            self.decode.weight.copy_(torch.from_numpy(init))

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.decode(torch.tanh(self.encode(self.standardize(state))))


def l2s_loss(l1_weight: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mse = torch.nn.functional.mse_loss(predicted, target)
        l1 = (predicted - target).abs().mean()
        cos = torch.nn.functional.cosine_similarity(predicted, target, dim=-1).mean()
        return mse + l1_weight * l1 - 0.1 * cos
    return loss


def layers_problem(read_layer: int, steer_layer: int) -> str | None:
    """Why the net cannot read at `read_layer` and steer at `steer_layer`, or None."""
    if read_layer < steer_layer:
        return None
    return (f"--read-layer ({read_layer}) must be below --steer-layer ({steer_layer}): the runtime reads the state "
            "before it steers")


def train_l2s(bundle: Path, data: Path, read_layer: int, steer_layer: int, out: Path, scale: float = 1.0,
              epochs: int = 100, lr: float = 1e-4, batch_size: int = 64, l1_weight: float = 0.1,
              validation_fraction: float = 0.15, seed: int = 0, name: str = "l2s",
              binary: Path | None = None) -> dict:
    """Train g, export `{name}.onnx` and `{name}.json`, plus the same-δ mean baseline
    `{name}_mean.safetensors` and `{name}_mean.json`; returns a summary."""
    problem = layers_problem(read_layer, steer_layer)
    if problem:
        raise ValueError(problem)
    records = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    tokenizer = bundle_tokenizer(bundle)
    pairs = load_pairs(data, tokenizer)
    inputs = [chat_ids(tokenizer, r["prompt"]) for r in records]
    n = len(pairs)
    states = capture_last_token(bundle, inputs + [p.positive for p in pairs] + [p.negative for p in pairs],
                                [read_layer, steer_layer], binary)
    x = states[read_layer][:n]
    delta = states[steer_layer][n:2 * n] - states[steer_layer][2 * n:]
    # Inputs whose desired behaviour is the model's own need no shift: the net learns to leave them alone.
    delta[[r.get("behaviour") == "comply" for r in records]] = 0.0
    split = split_indices(n, validation_fraction, seed)
    torch.manual_seed(seed)
    net = L2SNet(x[split.train], delta[split.train])
    history = fit(net, torch.from_numpy(x), torch.from_numpy(delta), split, l2s_loss(l1_weight), epochs, lr,
                  batch_size, seed, desc=f"train-l2s seed {seed}")
    with torch.no_grad():
        predicted = net(torch.from_numpy(x[split.validation])).numpy()
    target = delta[split.validation]
    cos = (predicted * target).sum(1) / (np.linalg.norm(predicted, axis=1) * np.linalg.norm(target, axis=1) + 1e-9)
    mean_vector = delta[split.train].mean(0)
    mean_cos = (target @ mean_vector) / (np.linalg.norm(target, axis=1) * np.linalg.norm(mean_vector) + 1e-9)

    d = x.shape[1]
    onnx_path = out / f"{name}.onnx"
    digest = export_net(net, d, "vector", onnx_path, {
        "kind": "l2s", "hidden_size": d, "read_layer": read_layer, "steer_layer": steer_layer,
        "bundle": bundle.name, "seed": seed, "data": data.name})
    write_spec(out / f"{name}.json", [{"kind": "l2s", "path": onnx_path.name, "sha256": digest,
                                       "read_layer": read_layer, "layer": steer_layer, "scale": scale}])
    save_tensors({f"direction.{steer_layer}": mean_vector.astype(np.float32)}, str(out / f"{name}_mean.safetensors"),
              metadata={"method": "mean of the L2S targets", "bundle": bundle.name})
    write_spec(out / f"{name}_mean.json", [{"kind": "vector", "path": f"{name}_mean.safetensors", "scale": scale,
                                            "layers": [steer_layer]}])
    return {**history, "samples": n, "validation": len(split.validation),
            "validation_cosine": float(cos.mean()), "mean_vector_validation_cosine": float(mean_cos.mean()),
            "target_norm": float(np.linalg.norm(target, axis=1).mean()),
            "predicted_norm": float(np.linalg.norm(predicted, axis=1).mean())}
