"""What the learned steering methods share: input standardisation baked into the net, a seeded
train/validation loop with a progress bar (and the view that trains a net through another of its
outputs), ONNX export of the net (batch-dynamic `state [B, d]` in), and the steer spec written next to it.

The runtime hosts every net as its own ONNX graph on the layers' execution provider, so the nets are
exported exactly as trained, standardisation included.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx
import torch
from safetensors.numpy import save_file
from tqdm import tqdm

from ..export.digest import sha256

T = TypeVar("T")


def evenly(items: list[T], limit: int | None) -> list[T]:
    """At most `limit` items, evenly spaced over the whole list (all of them without a limit)."""
    if not limit or limit >= len(items):
        return items
    return [items[i * len(items) // limit] for i in range(limit)]


class Standardize(torch.nn.Module):
    """(x - mean) / std per feature, fitted on the training states (residual streams have outlier channels)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, states: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("mean", torch.from_numpy(states.mean(0).astype(np.float32)))
        self.register_buffer("std", torch.from_numpy(states.std(0).astype(np.float32) + 1e-3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class OutputView(torch.nn.Module):
    """`net` seen through another of its methods (`output`, e.g. the logits its softmax hides), so `fit`
    trains it on what the loss wants; parameters and state are `net`'s own."""

    def __init__(self, net: torch.nn.Module, output: str = "logits") -> None:
        super().__init__()
        self.net = net
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.net, self.output)(x)


@dataclass
class Split:
    train: np.ndarray
    validation: np.ndarray


def split_indices(n: int, validation_fraction: float, seed: int) -> Split:
    order = np.random.default_rng(seed).permutation(n)
    cut = max(1, round(n * validation_fraction))
    return Split(train=order[cut:], validation=order[:cut])


def fit(net: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, split: Split,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], epochs: int, lr: float, batch_size: int,
        seed: int, desc: str, weight_decay: float = 0.0) -> dict[str, Any]:
    """Adam (AdamW with `weight_decay`) on mini-batches; keeps the weights of the epoch with the lowest
    validation loss. A `loss_fn` that returns one loss per member of a stacked net (each parameter and
    buffer indexed by member first) trains the members on their summed loss, so each gets the updates
    it would get alone, and keeps each member's own best epoch; the history then has a value per member."""
    generator = torch.Generator().manual_seed(seed)
    optimiser = (torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay) if weight_decay
                 else torch.optim.Adam(net.parameters(), lr=lr))
    train_idx = torch.from_numpy(split.train)
    val_idx = torch.from_numpy(split.validation)
    best_loss = best_epoch = torch.tensor(float("inf"))
    best_state: dict[str, torch.Tensor] = {}
    bar = tqdm(range(epochs), desc=desc, unit="epoch")
    for epoch in bar:
        net.train()
        for batch in train_idx[torch.randperm(len(train_idx), generator=generator)].split(batch_size):
            optimiser.zero_grad()
            loss_fn(net(inputs[batch]), targets[batch]).sum().backward()
            optimiser.step()
        net.eval()
        with torch.no_grad():
            val_loss = loss_fn(net(inputs[val_idx]), targets[val_idx])
        improved = val_loss < best_loss
        if improved.any():
            state = net.state_dict()
            if not best_state or val_loss.ndim == 0:
                best_state = {k: v.clone() for k, v in state.items()}
            else:
                for k, v in state.items():
                    best_state[k][improved] = v[improved]
            best_loss = torch.where(improved, val_loss, best_loss)
            best_epoch = torch.where(improved, epoch, best_epoch)
        bar.set_postfix(val_loss=f"{float(val_loss.mean()):.4f}")
    if not bool(torch.isfinite(best_loss).all()):
        raise RuntimeError(f"{desc}: no epoch reached a finite validation loss")
    net.load_state_dict(best_state)
    net.eval()
    return {"best_validation_loss": best_loss.tolist(), "best_epoch": best_epoch.long().tolist()}


def export_onnx(module: torch.nn.Module, example: tuple[torch.Tensor, ...], input_names: list[str],
                output_name: str, path: Path, dynamic_axes: dict[str, dict[int, str]],
                metadata: dict[str, object]) -> str:
    """Write `module` as an ONNX graph with `metadata` (JSON-encoded values) as metadata_props;
    returns the file's sha256 (the spec pins it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(module, example, str(path), input_names=input_names, output_names=[output_name],
                      dynamic_axes={**dynamic_axes, output_name: next(iter(dynamic_axes.values()))},
                      opset_version=17, dynamo=False)
    model = onnx.load(str(path))
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=json.dumps(value))
    onnx.save(model, str(path))
    return sha256(path)


def export_net(net: torch.nn.Module, hidden_size: int, output_name: str, path: Path,
               metadata: dict[str, object]) -> str:
    """Write a per-row net as an ONNX graph `state [B, d] -> output_name [B, ...]`."""
    return export_onnx(net, (torch.zeros(1, hidden_size),), ["state"], output_name, path,
                       {"state": {0: "batch"}}, metadata)


def save_tensors(tensors: dict[str, np.ndarray], path: Path | str,
                 metadata: dict[str, str] | None = None) -> None:
    """Write safetensors readable by other users (0644): safetensors writes 0600, which the Docker
    image's unprivileged user cannot read."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o644)


def row_scale(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-row [B] scale shaped to broadcast over a [B, ...] state (rewrite graphs)."""
    return scale.reshape(-1, *([1] * (like.dim() - 1)))


def write_spec(path: Path, interventions: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"interventions": interventions}, indent=2) + "\n")
