"""python -m onnx_steer_export COMMAND ...: parse (cli/), run the command, report known failures."""

from __future__ import annotations

import sys

from .cli import build_parser
from .data.ab import ABError
from .data.pairs import PairsError
from .eval.tune import TuneError
from .export.quantize import QuantizeError
from .export.source import SourceError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args, args.command_parser)
    except (SourceError, PairsError, ABError, TuneError, FileNotFoundError, QuantizeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
