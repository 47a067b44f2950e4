"""Command line: python -m onnx_steer_export {export, quantize, train-vector, train-l2s, train-w2s, train-svf,
train-autosteer, eval, eval-behaviour, eval-svf, eval-autosteer, eval-precision, eval-ab, plot-behaviour,
tune, make-splits} ..."""

from __future__ import annotations

import argparse

from . import data, export, train, tune
from . import eval as evaluation

# Command groups in the order --help lists them; each module adds its commands with `register`.
GROUPS = (export, train, evaluation, tune, data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m onnx_steer_export", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(commands)
    return parser
