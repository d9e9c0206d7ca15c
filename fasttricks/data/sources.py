"""Where a ``--data`` argument leads: a folder of betons, or ``toy``, the embedded default set,
generated and compiled once into the cache folder (``$FASTTRICKS_CACHE``, else
``~/.cache/fasttricks``) and reused after."""

from __future__ import annotations

import fcntl
import os
from dataclasses import replace
from pathlib import Path

from fasttricks.data.beton import BetonOptions, build_beton
from fasttricks.data.toy import SPLITS, ToyOptions, make_toy
from fasttricks.errors import InputMissing

TOY = "toy"


def cache_dir() -> Path:
    return Path(os.environ.get("FASTTRICKS_CACHE") or Path.home() / ".cache" / "fasttricks")


def resolve_data(data: str | os.PathLike, *, show_progress: bool = True) -> Path:
    """The data folder behind ``data`` (``toy`` is made on first use), after checking that its
    splits share one class list."""
    from fasttricks.data.classes import data_classes

    if str(data) == TOY:
        return ensure_toy_data(ToyOptions(), show_progress=show_progress)
    path = Path(data)
    if not path.is_dir():
        raise InputMissing(f"--data {data}: no such folder (give a folder of betons, or 'toy')")
    if not (path / "train.beton").is_file() and (path / "train").is_dir():
        raise InputMissing(f"--data {data} holds image folders, not betons; compile them first:\n"
                           + "\n".join(f"  {cmd}" for cmd in build_commands(path)))
    data_classes(path)
    return path


def build_commands(folder: Path) -> list[str]:
    """The build-beton commands that turn ``folder/<split>/`` ImageFolders into ``folder/<split>.beton``."""
    splits = [s for s in ("train", "val", *(p.name for p in sorted(folder.iterdir()) if p.is_dir()))
              if (folder / s).is_dir()]
    cmds = []
    for split in dict.fromkeys(splits):
        extra = "" if split == "train" else f" --classes-from {folder / 'train.beton'}"
        cmds.append(f"fasttricks build-beton {folder / split} {folder / split}.beton{extra}")
    return cmds


def build_split_betons(images: Path, out: Path, splits, opts: BetonOptions, *, show_progress: bool = True) -> None:
    """``images/<split>/`` → ``out/<split>.beton`` for each split, train first: every other split is
    compiled against train's class list. Splits already built are kept."""
    for split in sorted(splits, key=lambda s: s != "train"):
        beton = out / f"{split}.beton"
        if beton.is_file() and Path(f"{beton}.json").is_file():
            continue
        classes_from = None if split == "train" else str(out / "train.beton")
        build_beton(images / split, beton, replace(opts, classes_from=classes_from), overwrite=True,
                    show_progress=show_progress)


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
        # raw pixels: toy images are tiny, and raw decodes fastest
        build_split_betons(images, folder, SPLITS, TOY_BETON, show_progress=show_progress)
    return folder


TOY_BETON = BetonOptions(write_mode="raw", workers=2)
