"""Experiment trackers beside metrics.jsonl: TensorBoard event files under ``RUN/tb/`` and, when
installed, Weights & Biases. Only the main process writes; every call is a no-op without one, so
the training loop calls them unconditionally."""

from __future__ import annotations

from pathlib import Path

from fasttricks.recipes import LoggingConfig, RecipeError


class Tracker:
    """``scalars(step, values)`` at the logging points (x: steps of the whole run); ``epoch(x,
    row)`` for a metrics row (x: epochs of the whole run)."""

    def __init__(self, cfg: LoggingConfig, out: Path, config: dict, enabled: bool = True):
        self._tb = self._wandb = None
        if not enabled:
            return
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RecipeError("logging.tensorboard: true needs the tensorboard package "
                                  "(pip install 'fasttricks[tensorboard]')") from None
            self._tb = SummaryWriter(log_dir=str(out / "tb"))
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise RecipeError("logging.wandb: true needs the wandb package (pip install wandb)") from None
            self._wandb = wandb.init(dir=str(out), name=out.name, config=config, resume="allow")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            if self._tb is not None:
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log({**values, "step": step})

    def epoch(self, x: int, row: dict) -> None:
        numbers = {f"epoch/{k}": v for k, v in row.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "stage_index")}
        self.scalars(x, numbers)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
