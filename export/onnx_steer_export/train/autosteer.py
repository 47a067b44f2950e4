"""AutoSteer: a safety prober at one layer gates a refusal head that acts between the final norm and the
LM head. The layer is the one with the highest Safety Awareness Score (the paper's choice), a fixed one, or
the one whose prober does best on the validation prompts (`read_layer="validation"`: a prober per layer,
all trained in one pass as `LayerProbers`; the highest TPR within the false-positive bound, then the
highest AUROC. The SAS measures how consistent the harmful − benign differences are, which need not be
how separable held-out prompts are).

SAS(L): d_i = h_L(harmful_i) − h_L(benign_i), paired by index, on the prompt's state at layer L (chat
template): its last token (`pool="last"`, the paper's reading and the default) or the mean over its tokens
(`"mean"`); SAS is the mean pairwise cosine similarity of the d_i. The last token of a chat prompt is the
template's own end; the mean reads the request itself (issue 20 in the README compares the two). The
prober reads the chosen layer:
standardise → Linear(d→64) → ReLU → Linear(64→2) → softmax, cross-entropy on harmful vs benign
training prompts (classes weighted to balance), AdamW with weight decay 1 by default: without it the
prober is over-confident on benign prompts unlike its templated benign training data (issue 6 reports
the held-out false-positive rate for decay 0, 0.1 and 1). The refusal head is S ∈ R^{d×d}, initialised to the
identity, in `logits = lm_head(n + ε·S·n)` on the final-normed state n; it is trained with the LM
loss on refusal answers to harmful training prompts only (the model is frozen, so n is computed once).
Every state comes through the runtime (`onnx-steer capture`): the prober's pooled as above, the
refusal head's n as the last layer's output at each answer position under teacher forcing, normed by the
model's final norm.

Threshold: fixed, or chosen on validation prompts that the prober never trained on (for the default bundle
the over-refusal suite's validation wordings and items): the highest TPR on the harmful validation prompts
whose false-positive rate on the safe ones stays within `max_false_positive`, the largest such threshold
on a tie (the gate opens when p(toxic) > threshold, as in the runtime).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from tqdm import tqdm

from ..data.datasets import read_jsonl, read_prompts
from ..data.tokens import bundle_tokenizer, chat_ids, encode
from ..figures import save_figure
from ..runtime_client import capture
from .common import (
    Split,
    Standardize,
    evenly,
    export_net,
    export_onnx,
    fit,
    row_scale,
    save_tensors,
    split_indices,
    write_spec,
)

PROBER_UNITS = 64
Pooling = Literal["last", "mean"]
LayerSelection = Literal["sas", "validation"]


def safety_awareness(harmful: dict[int, np.ndarray], benign: dict[int, np.ndarray]) -> dict[int, float]:
    """Mean pairwise cosine similarity of the harmful − benign differences, per layer."""
    scores = {}
    for layer, states in harmful.items():
        n = min(len(states), len(benign[layer]))
        diffs = states[:n] - benign[layer][:n]
        unit = diffs / np.maximum(np.linalg.norm(diffs, axis=1, keepdims=True), 1e-12)
        similarity = unit @ unit.T
        scores[layer] = float((similarity.sum() - np.trace(similarity)) / (n * (n - 1)))
    return scores


def plot_sas(scores: dict[int, float], chosen: int, path: Path,
             validation: dict[int, dict] | None = None) -> None:
    """SAS per layer; with `validation` (each layer's `validation_choice`) a second panel with each layer's
    validation TPR at the false-positive bound and its AUROC."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(scores)
    colours = ["tab:red" if layer == chosen else "tab:blue" for layer in layers]
    fig, axes = plt.subplots(2 if validation else 1, 1, figsize=(7, 5.6 if validation else 3.2), sharex=True,
                             squeeze=False)
    axes[0, 0].bar(layers, [scores[layer] for layer in layers], color=colours)
    axes[0, 0].set_ylabel("safety awareness score")
    axes[0, 0].set_title(f"AutoSteer layer choice (chosen: {chosen})")
    if validation:
        ax = axes[1, 0]
        bound = validation[layers[0]]["max_false_positive"]
        ax.bar(layers, [validation[layer]["tpr"] for layer in layers], color=colours,
               label=f"validation TPR at FPR ≤ {bound:g}")
        ax.plot(layers, [validation[layer]["auroc"] for layer in layers], "k.-", label="validation AUROC")
        ax.set_ylabel("held-out validation")
        ax.set_ylim(0, 1)
        ax.legend(loc="lower right", fontsize=8)
    axes[-1, 0].set_xlabel("layer")
    save_figure(fig, path)


class Prober(torch.nn.Module):
    def __init__(self, states: np.ndarray) -> None:
        super().__init__()
        self.standardize = Standardize(states)
        self.classify = torch.nn.Sequential(torch.nn.Linear(states.shape[1], PROBER_UNITS), torch.nn.ReLU(),
                                            torch.nn.Linear(PROBER_UNITS, 2))

    def logits(self, state: torch.Tensor) -> torch.Tensor:
        return self.classify(self.standardize(state))

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(state), dim=-1)


