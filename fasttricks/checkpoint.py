"""Checkpoints: a folder per save, written under a temporary name and renamed (atomic), holding
``model.safetensors`` (the timm network, with what is needed to rebuild it in its metadata) and
``state.pt`` (optimizer, position, RNG states: tensors and plain containers only, read back with
``weights_only=True``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from fasttricks.atomic import atomic_path
from fasttricks.errors import UserError
from fasttricks.models import WeightsError, weights_file

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


class WriteFault(UserError, OSError):
    """A file could not be written (a full disk, a quota, an I/O error); what was there is kept."""


@contextmanager
def writing(path: Path):
    """Turn the ways a write fails (OSError, safetensors' and torch.save's own errors, which wrap
    the system's message) into one ``WriteFault`` naming ``path``."""
    try:
        yield
    except (OSError, SafetensorError, RuntimeError) as e:
        if isinstance(e, WriteFault) or (isinstance(e, RuntimeError) and "writ" not in str(e).lower()):
            raise  # a RuntimeError that is not about writing is a bug: its traceback is wanted
        raise WriteFault(f"could not write {path}: {str(e).strip()[:300]}") from None


def save_weights(path: str | os.PathLike, net: nn.Module, info: dict) -> None:
    """The network's tensors with ``info`` (JSON) in the safetensors metadata, atomically."""
    with writing(Path(path)):
        _save_weights(path, net, info)


def _save_weights(path: str | os.PathLike, net: nn.Module, info: dict) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"fasttricks": json.dumps(info)})


def read_info(path: str | os.PathLike) -> dict:
    """The ``info`` saved with ``save_weights``."""
    path = weights_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise WeightsError(f"{path} is not a safetensors file: {e}") from None
    if "fasttricks" not in meta:
        raise WeightsError(f"{path} was not written by fasttricks (no model description in its metadata)")
    return json.loads(meta["fasttricks"])


def update_info(path: str | os.PathLike, changes: dict) -> dict:
    """Rewrite a weights file's ``info`` with ``changes`` merged in (atomically); returns it."""
    info = {**read_info(path), **changes}
    with atomic_path(path) as tmp:
        save_file(load_file(str(path)), str(tmp), metadata={"fasttricks": json.dumps(info)})
    return info


def save_checkpoint(run_dir: Path, position: Position, net: nn.Module, info: dict, state: dict) -> Path:
    """Write ``checkpoints/<position>/``; returns its path."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / position.name()
    with writing(final):
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        with writing(final):
            _save_weights(tmp / "model.safetensors", net, info)
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
