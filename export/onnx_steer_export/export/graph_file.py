"""How a segment graph is written to disk: the graph in `NAME.onnx`, its weights in `NAME.onnx.data`.

ONNX Runtime memory-maps an external initializer that starts on a page boundary and uses the mapping
as the tensor, so the weights are neither read into a buffer nor copied into a second one (the file
is also the way past protobuf's 2 GB limit). Every initializer of at least `EXTERNAL_BYTES` goes to
the weights file, each at an offset aligned to `PAGE_BYTES`.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
from onnx.external_data_helper import set_external_data

from .digest import sha256

# 64 KiB: a page on every platform ONNX Runtime maps files on (Windows' allocation granularity), and
# the largest alignment gap the onnx package writes.
PAGE_BYTES = 64 * 1024
# Smaller tensors (biases, norms of tiny models) stay in the graph: a mapped page each would waste more.
EXTERNAL_BYTES = 4 * 1024


def weights_file(graph_file: str) -> str:
    """The name of the weights file beside `graph_file`."""
    return f"{graph_file}.data"


def save_graph(model: onnx.ModelProto, path: Path) -> str | None:
    """Write `model` to `path` with its large initializers in the page-aligned weights file beside it;
    returns that file's name, or None when every initializer is small enough to stay in the graph.
    `model`'s initializers are left pointing at the file."""
    location = weights_file(path.name)
    data = path.with_name(location)
    data.unlink(missing_ok=True)  # save_model appends to an existing file
    end = 0
    for tensor in model.graph.initializer:
        size = len(tensor.raw_data) if tensor.HasField("raw_data") else 0
        if size < EXTERNAL_BYTES:
            continue
        offset = -(-end // PAGE_BYTES) * PAGE_BYTES
        set_external_data(tensor, location, offset, size)
        end = offset + size
    onnx.save_model(model, str(path))
    if not end:
        return None
    data.chmod(path.stat().st_mode & 0o777)  # onnx creates it owner-only; readable as the graph is
    return location


def segment_files(segment: dict) -> list[str]:
    """A manifest segment's files: its graph, and its weights file where it has one."""
    return [segment["file"], *([segment["weights"]] if segment.get("weights") else [])]


def chain_weight_bytes(bundle: Path) -> int:
    """Bytes of every file the segment chain loads: each segment's graph and weights file (the
    monolithic baseline apart)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    return sum(manifest["files"][f]["bytes"] for f in {f for s in manifest["segments"] for f in segment_files(s)})


def file_entries(directory: Path, names: list[str]) -> dict[str, dict]:
    """The manifest's `files` table: each file's sha256 and size."""
    return {name: {"sha256": sha256(directory / name), "bytes": (directory / name).stat().st_size}
            for name in names}
