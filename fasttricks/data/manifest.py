"""A beton's manifest (``NAME.beton.json``): its classes, files, skipped files and checksums, and
the check that a beton and its manifest belong together."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from fasttricks.errors import UserError


class BuildError(UserError):
    """A beton cannot be built from what was given; the message names the file or option."""


@dataclass
class Manifest:
    source: str
    beton: str
    classes: list[str]
    images: int = 0
    source_images: int = 0  # image files in the folder, before --limit (for extrapolating the size)
    beton_bytes: int = 0  # the file, FFCV's page padding included
    image_bytes: int = 0  # what the images take in it
    files: list[str] = field(default_factory=list)  # relative to source, in beton order
    skipped: list[dict] = field(default_factory=list)  # {"file", "reason"}
    options: dict = field(default_factory=dict)
    seconds: float = 0.0
    checksum_algorithm: str = ""
    checksums: list[int] = field(default_factory=list)  # one per image, in beton order (data/checksums.py)
    checksum_seconds: float = 0.0  # part of seconds


def manifest_path(beton: str | os.PathLike) -> Path:
    return Path(f"{beton}.json")


def read_manifest(beton: str | os.PathLike) -> dict:
    path = manifest_path(beton)
    if not path.is_file():
        raise BuildError(f"{path} is missing: build {beton} with `fasttricks build-beton`")
    return json.loads(path.read_text())


def check_beton(beton: str | os.PathLike) -> dict:
    """The manifest of ``beton`` after checking that the two belong together and the beton is whole:
    not empty, readable by FFCV, as many samples as the manifest lists (and as many bytes, when
    the manifest records them). Returns the manifest."""
    from ffcv.reader import Reader

    path = Path(beton)
    manifest = read_manifest(path)
    size = path.stat().st_size if path.is_file() else -1
    if size <= 0:
        raise BuildError(f"{path} is {'missing' if size < 0 else 'empty'}: rebuild it with `fasttricks build-beton`")
    if manifest.get("beton_bytes") and manifest["beton_bytes"] != size:
        raise BuildError(f"{path} holds {size} bytes but its manifest {manifest_path(path)} says "
                         f"{manifest['beton_bytes']}: truncated, or the manifest of another beton; rebuild it")
    try:
        samples = Reader(str(path)).num_samples
    except Exception as e:  # FFCV raises assorted errors on a file that is not a whole beton
        raise BuildError(f"{path} is not a readable FFCV beton (truncated?): {type(e).__name__}: {e}") from None
    if samples != manifest["images"]:
        raise BuildError(f"{path} holds {samples} images but its manifest {manifest_path(path)} lists "
                         f"{manifest['images']}: the manifest belongs to another beton; rebuild it")
    return manifest
