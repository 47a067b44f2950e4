"""The one way every report and trainer writes a matplotlib figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_figure(figure: Any, path: Path) -> None:
    """Lay `figure` out, write it to `path` (its folder made if missing) at 120 dpi, and free it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