def load_weights(path: Path) -> tuple[Prober, torch.Tensor]:
    """The prober and the refusal head's S from the `{name}_weights.safetensors` train_autosteer writes."""
    from safetensors.torch import load_file

    weights = load_file(str(path))
    prober = Prober(np.zeros((2, weights["head.matrix"].shape[0]), np.float32))
    prober.load_state_dict({k.removeprefix("prober."): v for k, v in weights.items() if k.startswith("prober.")})
    return prober.eval(), weights["head.matrix"]


class RefusalHead(torch.nn.Module):
    """The exported rewrite graph: `base + scale · S·state` on the final-normed state."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.matrix = torch.nn.Parameter(torch.eye(hidden_size))

    def forward(self, state: torch.Tensor, base: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return base + row_scale(scale, state) * (state @ self.matrix.T)


def refusal_tokens(bundle: Path, norm: torch.nn.Module, sequences: list[tuple[list[int], list[int]]],
                   binary: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Final-normed states n at every answer position and the answer token each must predict: the last
    layer's output at every token, read through the runtime, then the model's final norm."""
    last = json.loads((bundle / "manifest.json").read_text())["model"]["num_layers"] - 1
    hidden = torch.from_numpy(capture(bundle, [p + a for p, a in sequences], [last], "all", binary)[last])
    states, targets, start = [], [], 0
    for prompt, answer in sequences:
        states.append(hidden[start + len(prompt) - 1:start + len(prompt) + len(answer) - 1])
        targets.append(torch.tensor(answer))
        start += len(prompt) + len(answer)
    with torch.no_grad():
        return norm(torch.cat(states)), torch.cat(targets)


def train_refusal_head(states: torch.Tensor, targets: torch.Tensor, lm_head: torch.Tensor, epsilon: float,
                       epochs: int, lr: float, batch_size: int, seed: int) -> tuple[RefusalHead, list[float]]:
    """Fit S with the LM loss (cross-entropy of the answer tokens) through the frozen LM head."""
    generator = torch.Generator().manual_seed(seed)
    head = RefusalHead(states.shape[1])
    optimiser = torch.optim.Adam(head.parameters(), lr=lr)
    scale = torch.full((1,), epsilon)
    losses = []
    bar = tqdm(range(epochs), desc="train refusal head", unit="epoch")
    for _ in bar:
        total = 0.0
        for batch in torch.randperm(len(states), generator=generator).split(batch_size):
            optimiser.zero_grad()
            steered = head(states[batch], states[batch], scale.expand(len(batch)))
            loss = torch.nn.functional.cross_entropy(steered @ lm_head.T, targets[batch])
            loss.backward()
            optimiser.step()
            total += loss.item() * len(batch)
        losses.append(total / len(states))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return head, losses


