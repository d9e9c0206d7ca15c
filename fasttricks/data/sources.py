"""Where a ``--data`` argument leads: a folder of betons, or ``toy``, the embedded default set,
generated and compiled once into the cache folder (``$FASTTRICKS_CACHE``, else
``~/.cache/fasttricks``) and reused after."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from fasttricks.data.beton import BetonOptions, build_beton
from fasttricks.data.toy import SPLITS, ToyOptions, make_toy

TOY = "toy"


def cache_dir() -> Path:
    return Path(os.environ.get("FASTTRICKS_CACHE") or Path.home() / ".cache" / "fasttricks")


def resolve_data(data: str | os.PathLike, *, show_progress: bool = True) -> Path:
    """The data folder behind ``data`` (``toy`` is made on first use)."""
    if str(data) == TOY:
        return ensure_toy_data(ToyOptions(), show_progress=show_progress)
    path = Path(data)
    if not path.is_dir():
        raise FileNotFoundError(f"--data {data}: no such folder (give a folder of betons, or 'toy')")
    return path


def ensure_toy_data(opts: ToyOptions, *, root: Path | None = None, show_progress: bool = True) -> Path:
    """``root/<key>/`` with images/ and {train,val,val_clutter}.beton; built once, under a lock so
    that several processes (torchrun ranks, parallel tests) build it once between them."""
    folder = Path(root or cache_dir()) / opts.key()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        images = folder / "images"
        if not (images / "toy.json").is_file():
            make_toy(images, opts, overwrite=True, show_progress=show_progress)
        for split in SPLITS:
            beton = folder / f"{split}.beton"
            if not (beton.is_file() and Path(f"{beton}.json").is_file()):
                # raw pixels: toy images are tiny, and raw decodes fastest
                build_beton(images / split, beton, BetonOptions(write_mode="raw", workers=2),
                            overwrite=True, show_progress=show_progress)
    return folder
