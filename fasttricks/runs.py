"""The run folder: what a training run leaves behind, and only the main process writes it.

``config.yaml`` (resolved recipe), ``environment.json`` (git commit, package versions, device),
``metrics.jsonl`` (one object per epoch), ``checkpoints/``, ``final.safetensors``, ``summary.json``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch
import yaml

from fasttricks import recipes
from fasttricks.atomic import write_json, write_text

PACKAGES = ("fasttricks", "torch", "torchvision", "ffcv", "numba", "numpy", "timm", "kornia", "robustness",
            "brainscore-vision")


class RunFolderError(FileExistsError):
    pass


def prepare(out: Path, recipe: recipes.Recipe, *, resume: bool, overwrite: bool) -> recipes.Recipe:
    """Create (or re-open, with ``resume``) the run folder; returns the recipe the run uses.

    A resumed run continues with the recipe saved in its folder; a different one is an error,
    since the result would be neither run."""
    config = out / "config.yaml"
    if resume and config.is_file():
        saved = recipes.validate(yaml.safe_load(config.read_text()), source=str(config))
        if saved != recipe:
            raise RunFolderError(f"{out} was started with a different recipe than the one given now; "
                                 f"resume it with the same recipe and --set values, or choose a new --out")
        return saved
    if out.exists() and any(out.iterdir()) and not resume:
        if not overwrite:
            raise RunFolderError(f"{out} already holds a run; pass --resume to continue it or "
                                 f"--overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(config, recipes.dump(recipe))
    write_json(out / "environment.json", environment())
    return recipe


def environment() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"git_commit": _git_commit(), "python": platform.python_version(), "packages": versions,
            "machine": platform.machine(), "cpus": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def append_metrics(out: Path, row: dict) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def truncate_metrics(out: Path, keep: Callable[[dict], bool]) -> None:
    """Keep the rows ``keep`` accepts: a resumed run rewrites what came after its checkpoint."""
    rows = [r for r in read_metrics(out) if keep(r)]
    write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
