"""Joining GGUF wheel parts: only the data parts are read, in order, and a file whose size or sha256
differs from upstream's is refused without leaving anything behind."""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from onnx_steer_export.export.fetch import REAL_MODELS, FetchError, RealModel, join_parts, model_named

PARTS = [b"GGUF" + b"\x01" * 1000, b"\x02" * 777, b"\x03" * 5]


def wheel(folder: Path, index: int, members: dict[str, bytes]) -> Path:
    path = folder / f"fake_part{index}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"fake_part{index}/__init__.py", "raise SystemExit('never imported')\n")
        for name, data in members.items():
            archive.writestr(f"fake_part{index}/{name}", data)
    return path


def wheels(folder: Path) -> list[Path]:
    return [wheel(folder, i + 1, {f"data/part{i + 1:02d}.bin": part}) for i, part in enumerate(PARTS)]


def model() -> RealModel:
    joined = b"".join(PARTS)
    return RealModel(name="fake", description="", parts=(("fake-part1", "1.0"),), size=len(joined),
                     sha256=hashlib.sha256(joined).hexdigest(), file_name="fake.gguf")


def test_parts_join_in_order_into_the_checked_file(tmp_path: Path) -> None:
    target = join_parts(model(), wheels(tmp_path), tmp_path / "fake.gguf")
    assert target.read_bytes() == b"".join(PARTS)


@pytest.mark.parametrize("wrong", ["sha256", "size"])
def test_a_file_that_is_not_upstream_is_refused_and_removed(tmp_path: Path, wrong: str) -> None:
    expected = replace(model(), sha256="0" * 64) if wrong == "sha256" else replace(model(), size=model().size + 1)
    with pytest.raises(FetchError, match=wrong if wrong == "sha256" else "bytes"):
        join_parts(expected, wheels(tmp_path), tmp_path / "fake.gguf")
    assert not any(tmp_path.glob("fake.gguf*"))


def test_a_wheel_with_extra_parts_or_a_longer_file_is_refused(tmp_path: Path) -> None:
    doubled = wheel(tmp_path, 9, {"data/part01.bin": PARTS[0], "data/part02.bin": PARTS[1]})
    with pytest.raises(FetchError, match="exactly one data part"):
        join_parts(model(), [doubled], tmp_path / "fake.gguf")
    with pytest.raises(FetchError, match="longer than"):
        join_parts(model(), wheels(tmp_path) + wheels(tmp_path)[:1], tmp_path / "fake.gguf")
    assert not (tmp_path / "fake.gguf").exists()


def test_models_are_pinned_and_unknown_names_are_clear_errors() -> None:
    for known in REAL_MODELS.values():
        assert all(version for _, version in known.parts) and len(known.sha256) == 64
    with pytest.raises(FetchError, match="known: gemma3-270m"):
        model_named("llama-70b")
