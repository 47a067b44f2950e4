"""What the command groups share: one way to add a command, argument types that turn a bad value into
a usage error (exit status 2), and the options several commands take."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

# A command runs with its parsed arguments and its own parser (for usage errors: `parser.error`).
Command = Callable[[argparse.Namespace, argparse.ArgumentParser], None]
Commands = Any  # the object `ArgumentParser.add_subparsers` returns (argparse's private _SubParsersAction)


def add_command(commands: Commands, name: str, run: Command, help: str, description: str) -> argparse.ArgumentParser:
    """A subcommand that runs `run` with its arguments and this parser."""
    parser: argparse.ArgumentParser = commands.add_parser(name, help=help, description=description)
    parser.set_defaults(func=run, command_parser=parser)
    return parser


def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def bundle_dir(text: str) -> Path:
    path = Path(text)
    if not (path / "manifest.json").is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a bundle directory (no manifest.json); "
                                         "write one with `python -m onnx_steer_export export`")
    return path


def layer_list(text: str) -> list[int]:
    """A-B (inclusive) or A,B,C."""
    try:
        if "-" in text:
            first, last = (int(x) for x in text.split("-", 1))
            return list(range(first, last + 1))
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"layers are A-B or A,B,C, got {text!r}") from None


def scale_list(text: str) -> list[float]:
    """Comma-separated scales, e.g. -8,-4,4,8."""
    try:
        return [float(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"scales are comma-separated numbers, got {text!r}") from None


def method_spec(text: str) -> tuple[str, Path]:
    """NAME=SPEC, SPEC an existing steer spec."""
    name, sep, spec = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--method takes NAME=SPEC, got {text!r}")
    return name, existing_file(spec)


def add_bundle(parser: argparse.ArgumentParser, option: str = "--bundle", help: str = "bundle directory",
               **options: Any) -> None:
    parser.add_argument(option, required=True, type=bundle_dir, help=help, **options)


def add_methods(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", action="append", default=[], type=method_spec, metavar="NAME=SPEC",
                        help="a steer spec to evaluate under NAME (repeatable)")


def add_generation(parser: argparse.ArgumentParser, limit_help: str, limit: int | None = None,
                   max_new_tokens: int = 48) -> None:
    """--limit (prompts used) and --max-new-tokens of the greedy generations."""
    parser.add_argument("--limit", type=int, default=limit, help=limit_help)
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)


def add_report_out(parser: argparse.ArgumentParser, writes: str = ".json, .md and .png") -> None:
    parser.add_argument("--out", required=True, help=f"report path stem: writes {writes}")


def add_artifact_out(parser: argparse.ArgumentParser, name: str) -> None:
    """--out (the steer folder) and --name (the file stem) of a trainer."""
    parser.add_argument("--out", required=True, help="output folder, e.g. onnx/BUNDLE/steer")
    parser.add_argument("--name", default=name, help="file stem of what is written")


def add_training_args(parser: argparse.ArgumentParser, name: str, epochs: int, lr: float, validation: float,
                      scale_help: str) -> None:
    """Options every learned-method trainer on behaviour or concept pairs shares."""
    add_bundle(parser)
    parser.add_argument("--data", required=True, type=existing_file,
                        help="JSONL of {prompt, positive, negative} (behaviour_pairs.jsonl)")
    add_artifact_out(parser, name)
    parser.add_argument("--scale", type=float, default=1.0, help=scale_help)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--lr", type=float, default=lr, help="Adam learning rate")
    parser.add_argument("--batch-size", type=int, default=64)
    add_split(parser, validation, "share of inputs held out for validation",
              "seed of the split, initialisation and batch order")


def add_split(parser: argparse.ArgumentParser, validation: float, validation_help: str,
              seed_help: str | None = None) -> None:
    """--validation (share held out) and --seed."""
    parser.add_argument("--validation", type=float, default=validation, help=validation_help)
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