def choose_threshold(harmful: np.ndarray, safe: np.ndarray, max_false_positive: float) -> dict:
    """The gate threshold (see the module docs) and its TPR / FPR on these validation scores."""
    if not len(harmful) or not len(safe):
        raise ValueError("choosing a threshold needs harmful and safe validation prompts")
    if not 0 <= max_false_positive < 1:
        raise ValueError(f"the largest false-positive rate must lie in [0, 1), got {max_false_positive}")
    scores = np.unique(np.concatenate([harmful, safe, [0.0, 1.0]]))
    # Every distinct outcome is reached at one of the scores (p > t changes only there).
    best: dict | None = None
    for threshold in scores[::-1]:
        fpr, tpr = float((safe > threshold).mean()), float((harmful > threshold).mean())
        if fpr <= max_false_positive and (best is None or tpr > best["tpr"]):
            best = {"threshold": float(threshold), "tpr": tpr, "fpr": fpr}
    assert best is not None  # threshold 1.0 opens nothing: FPR 0
    return {**best, "max_false_positive": max_false_positive, "harmful": len(harmful), "safe": len(safe)}


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    greater = (positive[:, None] > negative[None, :]).mean()
    ties = (positive[:, None] == negative[None, :]).mean()
    return float(greater + 0.5 * ties)


class LayerProbers(torch.nn.Module):
    """Probers for several layers stacked into one net, `[B, layers, d]` in, `[B, layers, 2]` logits out, so
    `fit` trains them in one pass over the data: each starts as `Prober` would at that seed and gets the
    same batches and updates as trained alone."""

    # Stacked tensor → the `Prober` state it stacks.
    KEYS: ClassVar[dict[str, str]] = {"mean": "standardize.mean", "std": "standardize.std", "w1": "classify.0.weight",
                                      "b1": "classify.0.bias", "w2": "classify.2.weight", "b2": "classify.2.bias"}
    mean: torch.Tensor
    std: torch.Tensor
    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor

    def __init__(self, states: np.ndarray, seed: int) -> None:
        super().__init__()
        alone = []
        for layer in range(states.shape[1]):
            torch.manual_seed(seed)
            alone.append(Prober(states[:, layer]).state_dict())
        for name, key in self.KEYS.items():
            stacked = torch.stack([state[key] for state in alone])
            if key.startswith("standardize"):
                self.register_buffer(name, stacked)
            else:
                self.register_parameter(name, torch.nn.Parameter(stacked))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        z = (states - self.mean) / self.std
        hidden = torch.relu(torch.einsum("bld,lhd->blh", z, self.w1) + self.b1)
        return torch.einsum("blh,lkh->blk", hidden, self.w2) + self.b2

    def prober(self, index: int) -> Prober:
        """The prober of the `index`-th stacked layer, on its own."""
        prober = Prober(np.zeros((2, self.mean.shape[1]), np.float32))
        prober.load_state_dict({key: getattr(self, name)[index].detach().clone() for name, key in self.KEYS.items()})
        return prober.eval()


def train_probers(states: list[np.ndarray], harmful: int, split: Split, epochs: int, weight_decay: float,
                  seed: int, desc: str = "train prober") -> list[tuple[Prober, dict]]:
    """A prober per layer's pooled states (first `harmful` rows harmful, the rest benign; classes weighted
    to balance), trained at once; each with its fit history and its AUROC on `split`'s held-out rows."""
    inputs = torch.from_numpy(np.stack(states, axis=1))
    labels = torch.cat([torch.ones(harmful, dtype=torch.long), torch.zeros(len(inputs) - harmful, dtype=torch.long)])
    weights = torch.tensor([len(labels) / (2 * (len(labels) - harmful)), len(labels) / (2 * harmful)])

    def loss_per_layer(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # cross_entropy(weight=...)'s weighted mean, one per layer.
        token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y[:, None].expand(-1, logits.shape[1]),
                                                  reduction="none")
        return (weights[y][:, None] * token).sum(0) / weights[y].sum()

    stacked = LayerProbers(inputs.numpy()[split.train], seed)
    history = fit(stacked, inputs, labels, split, loss_per_layer, epochs, 1e-3, 64, seed, desc=desc,
                  weight_decay=weight_decay)
    held_labels = labels.numpy()[split.validation]
    trained = []
    for index in range(len(states)):
        prober = stacked.prober(index)
        with torch.no_grad():
            p_toxic = prober(inputs[split.validation, index])[:, 1].numpy()
        trained.append((prober, {"best_validation_loss": history["best_validation_loss"][index],
                                 "best_epoch": history["best_epoch"][index],
                                 "prober_validation_auroc": auroc(p_toxic[held_labels == 1],
                                                                  p_toxic[held_labels == 0])}))
    return trained


