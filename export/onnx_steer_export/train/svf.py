"""SVF, Steering Vector Fields: the normalised gradient of a learned concept scorer is the steering
direction, re-evaluated at every token and every steered layer.

Data: contrastive pairs (data.pairs formats), states read through the runtime at each steered layer.
A completion contrast contributes every token past the point where its two completions diverge; a
prompt contrast (e.g. an instruction to be verbose vs terse) contributes its shared tail (the chat
template's assistant header): the same tokens read in two contexts, so the states differ by the
concept and not by wording.
Scorer: one concept space shared by the layers. Layer L's state is centred and scaled into it,
z = (h − μ_L) / σ_L (σ_L a scalar, so directions keep their shape), then
s(z) = w₂·tanh(W₁z + b₁) + b₂ (or s(z) = w·z + b with --units 0), trained as a probe with the
logistic loss. Field: ∇_h s = W₁ᵀ(w₂ ⊙ (1 − tanh²(W₁z + b₁))) / σ_L in closed form, so the exported
graph `(state, base, scale, layer) → base + scale · ∇s/‖∇s‖` needs no autograd at run time.

The matched static baseline is the mean difference of the same states at the same layers, applied
with `normalize: true` at the same scale: the same step length per token, a fixed direction.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..data.pairs import Pair, load_pairs
from ..data.tokens import bundle_tokenizer
from ..runtime_client import capture
from .common import OutputView, Split, export_onnx, fit, row_scale, save_tensors, split_indices, write_spec

DEFAULT_UNITS = 32
NORM_FLOOR = 1e-12


class ConceptScorer(torch.nn.Module):
    """s(z) over a concept space shared by several layers; `units=0` makes it linear."""

    mean: torch.Tensor
    inv_scale: torch.Tensor

    def __init__(self, hidden_size: int, num_layers: int, units: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_layers, hidden_size))
        self.register_buffer("inv_scale", torch.zeros(num_layers))
        self.units = units
        self.hidden = torch.nn.Linear(hidden_size, units) if units else None
        self.out = torch.nn.Linear(units or hidden_size, 1)

    def fit_layer(self, layer: int, states: np.ndarray) -> None:
        """Centre and scale layer `layer` into the shared space from its training states."""
        mean = states.mean(0)
        spread = float(np.sqrt(((states - mean) ** 2).mean()))
        self.mean[layer] = torch.from_numpy(mean.astype(np.float32))
        self.inv_scale[layer] = 1.0 / max(spread, 1e-6)

    def project(self, state: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
        return (state - self.mean[layer]) * self.inv_scale[layer].unsqueeze(-1)

    def score(self, z: torch.Tensor) -> torch.Tensor:
        """Concept logit of points already in the shared space."""
        features = torch.tanh(self.hidden(z)) if self.hidden is not None else z
        return self.out(features).squeeze(-1)

    def gradient(self, state: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
        """∇_h s(h) in closed form (the exported field uses exactly this)."""
        w_out = self.out.weight[0]
        if self.hidden is None:
            grad_z = w_out.expand_as(state)
        else:
            activation = torch.tanh(self.hidden(self.project(state, layer)))
            grad_z = ((1 - activation * activation) * w_out) @ self.hidden.weight
        return grad_z * self.inv_scale[layer].unsqueeze(-1)


def load_scorer(path: Path) -> ConceptScorer:
    """A scorer from the `{name}_scorer.safetensors` that train_svf writes."""
    from safetensors.torch import load_file

    weights = load_file(str(path))
    num_layers, hidden_size = weights["mean"].shape
    units = weights["hidden.weight"].shape[0] if "hidden.weight" in weights else 0
    scorer = ConceptScorer(hidden_size, num_layers, units)
    scorer.load_state_dict(weights)
    return scorer.eval()


class SteeringField(torch.nn.Module):
    """The exported rewrite graph: `base + scale · ∇s(state)/‖∇s(state)‖` at layer `layer`."""

    def __init__(self, scorer: ConceptScorer) -> None:
        super().__init__()
        self.scorer = scorer

    def forward(self, state: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
                layer: torch.Tensor) -> torch.Tensor:
        grad = self.scorer.gradient(state, layer)
        direction = grad / torch.sqrt((grad * grad).sum(-1, keepdim=True) + NORM_FLOOR)
        return base + row_scale(scale, state) * direction


def shared_prefix(positive: list[int], negative: list[int]) -> int:
    """Length of the common token prefix of a pair's two sides."""
    shared = 0
    for a, b in zip(positive, negative):
        if a != b:
            break
        shared += 1
    return shared


def first_read(pair: Pair, side: list[int]) -> int:
    """Index of the first token of `side` whose state trains the scorer (see the module docs)."""
    if pair.contrast == "prompt":
        tail = shared_prefix(pair.positive[::-1], pair.negative[::-1])
        return len(side) - max(tail, 1)
    return min(shared_prefix(pair.positive, pair.negative), len(side) - 1)


