"""How a run stops before its end: Ctrl-C and the schedulers' signals (saved, exit 130 or 75, a
Slurm requeue), agreed over ranks so that every rank stops after the same step; and a loss that is
no longer finite (no save; the last good checkpoint is named)."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import torch

from fasttricks.errors import UserError
from fasttricks.progress import console
from fasttricks.recipes import StageConfig
from fasttricks.runs.checkpoint import list_checkpoints
from fasttricks.runtime import distributed, slurm
from fasttricks.runtime.distributed import dist_info
from fasttricks.training.epoch_log import is_logging_step


class Interrupted(Exception):
    """Ctrl-C or a scheduler's signal: the run was saved where it stood and can be resumed.
    ``exit_code``: 130 after Ctrl-C, PREEMPTED (75) after SIGTERM or SIGUSR1. The message is
    rank 0's (it saved); other ranks carry an empty one."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


PREEMPTED = 75  # sysexits' EX_TEMPFAIL: saved after SIGTERM/SIGUSR1, to be resumed (README, "Clusters")


class InterruptFlag:
    """Ctrl-C, SIGTERM (Kubernetes, torchrun's forwarding, Slurm at the time limit) and SIGUSR1
    (Slurm's ``--signal=USR1@SECONDS``): finish the current step, save, exit. A second Ctrl-C
    stops at once; a repeated scheduler signal changes nothing (the save is already coming)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signals: set[int] = set()  # the signals received (under DDP: by any rank, once agreed)
        self._previous: dict = {}

    @property
    def set(self) -> bool:
        return bool(self.signals)

    def __enter__(self) -> InterruptFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)

    def _handle(self, signum, frame) -> None:
        if signum in self.signals:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        first = not self.signals
        self.signals.add(signum)
        if not first:
            return
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if dist_info()[0] == 0:
            console.print(f"[yellow]{name}: saving after this step"
                          + (" (press again to abort without saving)" if signum == signal.SIGINT else ""))


def should_stop(flag: InterruptFlag, step: int, steps: int, device: torch.device) -> bool:
    """Ctrl-C or a signal seen. With several processes, agreed at logging points, so that every
    rank stops after the same step."""
    if dist_info()[1] == 1:
        return flag.set
    if not is_logging_step(step, steps):
        return False
    # which signals reached any rank: every rank then stops, and exits, alike
    seen = distributed.any_rank_each([s in flag.signals for s in flag.SIGNALS], device)
    flag.signals = {s for s, on in zip(flag.SIGNALS, seen, strict=True) if on}
    return bool(flag.signals)


def interrupted_error(flag: InterruptFlag, stage: StageConfig, epoch: int, step: int, path: Path | None) -> Interrupted:
    """What stops the run after the save (``path``: rank 0's, None elsewhere); under Slurm, a
    SIGUSR1 also requeues the job."""
    signals = flag.signals
    code = PREEMPTED if signals & {signal.SIGTERM, signal.SIGUSR1} else 130
    if dist_info()[0] != 0:
        return Interrupted("", code)
    message = (f"interrupted in {stage.name} epoch {epoch + 1} after step {step + 1}; saved {path} "
               f"({epoch} epoch(s) and {step + 1} step(s) of stage {stage.name} done). Continue with --resume.")
    if signal.SIGUSR1 in signals and os.environ.get("SLURM_JOB_ID"):
        message += " " + slurm.requeue(os.environ["SLURM_JOB_ID"])
    return Interrupted(message, code)


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def check_finite(out: Path, stage: StageConfig, epoch: int, first_bad: torch.Tensor) -> None:
    """``first_bad``: the epoch's first step whose loss was not finite (-1: none), a device tensor."""
    bad = distributed.earliest_step(first_bad)  # agreed: every rank raises the same, together
    if bad >= 0:
        kept = list_checkpoints(out)
        where = f"the last good checkpoint is {kept[-1][1]}" if kept else "no checkpoint was written yet"
        raise TrainingDiverged(f"non-finite loss in stage {stage.name!r}, epoch {epoch + 1}, step {bad + 1}; "
                               f"{where}. Lower the learning rate or set grad_clip.")
