"""What an epoch tells the user while it runs: the progress bar (loss, images/s, the run's ETA), the
tracker's scalars, and the epoch's line at its end. It reads the loss, the one host sync of a
step, only every ``LOG_EVERY`` steps."""

from __future__ import annotations

import time
from contextlib import ExitStack

import torch

from fasttricks.progress import progress_bar
from fasttricks.recipes import StageConfig
from fasttricks.runs.status import format_duration, mean_times, remaining_seconds

LOG_EVERY = 20  # steps between progress updates, the only syncs of a step


def is_logging_step(step: int, steps: int) -> bool:
    return (step + 1) % LOG_EVERY == 0 or step + 1 == steps


class EpochLog:
    """The progress of one epoch of stage ``s``; ``seen`` and ``seconds`` continue a resumed epoch."""

    def __init__(self, run, s: int, stage: StageConfig, epoch: int, res: int, steps: int, start_step: int,
                 seen: int = 0, seconds: float = 0.0):
        self.run, self.s, self.epoch, self.res, self.steps = run, s, epoch, res, steps
        self.seen, self.seconds_before, self._seen_before = seen, seconds, seen
        self._shown = start_step
        self._tic = time.perf_counter()
        self._stack = ExitStack()
        self._advance = self._stack.enter_context(progress_bar(
            f"{stage.name} {epoch + 1}/{stage.epochs} @{res}px", steps, enabled=run.show_progress and run.is_main,
            extra="loss {task.fields[loss]} · {task.fields[ips]} img/s · run eta {task.fields[run_eta]}",
            loss="…", ips="…", run_eta="…"))
        self._advance(start_step)

    def __enter__(self) -> EpochLog:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self._tic

    def step_done(self, step: int, images: int, loss_sum: torch.Tensor, lr: float) -> None:
        """After each step: count its images (of the whole job); at logging points, show and track."""
        self.seen += images
        if not is_logging_step(step, self.steps):
            return
        mean_loss = loss_sum.item() / (step + 1)
        ips = (self.seen - self._seen_before) / max(time.perf_counter() - self._tic, 1e-9)
        self._advance(step + 1 - self._shown, loss=f"{mean_loss:.3f}", ips=f"{ips:.0f}",
                      run_eta=self._run_eta((step + 1) / self.steps))
        self.run.tracker.scalars((self.run.epochs_before[self.s] + self.epoch) * self.steps + step + 1,
                                 {"train/loss": mean_loss, "train/lr": lr, "train/images_per_s": ips})
        self._shown = step + 1

    def _run_eta(self, part_done: float) -> str:
        return run_eta(self.run.recipe, self.run.epoch_times, self.s, self.epoch, self.res, part_done, self.seconds())


def run_eta(recipe, epoch_times: dict, s: int, epoch: int, res: int, part_done: float, elapsed: float) -> str:
    """The whole run's remaining time: the recipe's remaining epochs at their resolutions, each at
    the measured time of its stage and resolution (this epoch's rate where none is measured yet)."""
    measured = mean_times(epoch_times)
    measured.setdefault((s, res), elapsed / max(part_done, 1e-9))
    left, unknown = remaining_seconds(recipe, measured, s, epoch, part_done)
    return f"{format_duration(sum(left))}" + (f" + {', '.join(unknown)}" if unknown else "")


def describe_row(row: dict) -> str:
    return (f"  epoch {row['epoch']} · lr {row['lr']:.3g} · loss {row['train_loss']:.3f} · "
            f"{row['images_per_s']:.0f} img/s · {describe_accuracy(row)}")


def describe_accuracy(row: dict) -> str:
    return " · ".join(f"{split} {row[f'{split}_top1']:.1f}% (top-5 {row[f'{split}_top5']:.1f}%)"
                      for split in ("val", "val_clutter") if f"{split}_top1" in row)