def concept_states(bundle: Path, pairs_path: Path, layers: list[int],
                   binary: Path | None = None) -> tuple[dict[int, np.ndarray], np.ndarray, np.ndarray]:
    """Per layer, the states the scorer trains on (`first_read` onward in each sequence); with each
    row's label (1 = concept-positive side) and pair index (for splitting by pair)."""
    pairs = load_pairs(pairs_path, bundle_tokenizer(bundle))
    sequences = [p.positive for p in pairs] + [p.negative for p in pairs]
    states = capture(bundle, sequences, layers, "all", binary)
    keep: list[int] = []
    labels: list[float] = []
    pair_of: list[int] = []
    offset = 0
    for index, sequence in enumerate(sequences):
        pair = index % len(pairs)
        start = first_read(pairs[pair], sequence)
        keep.extend(range(offset + start, offset + len(sequence)))
        labels += [float(index < len(pairs))] * (len(sequence) - start)
        pair_of += [pair] * (len(sequence) - start)
        offset += len(sequence)
    rows = np.asarray(keep)
    return {layer: states[layer][rows] for layer in layers}, np.asarray(labels, np.float32), np.asarray(pair_of)


def train_svf(bundle: Path, pairs_path: Path, layers: list[int], out: Path, name: str, scale: float = 4.0,
              units: int = DEFAULT_UNITS, epochs: int = 60, lr: float = 1e-3, batch_size: int = 256,
              validation_fraction: float = 0.2, seed: int = 0, weight_decay: float = 0.0,
              binary: Path | None = None) -> dict:
    """Train the scorer, export `{name}.onnx` (the field), `{name}.json` (its spec), the scorer's
    weights `{name}_scorer.safetensors`, and the matched static baseline `{name}_vector.safetensors` /
    `{name}_vector.json`; returns a summary."""
    num_layers = json.loads((bundle / "manifest.json").read_text())["model"]["num_layers"]
    states, labels, pair_of = concept_states(bundle, pairs_path, layers, binary)
    hidden_size = next(iter(states.values())).shape[1]
    torch.manual_seed(seed)
    scorer = ConceptScorer(hidden_size, num_layers, units)
    pair_split = split_indices(int(pair_of.max()) + 1, validation_fraction, seed)
    in_validation = np.isin(pair_of, pair_split.validation)
    for layer in layers:
        scorer.fit_layer(layer, states[layer][~in_validation])
    with torch.no_grad():
        z = torch.cat([scorer.project(torch.from_numpy(states[layer]), torch.tensor([layer])) for layer in layers])
    targets = torch.from_numpy(np.tile(labels, len(layers)))
    validation = np.tile(in_validation, len(layers))
    rows = np.arange(len(targets))
    split = Split(train=rows[~validation], validation=rows[validation])
    # Training view: the rows are states already projected into the concept space.
    history = fit(OutputView(scorer, "score"), z, targets, split,
                  torch.nn.functional.binary_cross_entropy_with_logits, epochs, lr, batch_size, seed,
                  desc=f"train-svf {name}", weight_decay=weight_decay)

    accuracy, alignment = {}, {}
    vectors = {}
    with torch.no_grad():
        for k, layer in enumerate(layers):
            block = slice(k * len(labels), (k + 1) * len(labels))
            predicted = (scorer.score(z[block]) > 0).numpy()
            accuracy[layer] = float((predicted[in_validation] == (labels[in_validation] > 0.5)).mean())
            positive, negative = states[layer][labels > 0.5], states[layer][labels < 0.5]
            vectors[layer] = (positive.mean(0) - negative.mean(0)).astype(np.float32)
            grads = scorer.gradient(torch.from_numpy(states[layer]), torch.tensor([layer])).numpy()
            cosines = grads @ vectors[layer] / (np.linalg.norm(grads, axis=1) * np.linalg.norm(vectors[layer]) + 1e-12)
            alignment[layer] = {"mean": float(cosines.mean()), "min": float(cosines.min())}

    save_tensors({k: v.detach().numpy() for k, v in scorer.state_dict().items()}, str(out / f"{name}_scorer.safetensors"),
              metadata={"layers": json.dumps(layers), "units": str(units)})
    field_file = out / f"{name}.onnx"
    example = torch.zeros(1, 2, hidden_size)
    digest = export_onnx(SteeringField(scorer), (example, example, torch.ones(1), torch.tensor([layers[0]])),
                         ["state", "base", "scale", "layer"], "steered", field_file,
                         {"state": {0: "batch", 1: "tokens"}, "base": {0: "batch", 1: "tokens"},
                          "scale": {0: "batch"}},
                         {"kind": "svf", "layers": layers, "units": units,
                          "pairs": pairs_path.name, "bundle": bundle.name, "seed": seed})
    write_spec(out / f"{name}.json", [{"kind": "svf", "path": field_file.name, "sha256": digest,
                                       "layers": layers, "scale": scale}])
    vector_file = out / f"{name}_vector.safetensors"
    save_tensors({f"direction.{layer}": v for layer, v in vectors.items()}, str(vector_file),
              metadata={"method": "mean", "pairs": pairs_path.name, "bundle": bundle.name})
    write_spec(out / f"{name}_vector.json", [{"kind": "vector", "path": vector_file.name, "layers": layers,
                                              "scale": scale, "normalize": True}])
    return {**history, "tokens": len(labels), "pairs": int(pair_of.max()) + 1, "units": units,
            "validation_accuracy": accuracy, "gradient_cosine_with_mean_difference": alignment}
