"""The training loop: stages of epochs of steps, read top to bottom.

Every trick is a call into the module named for it (augment, robust, the step, the guard); logging,
interrupts, checkpoints and the run's ends live in their own modules. Rules kept here: no host-device
sync inside a step except at logging points, and every random draw is a function of (seed, epoch,
sample or step), so ``--resume`` reproduces the uninterrupted run.
"""

from __future__ import annotations

import os
import shutil
import time
from contextlib import closing, nullcontext
from pathlib import Path

import timm.utils
import torch

from fasttricks.augment import augment_and_mix
from fasttricks.augment.heavy import seeded, step_seed
from fasttricks.data import checksums
from fasttricks.data.classes import checked_manifests
from fasttricks.data.loader import TrainLoader, beton_paths
from fasttricks.errors import UserError
from fasttricks.evaluation.evaluate import as_row, evaluate_splits
from fasttricks.models import freezing
from fasttricks.models.weights import load_weights
from fasttricks.progress import console
from fasttricks.recipes import Recipe, StageConfig
from fasttricks.recipes.schedules import lr_factor, resolution_at
from fasttricks.robust.pgd import attack_generator
from fasttricks.runs import folder
from fasttricks.runs.checkpoint import Position, list_checkpoints
from fasttricks.runs.status import epoch_times
from fasttricks.runtime import distributed, syncguard
from fasttricks.runtime.devices import default_device
from fasttricks.runtime.distributed import dist_info
from fasttricks.training import guard
from fasttricks.training.epoch_log import EpochLog, describe_row, is_logging_step
from fasttricks.training.finish import average_stage, finish, finish_evaluation, stopped, write_curves
from fasttricks.training.interrupts import InterruptFlag, check_finite, interrupted_error, should_stop
from fasttricks.training.run import Run, check_batch_sizes
from fasttricks.training.state import RunState, stage_done
from fasttricks.training.step import create_optimizer, criterion_for, training_step
from fasttricks.training.tracking import Tracker


def train(recipe: Recipe, data_dir: str | os.PathLike, out: str | os.PathLike, *, device: torch.device | None = None,
          resume: bool = False, overwrite: bool = False, stop_after: int | None = None,
          show_progress: bool = True) -> dict:
    """Run every stage of ``recipe`` on the betons in ``data_dir``, writing the run to ``out``.

    ``stop_after`` ends this call after that many epochs (for time-limited jobs; ``resume``
    continues). Returns the summary (also written to ``summary.json`` when the run completes).
    """
    out, device = Path(out), device or default_device()
    rank, world = dist_info()
    recipe.check_start()
    if rank == 0 and show_progress:
        for line in recipe.notes():  # what the overrides changed in the experiment; steps beyond ε
            console.print(f"[yellow]{line}", soft_wrap=True)
    train_manifest = checked_manifests(data_dir)["train"]
    checksums.check_sample(beton_paths(data_dir), seed=recipe.seed)  # every rank alike: a damaged beton stops all
    check_batch_sizes(recipe, train_manifest["images"], world)
    if resume and rank == 0:
        folder.check_resumable(out)
    created = not out.exists()
    try:
        with folder.lock(out) if rank == 0 else nullcontext():
            if rank == 0:
                recipe = folder.prepare(out, recipe, resume=resume, overwrite=overwrite, data_dir=data_dir)
            distributed.barrier()  # the folder is ready (or cleared) before any rank looks into it
            tracker = Tracker(recipe.logging, out, recipe.model_dump(mode="json"), enabled=rank == 0)
            with InterruptFlag() as interrupt, closing(tracker):
                run = Run.create(recipe, Path(data_dir), train_manifest["classes"], out, device, interrupt, tracker,
                                 show_progress)
                return _train(run, resume=resume, stop_after=stop_after)
    except UserError:
        # refused before its first checkpoint (an unknown architecture or module to freeze, say):
        # the folder this call made holds no run, so it goes
        if rank == 0 and created and not folder.is_run(out):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _train(run: Run, *, resume: bool, stop_after: int | None) -> dict:
    if resume and folder.evaluation_pending(run.out):  # trained and written; its evaluation did not end
        summary = finish_evaluation(run)
        distributed.barrier()
        return summary
    state = _restore(run) if resume else None
    position = state.position if state else Position(0, 0)
    run.epoch_times = epoch_times(folder.read_metrics(run.out))  # the epochs so far, for the run ETA
    started, done_now = time.time(), 0
    for s, stage in enumerate(run.recipe.stages):
        if s < position.stage or (s == position.stage and stage_done(position, stage)):
            continue
        begin = position if s == position.stage else Position(s, 0)
        done_now = _run_stage(run, s, stage, begin, state if s == position.stage else None, stop_after, done_now)
        if stop_after is not None and done_now >= stop_after:
            return stopped(run, stop_after)
    summary = finish(run, time.time() - started)
    distributed.barrier()
    return summary


