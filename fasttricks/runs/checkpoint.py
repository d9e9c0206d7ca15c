"""Checkpoints: a folder per save, written under a temporary name and renamed (atomic), holding
``model.safetensors`` (the timm network, with what is needed to rebuild it in its metadata) and
``state.pt`` (optimizer, position, RNG states: tensors and plain containers only, read back with
``weights_only=True``)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from fasttricks.models.weights import WeightsError, write_weights, writing

ASIDE_PREFIX = ".replaced-"  # a checkpoint that a new save of its position is replacing
_NAME = re.compile(r"^(?:\.replaced-)?s(\d+)-e(\d+)(?:-step(\d+))?(-avg)?$")


@dataclass(frozen=True, order=True)
class Position:
    """Where a run is: ``epoch`` epochs of stage ``stage`` done, plus ``step`` steps of the next;
    ``averaged``: the stage's weight averaging is done too (it follows its last epoch)."""

    stage: int
    epoch: int
    step: int = 0
    averaged: bool = False

    def name(self) -> str:
        return (f"s{self.stage}-e{self.epoch:03d}" + (f"-step{self.step:06d}" if self.step else "")
                + ("-avg" if self.averaged else ""))


def save_checkpoint(run_dir: Path, position: Position, net: nn.Module, info: dict, state: dict) -> Path:
    """Write ``checkpoints/<position>/``; returns its path."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / position.name()
    with writing(final):
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        with writing(final):
            write_weights(tmp / "model.safetensors", net, info)
            torch.save({**state, "position": asdict(position)}, tmp / "state.pt")
        # A folder cannot replace a full one in one rename: the old one steps aside under a name that
        # list_checkpoints still reads, so at every moment one complete checkpoint holds the position.
        aside = root / f"{ASIDE_PREFIX}{final.name}"
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def list_checkpoints(run_dir: Path) -> list[tuple[Position, Path]]:
    """The complete checkpoints of a run, oldest first; a position's checkpoint that a save left
    aside (the process died between its two renames) counts where the new one is missing."""
    root = run_dir / "checkpoints"
    found = {}
    for p in sorted(root.iterdir(), key=lambda p: p.name.startswith(ASIDE_PREFIX)) if root.is_dir() else []:
        m = _NAME.match(p.name)
        if m and (p / "state.pt").is_file() and (p / "model.safetensors").is_file():
            found.setdefault(Position(int(m[1]), int(m[2]), int(m[3] or 0), bool(m[4])), p)
    return sorted(found.items())


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(network tensors, training state) of a checkpoint folder. Checkpoints are written atomically,
    so an unreadable one was damaged afterwards: an error naming it, nothing changed."""
    try:
        return load_file(str(path / "model.safetensors")), torch.load(path / "state.pt", map_location="cpu",
                                                                       weights_only=True)
    except Exception as e:  # safetensors, pickle and zip readers each raise their own kinds
        raise WeightsError(f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e)[:200]}); move it "
                           f"aside to resume from the checkpoint before it") from None
