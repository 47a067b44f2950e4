"""Static steering vectors (mean difference / PCA) from contrastive pairs.

Hidden states come from the bundle itself through `onnx-steer capture`, so a vector is trained
on exactly the activations the runtime will steer. Layer L is the output of decoder block L.
The pairs (data.pairs formats: completion or prompt contrast) are tokenized as the runtime sees them;
the state read is each sequence's last token.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data.pairs import load_pairs
from ..data.tokens import bundle_tokenizer
from ..runtime_client import capture_last_token
from .common import save_tensors

VECTOR_METHODS = ("mean", "pca")


def direction(positive: np.ndarray, negative: np.ndarray, method: str) -> np.ndarray:
    """Mean difference, or the first principal component of the differences with positives projecting higher."""
    if method == "mean":
        return (positive.mean(0) - negative.mean(0)).astype(np.float32)
    if method == "pca":
        diffs = positive - negative
        _, _, vt = np.linalg.svd(diffs - diffs.mean(0), full_matrices=False)
        component = vt[0]
        if (positive @ component).mean() < (negative @ component).mean():
            component = -component
        return component.astype(np.float32)
    raise ValueError(f"method must be mean or pca, got {method!r}")


def train_vector(bundle: Path, pairs_path: Path, method: str, layers: list[int], out: Path,
                 chat: bool = True, binary: Path | None = None) -> dict[int, np.ndarray]:
    """Compute one direction per layer and write `direction.{L}` tensors to `out` (safetensors)."""
    return train_vectors(bundle, pairs_path, {method: out}, layers, chat, binary)[method]


def train_vectors(bundle: Path, pairs_path: Path, outs: dict[str, Path], layers: list[int], chat: bool = True,
                  binary: Path | None = None) -> dict[str, dict[int, np.ndarray]]:
    """`train_vector` for several methods (method → output file) from one capture of the pairs' states."""
    unknown = [m for m in outs if m not in VECTOR_METHODS]
    if unknown:
        raise ValueError(f"method must be mean or pca, got {unknown[0]!r}")
    pairs = load_pairs(pairs_path, bundle_tokenizer(bundle), chat)
    states = capture_last_token(bundle, [p.positive for p in pairs] + [p.negative for p in pairs], layers, binary)
    n = len(pairs)
    trained = {}
    for method, out in outs.items():
        vectors = {layer: direction(states[layer][:n], states[layer][n:], method) for layer in layers}
        out.parent.mkdir(parents=True, exist_ok=True)
        save_tensors({f"direction.{layer}": v for layer, v in vectors.items()}, str(out),
                     metadata={"method": method, "pairs": str(n), "bundle": bundle.name})
        trained[method] = vectors
    return trained