def _run_stage(run: Run, s: int, stage: StageConfig, begin: Position, state: RunState | None,
               stop_after: int | None, done_now: int) -> int:
    """The stage's remaining epochs, or until ``done_now`` (epochs finished in this call) reaches
    ``stop_after``; returns the new ``done_now``."""
    loader = run.train_loader(stage, begin.epoch)
    if stage.weights and begin == Position(s, 0) and state is None:
        load_weights(run.model.net, stage.weights)
    run.freeze_for(stage)
    step_model = distributed.step_module(run.model, run.train_model, run.device)  # after freezing (DDP's params)
    augment, criterion = run.augmentation(stage), criterion_for(stage)
    optimizer = create_optimizer(run.model, stage.optimizer)
    ema = (timm.utils.ModelEmaV3(run.model.net, decay=stage.average.ema_decay)
           if stage.average and stage.average.ema_decay else None)
    if state is not None:
        state.restore_into(optimizer, ema)
    stage = guard.attack_for(run.info, s, stage)  # after a collapse, the fallback PGD (the decision is in info)
    epoch = begin.epoch
    while epoch < stage.epochs:
        mid_epoch = state if state is not None and epoch == begin.epoch and begin.step else None
        row = _run_epoch(run, s, stage, epoch, loader, step_model, optimizer, criterion, augment, ema, mid_epoch)
        if guard.says_collapse(run, s, stage, row):
            stage = guard.fall_back(run, s, stage, epoch, optimizer, ema, row)
            begin, state = Position(s, epoch), None  # the epoch again, from the checkpoint before it, with PGD
            continue
        run.record(s, epoch + 1, row)
        epoch += 1
        run.save(Position(s, epoch), optimizer, ema)
        done_now += 1
        if stop_after is not None and done_now >= stop_after:
            break
    if epoch >= stage.epochs:
        if stage.average is not None:
            average_stage(run, s, stage, ema)
        write_curves(run)
    return done_now


def _run_epoch(run: Run, s: int, stage: StageConfig, epoch: int, loader: TrainLoader, step_model: torch.nn.Module,
               optimizer: torch.optim.Optimizer, criterion: torch.nn.Module, augment: torch.nn.Module | None,
               ema: timm.utils.ModelEmaV3 | None, mid_epoch: RunState | None) -> dict:
    """One epoch (or its rest, continuing ``mid_epoch``'s running sums); returns its metrics row."""
    res, steps, device = resolution_at(stage.resolution, epoch), len(loader), run.device
    rank, world = dist_info()
    epoch_key = run.epochs_before[s] + epoch  # the run's epoch: every draw of this epoch is seeded by it
    start = mid_epoch.position.step if mid_epoch else 0
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    if mid_epoch:
        loss_sum += mid_epoch.loss_sum
    first_bad = torch.full((), -1, device=device, dtype=torch.long)  # the first non-finite loss, without a sync
    run.model.train()
    seen, seconds = (mid_epoch.seen, mid_epoch.seconds) if mid_epoch else (0, 0.0)
    with EpochLog(run, s, stage, epoch, res, steps, start, seen, seconds) as log:
        for step, (images, labels) in enumerate(loader.epoch(epoch_key, res, start), start=start):
            for group in optimizer.param_groups:
                group["lr"] = stage.peak_lr() * lr_factor(stage.schedule, epoch + step / steps, stage.epochs)
            generator = attack_generator(device, run.recipe.seed, epoch_key, step, rank) if stage.adversarial else None
            with syncguard.guard(device, run.train_model is not run.model) if syncguard.enabled() else nullcontext():
                targets = labels
                if augment is not None or stage.mixing is not None:
                    with seeded(step_seed(run.recipe.seed, epoch_key, step, rank), device):
                        images, targets = augment_and_mix(images, labels, stage, augment, run.info["num_classes"])
                loss = training_step(step_model, images, targets, optimizer, criterion, stage, generator,
                                     attack_model=run.train_model)
                if ema is not None:
                    ema.update(run.model.net)
                loss_sum += loss
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
            if is_logging_step(step, steps):  # the epoch's only syncs
                check_finite(run.out, stage, epoch, first_bad)
            log.step_done(step, labels.shape[0] * world, loss_sum, optimizer.param_groups[0]["lr"])
            if should_stop(run.interrupt, step, steps, device):
                check_finite(run.out, stage, epoch, first_bad)
                path = run.save(Position(s, epoch, step + 1), optimizer, ema, loss_sum=loss_sum.cpu(), seen=log.seen,
                                seconds=log.seconds())
                raise interrupted_error(run.interrupt, stage, epoch, step, path)
    seconds = log.seconds()
    run.epoch_times.setdefault((s, res), []).append(seconds)
    run.info["train_resolution"] = res
    row = {"stage": stage.name, "stage_index": s, "epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
           "resolution": res, "train_loss": loss_sum.item() / max(steps, 1),
           "images_per_s": round(log.seen / max(seconds, 1e-9), 1), "seconds": round(seconds, 2), "steps": steps}
    if (epoch + 1) % run.recipe.evaluation.every == 0 or epoch + 1 == stage.epochs:  # every rank its shard
        row.update(as_row(evaluate_splits(run.model, run.val_loaders, device)))
    run.say(describe_row(row))
    return row


def _restore(run: Run) -> RunState | None:
    """The newest checkpoint of the run folder into the run; metrics rows written after it dropped.
    Returns its state (None: no checkpoint). At a stage's end the next stage starts afresh, with its
    own optimizer and the RNG continuing: the state returned then holds the position alone."""
    found = list_checkpoints(run.out)
    if not found:
        console.print(f"[yellow]no checkpoint in {run.out}: starting from the beginning")
        return None
    position, path = found[-1]
    weights, state = RunState.load(path)
    run.model.net.load_state_dict(weights)
    run.info = {**run.info, **state.info}
    # frozen as when it was saved: a stage that resumes re-freezes for itself, but after the last
    # stage nothing else would (FixRes' fine-tuning must not train the frozen batch norms)
    freezing.freeze(run.model.net, run.info.get("frozen", []))
    if run.is_main:
        folder.truncate_metrics(run.out, lambda row: (row["stage_index"], row["epoch"], "averaged" in row) <= (
            position.stage, position.epoch, position.averaged))
        console.print(f"resuming from {path}")
    if stage_done(position, run.recipe.stages[position.stage]):
        state.restore_into(None, None)
        return RunState(position, run.info)
    return state
