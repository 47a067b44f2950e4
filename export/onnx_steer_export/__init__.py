"""Export decoder LLMs to per-layer ONNX bundles for the onnx-steer runtime."""

from pathlib import Path

FORMAT_VERSION = 4
# The repository checkout this package is installed from (editable install): data/, target/, onnx/.
REPO = Path(__file__).resolve().parents[2]
