"""AutoSteer: a safety prober at the layer with the highest Safety Awareness Score gates a refusal
head that acts between the final norm and the LM head.

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
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from ..data.datasets import read_jsonl, read_prompts
from ..data.tokens import bundle_tokenizer, chat_ids, encode
from ..figures import save_figure
from ..runtime_client import capture
from .common import (
    OutputView,
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


def plot_sas(scores: dict[int, float], chosen: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(scores)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(layers, [scores[layer] for layer in layers],
           color=["tab:red" if layer == chosen else "tab:blue" for layer in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("safety awareness score")
    ax.set_title(f"AutoSteer SAS per layer (chosen: {chosen})")
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


def train_autosteer(bundle: Path, harmful_paths: list[Path], benign_paths: list[Path], refusals_path: Path,
                    out: Path, name: str = "autosteer", epsilon: float = 1.0, threshold: float = 0.5,
                    prober_epochs: int = 150, prober_weight_decay: float = 1.0, head_epochs: int = 4,
                    head_lr: float = 1e-4,
                    limit: int | None = None, validation_fraction: float = 0.2, seed: int = 0,
                    plot: Path | None = None, binary: Path | None = None, *,
                    threshold_harmful: list[Path] | None = None, threshold_safe: list[Path] | None = None,
                    max_false_positive: float = 0.02, pool: Pooling = "last") -> dict:
    """SAS per layer → layer → prober → refusal head; writes `{name}_prober.onnx`, `{name}_head.onnx`,
    `{name}.json` (the spec), their torch weights `{name}_weights.safetensors`, `{name}_sas.json` and the
    SAS plot; returns a summary. With `threshold_harmful` and `threshold_safe` the threshold is chosen on
    them (`threshold` is then unused)."""
    from ..export.source import load

    tokenizer = bundle_tokenizer(bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    num_layers = manifest["model"]["num_layers"]
    if bool(threshold_harmful) != bool(threshold_safe):
        raise ValueError("choosing the threshold needs both harmful and safe validation prompts")
    harmful = evenly([p for path in harmful_paths for p in read_prompts(path)], limit)
    benign = evenly([p for path in benign_paths for p in read_prompts(path)], limit)
    states = capture(bundle, [chat_ids(tokenizer, p) for p in harmful + benign], list(range(num_layers)), pool,
                     binary)
    scores = safety_awareness({layer: s[:len(harmful)] for layer, s in states.items()},
                              {layer: s[len(harmful):] for layer, s in states.items()})
    layer = max(scores, key=lambda candidate: scores[candidate])
    print("layer  SAS")
    for candidate, score in scores.items():
        print(f"{candidate:5d}  {score:.4f}{'  <- chosen' if candidate == layer else ''}")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}_sas.json").write_text(json.dumps({"chosen_layer": layer, "sas": scores}, indent=1) + "\n")
    plot_sas(scores, layer, plot or out / f"{name}_sas.png")

    inputs = torch.from_numpy(states[layer])
    labels = torch.cat([torch.ones(len(harmful), dtype=torch.long), torch.zeros(len(benign), dtype=torch.long)])
    split = split_indices(len(labels), validation_fraction, seed)
    torch.manual_seed(seed)
    prober = Prober(states[layer][split.train])
    weights = torch.tensor([len(labels) / (2 * len(benign)), len(labels) / (2 * len(harmful))], dtype=torch.float32)
    history = fit(OutputView(prober), inputs, labels, split,
                  lambda logits, y: torch.nn.functional.cross_entropy(logits, y, weight=weights),
                  prober_epochs, 1e-3, 64, seed, desc="train prober", weight_decay=prober_weight_decay)
    with torch.no_grad():
        p_toxic = prober(inputs)[:, 1].numpy()
    val = split.validation
    val_labels = labels.numpy()[val]
    prober_auroc = auroc(p_toxic[val][val_labels == 1], p_toxic[val][val_labels == 0])
    choice = None
    if threshold_harmful and threshold_safe:
        held = {kind: evenly([p for path in paths for p in read_prompts(path)], limit)
                for kind, paths in (("harmful", threshold_harmful), ("safe", threshold_safe))}
        held_states = capture(bundle, [chat_ids(tokenizer, p) for p in held["harmful"] + held["safe"]], [layer],
                              pool, binary)[layer]
        with torch.no_grad():
            held_p = prober(torch.from_numpy(held_states))[:, 1].numpy()
        n_harmful = len(held["harmful"])
        choice = choose_threshold(held_p[:n_harmful], held_p[n_harmful:], max_false_positive)
        choice["auroc"] = auroc(held_p[:n_harmful], held_p[n_harmful:])
        threshold = choice["threshold"]
        print(f"threshold {threshold:.4f} chosen on {n_harmful} harmful / {len(held['safe'])} safe validation "
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
    return {**history, "chosen_layer": layer, "pool": pool, "sas": scores[layer], "harmful": len(harmful), "benign": len(benign),
            "prober_validation_auroc": prober_auroc, "threshold": threshold, "threshold_choice": choice,
            "refusal_tokens": len(targets),
            "head_loss_before": before, "head_loss_per_epoch": losses, "prober_sha256": prober_digest,
            "head_sha256": head_digest}
