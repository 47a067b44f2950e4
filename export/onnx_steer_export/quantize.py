"""Weight-only quantization of an exported bundle: every constant MatMul weight of the layer, head and
monolithic graphs becomes an ONNX Runtime `MatMulNBits` node (int4 or int8 blocks with fp32 scales).

Activations, the KV cache and the steering interfaces stay in the bundle's dtype, so every steer spec
trained on the fp32 bundle runs unchanged on the quantized one. The embedding table stays as it is:
it is read one row per token and costs no bandwidth worth saving.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from tqdm import tqdm

from .bundle import sha256

WEIGHT_BITS = {"int4": 4, "int8": 8}
QUANTIZED_KINDS = ("layer", "head", "full")


class QuantizeError(ValueError):
    """The bundle cannot be quantized as asked (unknown precision, already quantized, out == bundle)."""


def quantize_graph(source: Path, target: Path, bits: int, block_size: int, accuracy_level: int,
                   symmetric: bool) -> None:
    """Quantize every constant MatMul weight of `source` into `target`."""
    import onnx  # heavy imports here: the CLI imports this module for QuantizeError alone
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), bits=bits, block_size=block_size, is_symmetric=symmetric,
                                     accuracy_level=accuracy_level, op_types_to_quantize=("MatMul",))
    quantizer.process()
    model = quantizer.model.model
    # The monolithic graph is over 2 GB only in fp32; quantized graphs fit one protobuf.
    onnx.save_model(model, str(target), save_as_external_data=model.ByteSize() > 2**31 - 1)


def quantize_bundle(bundle: Path, out: Path, weights: str, block_size: int = 32, accuracy_level: int = 4,
                    symmetric: bool = False) -> dict:
    """Write a copy of `bundle` to `out` with weight-only quantized graphs; returns the new manifest.

    accuracy_level 4 lets MatMulNBits compute in int8 on CPU (the fast path); 0 keeps fp32 compute.
    """
    if weights not in WEIGHT_BITS:
        raise QuantizeError(f"--weights must be one of {sorted(WEIGHT_BITS)}, got {weights!r}")
    manifest = json.loads((bundle / "manifest.json").read_text())
    if manifest.get("weights", {}).get("format", "float") != "float":
        raise QuantizeError(f"{bundle} is already quantized ({manifest['weights']['format']})")
    if bundle.resolve() == out.resolve():
        raise QuantizeError("--out must differ from --bundle")
    out.mkdir(parents=True, exist_ok=True)
    segments = manifest["segments"] + ([manifest["monolithic"]] if manifest.get("monolithic") else [])
    quantized = {s["file"] for s in segments if s["kind"] in QUANTIZED_KINDS}
    for name in tqdm(sorted(manifest["files"]), desc=f"quantizing to {weights}", unit="file"):
        if name in quantized:
            quantize_graph(bundle / name, out / name, WEIGHT_BITS[weights], block_size, accuracy_level, symmetric)
        else:
            shutil.copyfile(bundle / name, out / name)
    manifest["name"] = out.name
    manifest["weights"] = {"format": weights, "block_size": block_size, "accuracy_level": accuracy_level,
                           "symmetric": symmetric, "quantized_from": str(bundle)}
    manifest["files"] = {name: {"sha256": sha256(out / name), "bytes": (out / name).stat().st_size}
                         for name in manifest["files"]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
