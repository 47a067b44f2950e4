"""Export decoder LLMs to per-layer ONNX bundles for the onnx-steer runtime."""

FORMAT_VERSION = 1
