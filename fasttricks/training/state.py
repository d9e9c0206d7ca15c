"""The run's state: where a run stands and everything it carries past a checkpoint, in one object.

``RunState`` is saved whole with every checkpoint (``info`` in the weights file's metadata, the rest
in ``state.pt``) and restored whole, so a resumed run holds what the uninterrupted run held: a field
added here is saved and restored without another line (tests/test_run_format.py holds this)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import timm.utils
import torch
from torch import nn

from fasttricks.models.weights import read_info
from fasttricks.recipes import StageConfig
from fasttricks.runs.checkpoint import Position, load_checkpoint, save_checkpoint
from fasttricks.runtime import distributed
from fasttricks.runtime.distributed import dist_info


@dataclass
class RunState:
    """``position``: epochs (and steps) done. ``info``: the model's description (architecture,
    classes, frozen modules, training resolution, guard decisions, test size), which
    final.safetensors records too. The rest continues the training: the optimizer's and the EMA's
    state, every rank's RNG streams, and, mid-epoch, the epoch's running sums."""

    position: Position
    info: dict
    optimizer: dict | None = None
    ema: dict | None = None
    rng_by_rank: list[dict] = field(default_factory=list)
    loss_sum: torch.Tensor | None = None
    seen: int = 0
    seconds: float = 0.0

    def save(self, out: Path, net: nn.Module) -> Path:
        rest = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("position", "info")}
        return save_checkpoint(out, self.position, net, self.info, rest)

    @classmethod
    def load(cls, path: Path) -> tuple[dict[str, torch.Tensor], RunState]:
        """(the network's tensors, the state) of a checkpoint folder, of this version or an earlier one."""
        weights, saved = load_checkpoint(path)
        saved = _from_earlier_versions(saved)
        names = {f.name for f in fields(cls)} - {"position", "info"}
        state = cls(Position(**saved["position"]), read_info(path / "model.safetensors"),
                    **{k: v for k, v in saved.items() if k in names})
        return weights, state

    def restore_into(self, optimizer: torch.optim.Optimizer | None, ema: timm.utils.ModelEmaV3 | None) -> None:
        """Continue this state: the optimizer's and the EMA's state (when saved) and this rank's RNG."""
        if optimizer is not None and self.optimizer is not None:
            optimizer.load_state_dict(self.optimizer)
        if ema is not None and self.ema is not None:
            ema.module.load_state_dict(self.ema)
        set_rng_state(self.rng_by_rank)


def _from_earlier_versions(saved: dict) -> dict:
    """Checkpoints before per-rank RNG streams saved rank 0's CPU stream and every CUDA device's."""
    if "rng_by_rank" in saved or "torch_rng" not in saved:
        return saved
    own = {"torch": saved.pop("torch_rng")}
    cuda = saved.pop("cuda_rng", [])
    if torch.cuda.is_available() and torch.cuda.current_device() < len(cuda):
        own["cuda"] = cuda[torch.cuda.current_device()]
    return {**saved, "rng_by_rank": [own]}


def rng_by_rank() -> list[dict]:
    """Every rank's own generators (the CPU's and its CUDA device's), gathered for rank 0 to save:
    each rank draws its own dropout and drop-path masks, and a resumed rank continues its own."""
    own = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        own["cuda"] = torch.cuda.get_rng_state()  # the current device: this rank's
    return distributed.gather_objects(own)


def set_rng_state(by_rank: list[dict]) -> None:
    if not by_rank:
        return
    own = by_rank[dist_info()[0] % len(by_rank)]  # another world size cannot continue every stream: each rank takes one
    torch.set_rng_state(own["torch"])
    if "cuda" in own and torch.cuda.is_available():
        torch.cuda.set_rng_state(own["cuda"])


def ema_weights(ema: timm.utils.ModelEmaV3 | None) -> dict | None:
    return None if ema is None else {k: v.detach().clone() for k, v in ema.module.state_dict().items()}


def stage_done(position: Position, stage: StageConfig) -> bool:
    return position.epoch >= stage.epochs and (stage.average is None or position.averaged)
