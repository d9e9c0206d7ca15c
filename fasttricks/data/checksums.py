"""Per-image checksums of a beton: recorded in its manifest when it is built, checked by
``verify-beton`` (every image) and by ``train`` (a seeded sample) before any step.

A beton is one large file that lives for months on shared disks; a damaged block inside it decodes
to a wrong image or a wrong label without any error (FFCV reads offsets, not formats). FFCV records
no checksum, so each image's is computed here from what FFCV reads for it: its metadata row (the
label, the image's mode and size, where its bytes are) and its bytes in the data region, which a
sample's allocations give. CRC-32 (zlib): meant to catch damage, not tampering, and it reads at
disk speed."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from fasttricks.data.manifest import BuildError, manifest_path, read_manifest
from fasttricks.progress import progress_bar

ALGORITHM = "crc32 of the metadata row and the allocated bytes"  # recorded in the manifest
TRAIN_SAMPLE = 1024  # images per beton that `train` checks before it starts (seeded; all if fewer)


class _Samples:
    """Where each sample's bytes lie in a beton."""

    def __init__(self, path: Path):
        from ffcv.reader import Reader

        self.path = path
        try:
            reader = Reader(str(path))
        except Exception as e:  # FFCV raises assorted errors on a file that is not a whole beton
            raise BuildError(f"{path} is not a readable FFCV beton: {type(e).__name__}: {e}") from None
        self.metadata = reader.metadata
        table = reader.alloc_table
        order = np.argsort(table["sample_id"], kind="stable")
        self.table = table[order]
        self.starts = np.searchsorted(self.table["sample_id"], np.arange(reader.num_samples + 1))
        self.data = np.memmap(path, dtype=np.uint8, mode="r")

    def checksum(self, i: int) -> int:
        crc = zlib.crc32(self.metadata[i].tobytes())
        for entry in self.table[self.starts[i]:self.starts[i + 1]]:
            ptr, size = int(entry["ptr"]), int(entry["size"])
            if ptr + size > self.data.size:
                return -1  # an allocation past the end of the file: damaged
            crc = zlib.crc32(self.data[ptr:ptr + size], crc)
        return crc


def compute(path: str | os.PathLike, *, show_progress: bool = True, name: str | None = None) -> tuple[list[int], int]:
    """Every image's checksum, in beton order, and the bytes the images take (without the free
    space of FFCV's pages, which a small beton's file is mostly); ``name``: what the bar calls it."""
    samples = _Samples(Path(path))
    n = len(samples.metadata)
    out = []
    with progress_bar(f"checksums {name or Path(path).name}", n, enabled=show_progress) as advance:
        for i in range(n):
            out.append(samples.checksum(i))
            if i % 1000 == 999 or i == n - 1:
                advance(i % 1000 + 1)
    return out, int(samples.table["size"].sum())


def damaged(path: str | os.PathLike, indices=None, *, show_progress: bool = False) -> list[int]:
    """The images of ``path`` (all, or ``indices``) whose bytes no longer match the checksums
    its manifest recorded."""
    path = Path(path)
    recorded = recorded_checksums(path)
    samples = _Samples(path)
    if len(samples.metadata) != len(recorded):
        raise BuildError(f"{path} holds {len(samples.metadata)} images but its manifest recorded "
                         f"{len(recorded)} checksums: rebuild it")
    indices = range(len(recorded)) if indices is None else indices
    bad = []
    with progress_bar(f"verifying {path.name}", len(indices), enabled=show_progress) as advance:
        for k, i in enumerate(indices):
            if samples.checksum(int(i)) != recorded[int(i)]:
                bad.append(int(i))
            if k % 1000 == 999 or k == len(indices) - 1:
                advance(k % 1000 + 1)
    return bad


def recorded_checksums(path: Path) -> list[int]:
    manifest = read_manifest(path)
    if "checksums" not in manifest:
        raise BuildError(f"{manifest_path(path)} records no checksums (the beton was built before fasttricks "
                         f"recorded them): rebuild it with `fasttricks build-beton ... --overwrite` to verify it")
    return manifest["checksums"]


def describe(path: Path, indices: list[int], files: list[str]) -> str:
    names = ", ".join(f"{i} ({files[i]})" if i < len(files) else str(i) for i in indices[:5])
    more = f" and {len(indices) - 5} more" if len(indices) > 5 else ""
    return (f"{path}: image {names}{more} no longer match{'es' if len(indices) == 1 else ''} the checksum recorded "
            f"when it was built: the beton is damaged. `fasttricks verify-beton {path}` lists every damaged image; "
            f"rebuild it with `fasttricks build-beton ... --overwrite`")


def check_sample(paths: dict[str, Path], seed: int = 0, per_beton: int = TRAIN_SAMPLE) -> None:
    """Before training: a seeded sample of each beton's images against their checksums; a damaged
    one stops here, naming the beton and the image. Betons without checksums are skipped."""
    for path in paths.values():
        manifest = read_manifest(path)
        if "checksums" not in manifest:
            continue
        n = len(manifest["checksums"])
        rng = np.random.default_rng([seed, 0xC4EC])
        indices = np.sort(rng.choice(n, size=min(n, per_beton), replace=False))
        bad = damaged(path, indices)
        if bad:
            raise BuildError(describe(path, bad, manifest.get("files", [])))
