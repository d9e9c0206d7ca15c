"""The guard against catastrophic overfitting (``adversarial.guard``): one-step adversarial training
(FGSM, and N-FGSM less often) can collapse within an epoch, robust accuracy falling to near zero
while the training loss looks healthy (Wong et al. 2020; de Jorge et al. 2022). At each epoch's end
of a guarded stage the guard measures robust top-1 under PGD-k on a fixed, seeded subset of the
training set (test-time crops, each image's start seeded by its index, sharded and all-reduced: every
rank reads the same figure and takes the same decision). A fall of more than ``drop`` below the
stage's best so far is a collapse: the stage goes back to its previous epoch's checkpoint and trains
the rest with PGD. The decision is part of the run's state (``run.info["guard"]``), saved with every
checkpoint, so a resumed run continues with the attack the uninterrupted one used."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fasttricks.data.loader import ValLoader
from fasttricks.progress import console
from fasttricks.recipes import AdversarialConfig, DataConfig, GuardConfig, StageConfig
from fasttricks.runs import folder
from fasttricks.runs.checkpoint import Position
from fasttricks.runtime import distributed
from fasttricks.runtime.distributed import dist_info
from fasttricks.training.state import RunState


def guard_images(train_beton: Path, guard: GuardConfig, data: DataConfig, *, device: torch.device, seed: int,
                 distributed: bool) -> ValLoader:
    """The guard's fixed, seeded subset of the training set at the test crop. Built once per run and
    kept (``Run.guard_loaders``): FFCV compiles a loader's pipeline on its first pass and numba's
    compiled code is kept for the life of the process (data/crops.py), so a loader per epoch would
    pay both every epoch."""
    from fasttricks.data.manifest import read_manifest

    n = read_manifest(train_beton)["images"]
    subset = np.sort(np.random.default_rng([seed, 0x6A2D]).choice(n, size=min(n, guard.images), replace=False))
    return ValLoader(train_beton, batch_size=data.val_batch_size, resize=data.val_resize, crop=data.val_crop,
                     device=device, workers=data.workers, distributed=distributed, indices=subset)


def robust_top1(model: nn.Module, images: ValLoader, cfg: AdversarialConfig, device: torch.device) -> float:
    """Robust top-1 (a fraction) under PGD-``cfg.guard.steps`` at ``cfg``'s ε on the guard's images."""
    from fasttricks.evaluation.evaluate import accuracy

    attack = AdversarialConfig(norm=cfg.norm, eps=cfg.eps, steps=cfg.guard.steps)
    return accuracy(model, images, device, attack)["top1"] / 100


def collapsed(robust: float, best: float | None, guard: GuardConfig) -> bool:
    """A fall of more than ``drop`` below the best so far (never on the stage's first measurement)."""
    return best is not None and robust < best - guard.drop


def state_for(info: dict, stage: int) -> dict:
    """This stage's guard state in the run's state: its best robust top-1 so far and, after a
    collapse, the epoch it fell back at."""
    return info.setdefault("guard", {}).setdefault(str(stage), {"best": None, "fell_back_at_epoch": None})


def attack_for(info: dict, s: int, stage: StageConfig) -> StageConfig:
    """The stage with the attack its guard decided on: its own, or the fallback after a collapse."""
    adv = stage.adversarial
    if adv is None or adv.guard is None or state_for(info, s)["fell_back_at_epoch"] is None:
        return stage
    return stage.model_copy(update={"adversarial": adv.fallback()})


def says_collapse(run, s: int, stage: StageConfig, row: dict) -> bool:
    """Measure a guarded stage's robust top-1 (into ``row``) and update its best; True on a collapse.
    ``run``: the training's ``Run``."""
    adv = stage.adversarial
    if adv is None or adv.guard is None:
        return False
    tic = time.perf_counter()
    images = run.guard_loaders.get(adv.guard.images)
    if images is None:
        images = run.guard_loaders[adv.guard.images] = guard_images(
            run.train_beton, adv.guard, run.recipe.data, device=run.device, seed=run.recipe.seed,
            distributed=dist_info()[1] > 1)
    robust = robust_top1(run.model, images, adv, run.device)
    # the guard's cost is the method's cost: a robust stage's time is its epochs' plus this
    row["guard_robust_top1"], row["guard_seconds"] = round(100 * robust, 2), round(time.perf_counter() - tic, 2)
    state = state_for(run.info, s)
    best = "" if state["best"] is None else f" (best so far {100 * state['best']:.1f}%)"
    run.say(f"  guard: robust top-1 {100 * robust:.1f}% on {adv.guard.images} training images, "
            f"PGD-{adv.guard.steps}{best}")
    if collapsed(robust, state["best"], adv.guard):
        return True
    state["best"] = robust if state["best"] is None else max(state["best"], robust)
    return False


def fall_back(run, s: int, stage: StageConfig, epoch: int, optimizer, ema, row: dict) -> StageConfig:
    """After a collapse in ``epoch``: the weights, optimizer, EMA and RNG of the checkpoint before it,
    and the rest of the stage with the fallback PGD. Said on the console, in metrics.jsonl and in
    the run's state (so in summary.json and every later checkpoint)."""
    adv, state = stage.adversarial, state_for(run.info, s)
    distributed.barrier()  # rank 0 wrote the checkpoint being read
    path = run.out / "checkpoints" / Position(s, epoch).name()
    weights, saved = RunState.load(path)
    run.model.net.load_state_dict(weights)
    saved.restore_into(optimizer, ema)  # (its info is not taken back: the guard's decision stands)
    state["fell_back_at_epoch"] = epoch + 1
    fallback = adv.fallback()
    event = {"stage": stage.name, "stage_index": s, "epoch": epoch + 1, "guard": "collapse",
             "guard_robust_top1": row["guard_robust_top1"], "guard_best": round(100 * state["best"], 2),
             "rolled_back_to": path.name, "fallback": f"pgd-{fallback.steps}",
             # the discarded epoch's cost (not "seconds": the ETA and the plots read those as an epoch's)
             "discarded_seconds": row["seconds"], "guard_seconds": row["guard_seconds"]}
    if run.is_main:
        folder.append_metrics(run.out, event)
        console.print(f"[yellow]{stage.name} epoch {epoch + 1}: robust top-1 on the guard's images fell to "
                      f"{event['guard_robust_top1']:.1f}% (best {event['guard_best']:.1f}%): catastrophic overfitting. "
                      f"Back to {path.name}; the rest of the stage trains with PGD-{fallback.steps}", soft_wrap=True)
    return stage.model_copy(update={"adversarial": fallback})