def validation_choice(prober: Prober, held: np.ndarray, harmful: int, max_false_positive: float) -> dict:
    """`choose_threshold` on the prober's p(toxic) for the held-out validation states (the first `harmful`
    rows harmful, the rest safe), with their AUROC."""
    with torch.no_grad():
        p_toxic = prober(torch.from_numpy(held))[:, 1].numpy()
    choice = choose_threshold(p_toxic[:harmful], p_toxic[harmful:], max_false_positive)
    return {**choice, "auroc": auroc(p_toxic[:harmful], p_toxic[harmful:])}


def train_autosteer(bundle: Path, harmful_paths: list[Path], benign_paths: list[Path], refusals_path: Path,
                    out: Path, name: str = "autosteer", epsilon: float = 1.0, threshold: float = 0.5,
                    prober_epochs: int = 150, prober_weight_decay: float = 1.0, head_epochs: int = 4,
                    head_lr: float = 1e-4,
                    limit: int | None = None, validation_fraction: float = 0.2, seed: int = 0,
                    plot: Path | None = None, binary: Path | None = None, *,
                    threshold_harmful: list[Path] | None = None, threshold_safe: list[Path] | None = None,
                    max_false_positive: float = 0.02, pool: Pooling = "last",
                    read_layer: int | LayerSelection = "sas") -> dict:
    """Layer → prober → refusal head; writes `{name}_prober.onnx`, `{name}_head.onnx`, `{name}.json` (the
    spec), their torch weights `{name}_weights.safetensors`, `{name}_sas.json` and the layer plot; returns
    a summary. With `threshold_harmful` and `threshold_safe` the threshold is chosen on them (`threshold`
    is then unused). `read_layer` is the prober's layer, or how to choose it: `"sas"` (the highest SAS, the
    paper's) or `"validation"` (a prober per layer; the highest TPR on the threshold prompts within
    `max_false_positive`, then the highest AUROC on them)."""
    from ..export.source import load

    tokenizer = bundle_tokenizer(bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    num_layers = manifest["model"]["num_layers"]
    if bool(threshold_harmful) != bool(threshold_safe):
        raise ValueError("choosing the threshold needs both harmful and safe validation prompts")
    if read_layer == "validation" and not threshold_harmful:
        raise ValueError("choosing the layer on validation prompts needs the threshold prompts")
    if isinstance(read_layer, int) and not 0 <= read_layer < num_layers:
        raise ValueError(f"read layer {read_layer} is not a layer of this {num_layers}-layer bundle")
    harmful = evenly([p for path in harmful_paths for p in read_prompts(path)], limit)
    benign = evenly([p for path in benign_paths for p in read_prompts(path)], limit)
    states = capture(bundle, [chat_ids(tokenizer, p) for p in harmful + benign], list(range(num_layers)), pool,
                     binary)
    scores = safety_awareness({layer: s[:len(harmful)] for layer, s in states.items()},
                              {layer: s[len(harmful):] for layer, s in states.items()})
    split = split_indices(len(harmful) + len(benign), validation_fraction, seed)
    held_states: dict[int, np.ndarray] = {}
    if threshold_harmful and threshold_safe:
        held = {kind: evenly([p for path in paths for p in read_prompts(path)], limit)
                for kind, paths in (("harmful", threshold_harmful), ("safe", threshold_safe))}
        n_held_harmful = len(held["harmful"])
    per_layer: dict[int, dict] = {}
    trained: dict[int, tuple[Prober, dict]] = {}
    if read_layer == "validation":
        held_states = capture(bundle, [chat_ids(tokenizer, p) for p in held["harmful"] + held["safe"]],
                              list(range(num_layers)), pool, binary)
        trained = dict(enumerate(train_probers([states[candidate] for candidate in range(num_layers)],
                                               len(harmful), split, prober_epochs, prober_weight_decay, seed,
                                               desc=f"probers at {num_layers} layers")))
        per_layer = {candidate: validation_choice(prober, held_states[candidate], n_held_harmful, max_false_positive)
                     for candidate, (prober, _) in trained.items()}
        layer = max(per_layer, key=lambda candidate: (per_layer[candidate]["tpr"], per_layer[candidate]["auroc"]))
    else:
        layer = max(scores, key=lambda candidate: scores[candidate]) if read_layer == "sas" else int(read_layer)
    print("layer  SAS     " + ("val TPR  val AUROC" if per_layer else ""))
    for candidate, score in scores.items():
        row = f"{per_layer[candidate]['tpr']:.3f}    {per_layer[candidate]['auroc']:.3f}" if per_layer else ""
        print(f"{candidate:5d}  {score:.4f}  {row}{'  <- chosen' if candidate == layer else ''}")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}_sas.json").write_text(json.dumps(
        {"chosen_layer": layer, "selection": read_layer if isinstance(read_layer, str) else "fixed", "pool": pool,
         "sas": scores, "validation": per_layer or None}, indent=1) + "\n")
    plot_sas(scores, layer, plot or out / f"{name}_sas.png", per_layer or None)

    prober, history = trained.get(layer) or train_probers([states[layer]], len(harmful), split, prober_epochs,
                                                          prober_weight_decay, seed)[0]
    choice = None
    if threshold_harmful and threshold_safe:
        if layer not in held_states:
            held_states = capture(bundle, [chat_ids(tokenizer, p) for p in held["harmful"] + held["safe"]],
                                  [layer], pool, binary)
        choice = validation_choice(prober, held_states[layer], n_held_harmful, max_false_positive)
        threshold = choice["threshold"]
        print(f"threshold {threshold:.4f} chosen on {n_held_harmful} harmful / {len(held['safe'])} safe validation "
              f"prompts: TPR {choice['tpr']:.3f}, FPR {choice['fpr']:.3f} (at most {max_false_positive}), "
              f"AUROC {choice['auroc']:.3f}")

    model = load(manifest["source"]).model
    eos = encode(tokenizer, manifest["tokenizer"]["eos_token"])
    refusals = [r for r in read_jsonl(refusals_path) if r.get("behaviour") == "refuse"]
    refusals = evenly(refusals, limit)
    sequences = [(chat_ids(tokenizer, r["prompt"]), encode(tokenizer, r["positive"]) + eos) for r in refusals]
    normed, targets = refusal_tokens(bundle, model.model.norm, sequences, binary)
    lm_head = model.lm_head.weight.detach()
    with torch.no_grad():
        before = float(torch.nn.functional.cross_entropy((1 + epsilon) * normed @ lm_head.T, targets))
    head, losses = train_refusal_head(normed, targets, lm_head, epsilon, head_epochs, head_lr, 256, seed)

    hidden = states[layer].shape[1]
    save_tensors({**{f"prober.{k}": v.detach().numpy() for k, v in prober.state_dict().items()},
               "head.matrix": head.matrix.detach().numpy()}, str(out / f"{name}_weights.safetensors"),
              metadata={"read_layer": str(layer), "pool": pool, "epsilon": str(epsilon)})
    prober_file, head_file = out / f"{name}_prober.onnx", out / f"{name}_head.onnx"
    prober_digest = export_net(prober, hidden, "probs", prober_file, {
        "kind": "autosteer_prober", "read_layer": layer, "bundle": bundle.name, "seed": seed})
    example = torch.zeros(1, hidden)
    head_digest = export_onnx(head, (example, example, torch.ones(1)), ["state", "base", "scale"], "steered",
                              head_file, {"state": {0: "batch"}, "base": {0: "batch"}, "scale": {0: "batch"}},
                              {"kind": "autosteer_head", "epsilon": epsilon, "bundle": bundle.name})
    write_spec(out / f"{name}.json", [{
        "kind": "autosteer", "prober": prober_file.name, "prober_sha256": prober_digest, "read_layer": layer,
        "pool": pool, "head": head_file.name, "head_sha256": head_digest, "threshold": threshold, "epsilon": epsilon,
        "strength": 1.0}])
    return {**history, "chosen_layer": layer, "pool": pool, "sas": scores[layer], "harmful": len(harmful),
            "benign": len(benign), "threshold": threshold, "threshold_choice": choice,
            "refusal_tokens": len(targets),
            "head_loss_before": before, "head_loss_per_epoch": losses, "prober_sha256": prober_digest,
            "head_sha256": head_digest}
