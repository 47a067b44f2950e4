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

from .graph_file import file_entries, save_graph, segment_files

WEIGHT_BITS = {"int4": 4, "int8": 8}
QUANTIZED_KINDS = ("layer", "head", "full")


class QuantizeError(ValueError):
    """The bundle cannot be quantized as asked (unknown precision, already quantized, out == bundle)."""


def lm_head_nodes(model, vocab_size: int) -> list[str]:
    """Names of the MatMul nodes whose constant weight projects onto the vocabulary (the LM head)."""
    weights = {init.name: list(init.dims) for init in model.graph.initializer}
    return [node.name for node in model.graph.node
            if node.op_type == "MatMul" and weights.get(node.input[1], [None])[-1] == vocab_size]


def quantize_graph(source: Path, target: Path, bits: int, head_bits: int, vocab_size: int, block_size: int,
                   accuracy_level: int, symmetric: bool) -> str | None:
    """Quantize every constant MatMul weight of `source` into `target`: the LM head to `head_bits`,
    the others to `bits`. Returns the name of `target`'s weights file (`graph_file.save_graph`)."""
    import onnx  # heavy imports here: the CLI imports this module for QuantizeError alone
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    model = onnx.load(str(source))
    head = lm_head_nodes(model, vocab_size)
    passes = [(bits, {"nodes_to_exclude": head})] + ([(head_bits, {"nodes_to_include": head})] if head else [])
    for pass_bits, nodes in passes:
        quantizer = MatMulNBitsQuantizer(model, bits=pass_bits, block_size=block_size, is_symmetric=symmetric,
                                         accuracy_level=accuracy_level, op_types_to_quantize=("MatMul",), **nodes)
        quantizer.process()
        model = quantizer.model.model
    return save_graph(model, target)


def quantize_bundle(bundle: Path, out: Path, weights: str, block_size: int = 32, accuracy_level: int = 4,
                    symmetric: bool = False, head_weights: str = "int8") -> dict:
    """Write a copy of `bundle` to `out` with weight-only quantized graphs; returns the new manifest.

    The LM head gets `head_weights`, or `weights` where that is finer (int8 by default): llama.cpp's
    4-bit files keep their output matrix at 6 or 8 bits too, as it is the most sensitive one.

    accuracy_level 4 lets MatMulNBits compute in int8 on CPU (the fast path); 0 keeps fp32 compute.
    """
    for option, value in (("--weights", weights), ("--head-weights", head_weights)):
        if value not in WEIGHT_BITS:
            raise QuantizeError(f"{option} must be one of {sorted(WEIGHT_BITS)}, got {value!r}")
    head_bits = max(WEIGHT_BITS[weights], WEIGHT_BITS[head_weights])
    manifest = json.loads((bundle / "manifest.json").read_text())
    if manifest.get("weights", {}).get("format", "float") != "float":
        raise QuantizeError(f"{bundle} is already quantized ({manifest['weights']['format']})")
    if bundle.resolve() == out.resolve():
        raise QuantizeError("--out must differ from --bundle")
    out.mkdir(parents=True, exist_ok=True)
    segments = manifest["segments"] + ([manifest["monolithic"]] if manifest.get("monolithic") else [])
    quantized = [s for s in segments if s["kind"] in QUANTIZED_KINDS]
    rewritten = {f for s in quantized for f in segment_files(s)}
    for name in sorted(set(manifest["files"]) - rewritten):
        shutil.copyfile(bundle / name, out / name)
    for segment in tqdm(quantized, desc=f"quantizing to {weights}", unit="graph"):
        segment.pop("weights", None)
        written = quantize_graph(bundle / segment["file"], out / segment["file"], WEIGHT_BITS[weights], head_bits,
                                 manifest["model"]["vocab_size"], block_size, accuracy_level, symmetric)
        if written:
            segment["weights"] = written
    files = sorted((set(manifest["files"]) - rewritten) | {f for s in quantized for f in segment_files(s)})
    manifest["name"] = out.name
    manifest["weights"] = {"format": weights, "block_size": block_size, "accuracy_level": accuracy_level,
                           "symmetric": symmetric, "head": f"int{head_bits}", "quantized_from": str(bundle)}
    manifest["files"] = file_entries(out, files)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
