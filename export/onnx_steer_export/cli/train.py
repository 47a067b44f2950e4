"""train-vector, train-l2s, train-w2s, train-svf, train-autosteer: steering artifacts with their specs;
compose-specs: several specs as one."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import (
    Commands,
    add_artifact_out,
    add_bundle,
    add_command,
    add_split,
    add_training_args,
    existing_file,
    layer_list,
)


def cmd_train_vector(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from ..train.vectors import train_vector

    vectors = train_vector(args.bundle, args.pairs, args.method, args.layers, Path(args.out), chat=not args.no_chat)
    norms = ", ".join(f"{layer}: {float((v ** 2).sum() ** 0.5):.2f}" for layer, v in vectors.items())
    print(f"wrote {args.out} ({args.method}; |v| per layer {norms})")


def cmd_train_l2s(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from ..train.l2s import layers_problem, train_l2s

    problem = layers_problem(args.read_layer, args.steer_layer)
    if problem:
        parser.error(problem)
    summary = train_l2s(args.bundle, args.data, args.read_layer, args.steer_layer, Path(args.out), args.scale,
                        args.epochs, args.lr, args.batch_size, args.l1, args.validation, args.seed, args.name)
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}/{args.name}.onnx with spec {args.name}.json, and the mean baseline {args.name}_mean.json")


def cmd_train_w2s(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from ..train.w2s import layers_problem, train_w2s

    problem = layers_problem(args.layers, args.read_layer)
    if problem:
        parser.error(problem)
    summary = train_w2s(args.bundle, args.data, args.bank, args.layers, args.read_layer, Path(args.out),
                        args.scale, args.limit, args.epochs, args.lr, args.batch_size, args.validation, args.seed,
                        args.name)
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}/{args.name}_router.onnx, {args.name}_bank.safetensors, spec {args.name}.json and "
          f"the fixed-layer baseline {args.name}_fixed.json")


def cmd_train_svf(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from ..train.svf import train_svf

    summary = train_svf(args.bundle, args.data, args.layers, Path(args.out), args.name, args.scale, args.units,
                        args.epochs, args.lr, args.batch_size, args.validation, args.seed)
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}/{args.name}.onnx with spec {args.name}.json, and the matched static vector "
          f"{args.name}_vector.json")


def layer_selection(text: str) -> int | str:
    """--read-layer: sas, validation or a layer index."""
    if text in ("sas", "validation"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sas, validation or a layer index, got {text!r}") from None


def cmd_train_autosteer(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from ..train.autosteer import train_autosteer

    summary = train_autosteer(args.bundle, args.harmful, args.benign, args.refusals, Path(args.out), args.name,
                              args.epsilon, args.threshold, args.prober_epochs, args.prober_weight_decay,
                              args.head_epochs, args.head_lr, args.limit, args.validation, args.seed,
                              Path(args.plot) if args.plot else None, threshold_harmful=args.threshold_harmful,
                              threshold_safe=args.threshold_safe, max_false_positive=args.max_false_positive,
                              pool=args.pool, read_layer=args.read_layer)
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}/{args.name}_prober.onnx, {args.name}_head.onnx and the spec {args.name}.json")


def cmd_compose_specs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from ..runtime_client import set_strength
    from ..train.common import write_spec

    out = Path(args.out)
    interventions = []
    for spec in args.specs:
        # Paths in a spec are relative to its folder: composing across folders would need each rewritten.
        if spec.resolve().parent != out.resolve().parent:
            parser.error(f"{spec} is not in {out.parent}: compose specs that sit in the output's folder")
        try:
            interventions += json.loads(spec.read_text())["interventions"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            parser.error(f"{spec} is not a steer spec with an interventions list ({e})")
    if args.scale is not None:
        for intervention in interventions:
            set_strength(intervention, args.scale)
    write_spec(out, interventions)
    print(f"wrote {out} ({len(interventions)} interventions from {len(args.specs)} specs)")


def register(commands: Commands) -> None:
    vector = add_command(
        commands, "train-vector", cmd_train_vector,
        help="train a static steering vector (mean difference or PCA) from contrastive pairs",
        description="Read last-token states of each pair's two sides through the bundle (onnx-steer capture) "
        "and write direction.{L} tensors. Pairs JSONL: {prompt, positive, negative} (completion contrast) or "
        "{positive_prompt, negative_prompt}.",
    )
    add_bundle(vector)
    vector.add_argument("--pairs", required=True, type=existing_file, help="pairs JSONL")
    vector.add_argument("--method", choices=["mean", "pca"], default="mean",
                        help="mean: mean(pos) - mean(neg); pca: first principal component of the differences, "
                        "unit length, signed so positives project higher")
    vector.add_argument("--layers", required=True, type=layer_list,
                        help="A-B or A,B,C (layer L = output of decoder block L)")
    vector.add_argument("--out", required=True, help="output .safetensors")
    vector.add_argument("--no-chat", action="store_true", help="do not wrap prompts in the chat template")

    l2s = add_command(
        commands, "train-l2s", cmd_train_l2s,
        help="train an L2S net that predicts an input-specific steering vector, export it to ONNX with a spec",
        description="L2S (Learning to Steer: a small net maps each input's state to its own steering vector). "
        "Targets are per-input shifts delta = h+ - h- at --steer-layer from "
        "completion-contrast pairs whose desired side depends on the input (--data, e.g. data/behaviour_pairs.jsonl). "
        "The net reads the last prompt token at --read-layer. Writes NAME.onnx, the spec NAME.json and the "
        "mean-of-targets baseline NAME_mean.safetensors / NAME_mean.json to --out.",
    )
    l2s.add_argument("--read-layer", type=int, required=True, help="L': layer whose last-token state the net reads")
    l2s.add_argument("--steer-layer", type=int, required=True, help="L*: layer the predicted vector is added to (> L')")
    add_training_args(l2s, name="l2s", epochs=100, lr=1e-4, validation=0.15,
                      scale_help="strength written into the spec")
    l2s.add_argument("--l1", type=float, default=0.1, help="weight of the mean-absolute-error term")

    w2s = add_command(
        commands, "train-w2s", cmd_train_w2s,
        help="train a W2S router that picks the steering layer per input, export it to ONNX with a spec",
        description="W2S (Where to Steer: a router picks, per input, the layer a steering vector is added at). "
        "Labels each input of --data with the candidate layer whose "
        "steering (scale * bank vector, HF reference hooks) best raises log p(positive) - log p(negative), then "
        "trains a router on the last prompt token's state at --read-layer. Writes NAME_router.onnx, "
        "NAME_bank.safetensors, the spec NAME.json and the best-fixed-layer baseline NAME_fixed.json to --out.",
    )
    w2s.add_argument("--bank", required=True, type=existing_file,
                     help="vector file with direction.{L} for every candidate layer")
    w2s.add_argument("--layers", required=True, type=layer_list,
                     help="candidate layers, A-B or A,B,C (all above --read-layer)")
    w2s.add_argument("--read-layer", type=int, required=True, help="early layer whose last-token state is routed on")
    add_training_args(w2s, name="w2s", epochs=200, lr=1e-3, validation=0.2,
                      scale_help="steering strength for labelling and in the spec")
    w2s.add_argument("--limit", type=int, help="label only N inputs, evenly spaced over --data (faster)")

    svf = add_command(
        commands, "train-svf", cmd_train_svf,
        help="train an SVF concept scorer and export its steering vector field to ONNX with a spec",
        description="SVF (Steering Vector Fields: the normalised gradient of a learned concept score, re-evaluated "
        "at every token and steered layer). A scorer (one hidden tanh layer, or linear with --units 0) over "
        "a concept space shared by --layers is trained as a probe on the states of every token past the point "
        "where each pair's two sides diverge. Writes NAME.onnx (the field h -> h + scale * grad s / |grad s|, in "
        "closed form), the spec NAME.json, and the matched static vector NAME_vector.{safetensors,json}: the "
        "mean difference of the same states, unit length, at the same layers and scale.",
    )
    svf.add_argument("--layers", required=True, type=layer_list, help="layers the field steers, A-B or A,B,C")
    svf.add_argument("--units", type=int, default=32, help="hidden units of the scorer (0: linear)")
    add_training_args(svf, name="svf", epochs=60, lr=1e-3, validation=0.2,
                      scale_help="step length per token written into both specs")
    svf.set_defaults(batch_size=256)

    autosteer = add_command(
        commands, "train-autosteer", cmd_train_autosteer,
        help="AutoSteer: choose the layer (Safety Awareness Score or validation), train the prober and the refusal head",
        description="AutoSteer (a safety prober gates a refusal head that acts between the final norm and the LM "
        "head). Prints and plots the SAS of every layer (harmful vs benign "
        "differences of the pooled prompt states) and, with --read-layer validation, each layer's prober on the "
        "validation prompts; trains the safety prober at the chosen layer and the refusal head S (identity "
        "at start, LM loss on refusals to harmful prompts). Writes NAME_prober.onnx, NAME_head.onnx, the spec "
        "NAME.json, NAME_sas.json and the SAS plot.",
    )
    add_bundle(autosteer)
    autosteer.add_argument("--harmful", action="append", required=True, type=existing_file,
                           help="harmful training prompts (.jsonl or .txt; repeatable)")
    autosteer.add_argument("--benign", action="append", required=True, type=existing_file,
                           help="benign training prompts (.txt or .jsonl with a prompt field; repeatable)")
    autosteer.add_argument("--refusals", required=True, type=existing_file,
                           help="JSONL with prompt, behaviour and positive (refusal) fields: behaviour_pairs.jsonl")
    add_artifact_out(autosteer, "autosteer")
    autosteer.add_argument("--epsilon", type=float, default=1.0, help="ε₀, the refusal head strength")
    autosteer.add_argument("--threshold", type=float, default=0.5,
                           help="gate threshold on p(toxic) in the spec, unless chosen on --threshold-* prompts")
    autosteer.add_argument("--threshold-harmful", action="append", type=existing_file,
                           help="harmful validation prompts the threshold is chosen on (repeatable; never test data)")
    autosteer.add_argument("--threshold-safe", action="append", type=existing_file,
                           help="safe validation prompts whose false-positive rate bounds the threshold (repeatable)")
    autosteer.add_argument("--max-false-positive", type=float, default=0.02,
                           help="largest share of --threshold-safe prompts the chosen threshold may gate")
    autosteer.add_argument("--pool", choices=("last", "mean"), default="last",
                           help="the prober's input at its layer: the prompt's last token (the paper's), or the "
                           "mean over its tokens (reads the request rather than the template's end)")
    autosteer.add_argument("--read-layer", type=layer_selection, default="sas", metavar="{sas,validation,N}",
                           help="the prober's layer: the highest Safety Awareness Score (the paper's), the best "
                           "prober on the --threshold-* prompts (one trained per layer), or layer N")
    autosteer.add_argument("--prober-epochs", type=int, default=150)
    autosteer.add_argument("--prober-weight-decay", type=float, default=1.0,
                           help="AdamW weight decay of the prober (calibrates it on prompts unlike its training data)")
    autosteer.add_argument("--head-epochs", type=int, default=4)
    autosteer.add_argument("--head-lr", type=float, default=1e-4, help="Adam learning rate of S")
    autosteer.add_argument("--limit", type=int, help="use at most N prompts per file, evenly spaced (faster)")
    add_split(autosteer, 0.2, "share of prober inputs held out")
    autosteer.add_argument("--plot", help="SAS plot PNG (default: OUT/NAME_sas.png)")

    compose = add_command(
        commands, "compose-specs", cmd_compose_specs,
        help="write several steer specs as one (their interventions in order), e.g. AutoSteer with L2S",
        description="Concatenates the interventions of each SPEC into OUT, in the order given; the runtime "
        "applies them as it would the same specs passed as repeated --steer. The specs must sit in OUT's "
        "folder (their file paths are relative to it).",
    )
    compose.add_argument("specs", nargs="+", type=existing_file, metavar="SPEC", help="steer spec JSON files")
    compose.add_argument("--out", required=True, help="the composed spec (it may be one of the SPECs)")
    compose.add_argument("--scale", type=float,
                         help="set every intervention's scale (AutoSteer's strength) to SCALE, e.g. a scale "
                              "chosen on validation prompts")
