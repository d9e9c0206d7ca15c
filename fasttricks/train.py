"""The training loop: stages of epochs of steps, checkpoints, metrics, resume.

The hot path is ``training_step``; everything else runs once per epoch or less. Rules kept here:
no host-device sync inside a step except at logging points, and every random draw is a
function of (seed, epoch, sample or step), so ``--resume`` reproduces the uninterrupted run.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from contextlib import closing, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import timm.optim
import timm.utils
import torch
from timm.loss import JsdCrossEntropy
from torch import nn

from fasttricks import distributed, fixres, freezing, guard, plots, runs, sam, slurm, syncguard
from fasttricks.adversarial import attack_generator, describe_eps, pgd
from fasttricks.augment import stage_augmentation
from fasttricks.augment.heavy import seeded, step_seed
from fasttricks.augment.mixing import mix
from fasttricks.autoattack import describe as describe_autoattack
from fasttricks.averaging import average_files, calibration_batches, recalibrate_batch_norm
from fasttricks.checkpoint import (
    Position,
    WriteFault,
    list_checkpoints,
    load_checkpoint,
    read_info,
    save_checkpoint,
    save_weights,
)
from fasttricks.data import checksums
from fasttricks.data.classes import checked_manifests
from fasttricks.data.loader import TrainLoader, beton_paths
from fasttricks.devices import autocast, compile_enabled, default_device
from fasttricks.distributed import dist_info
from fasttricks.errors import UserError
from fasttricks.evaluate import as_row, evaluate_splits, val_loaders
from fasttricks.models import Classifier, create_model, load_weights
from fasttricks.progress import console, progress_bar
from fasttricks.recipes import OptimizerConfig, Recipe, RecipeError, StageConfig
from fasttricks.schedules import lr_factor, resolution_at
from fasttricks.status import epoch_times, format_duration, mean_times, remaining_seconds
from fasttricks.tracking import Tracker

LOG_EVERY = 20  # steps between progress updates, the only syncs of a step


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class Interrupted(Exception):
    """Ctrl-C or a scheduler's signal: the run was saved where it stood and can be resumed.
    ``exit_code``: 130 after Ctrl-C, PREEMPTED (75) after SIGTERM or SIGUSR1. The message is
    rank 0's (it saved); other ranks carry an empty one."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


PREEMPTED = 75  # sysexits' EX_TEMPFAIL: saved after SIGTERM/SIGUSR1, to be resumed (README, "Clusters")


def training_step(model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                  optimizer: torch.optim.Optimizer, criterion: nn.Module, stage: StageConfig,
                  generator: torch.Generator | None = None, attack_model: nn.Module | None = None) -> torch.Tensor:
    """One step on a batch already on the device, in [0, 1]: the PGD attack (when the stage has
    one), forward and backward in autocast, optimizer step. Returns the loss as a device tensor
    (no sync). Under DDP, ``model`` is the wrapper and ``attack_model`` the module inside it: the
    attack's input gradients then trigger no gradient all-reduce."""
    if stage.adversarial is not None:
        attack_model = model if attack_model is None else attack_model  # (a compiled module has no truth value)
        distributed.sync_buffers(attack_model)
        images = pgd(attack_model, images, targets, stage.adversarial, generator=generator)
    if stage.optimizer.sam is not None:
        return sam.step(model, images, targets, optimizer, criterion, stage.grad_clip)
    with autocast(images.device):
        loss = criterion(model(images), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if stage.grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), stage.grad_clip)
    optimizer.step()
    return loss.detach()


def augment_and_mix(images: torch.Tensor, labels: torch.Tensor, stage: StageConfig,
                    augment: nn.Module | None, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Heavy augmentation and AugMix, then CutMix / Foreground-CutMix, on the device; targets become
    class probabilities when mixing (with AugMix's JSD the images are 3x the labels, see AugMix).
    Call inside ``seeded`` for reproducible draws."""
    if augment is not None:
        images = augment(images)
    if stage.mixing is not None:
        images, labels, _ = mix(images, labels, num_classes, stage.mixing)
    return images, labels


def create_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """timm's factory: no weight decay on biases and norm parameters, frozen parameters left out;
    inside SAM when the stage asks for it."""
    if cfg.weight_decay == 0:  # timm then takes model.parameters(), frozen ones included
        model = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "sgd":
        base = timm.optim.create_optimizer_v2(model, "nesterov" if cfg.nesterov else "momentum", lr=cfg.lr,
                                              weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    else:
        # fused: one kernel per step, and the step count stays a device tensor (the foreach Adam reads a
        # CPU step counter back each step, which the no-sync guard cannot tell from a device sync)
        base = timm.optim.create_optimizer_v2(model, cfg.name, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                              betas=tuple(cfg.betas), fused=True)
    return sam.wrap(base, cfg.sam) if cfg.sam is not None else base


# ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    """What every part of a training run shares."""

    recipe: Recipe
    out: Path
    device: torch.device
    model: Classifier
    train_model: nn.Module  # the model, or its torch.compile wrapper
    # The run's state beside the weights (architecture, classes, frozen modules, training resolution,
    # test size): what final.safetensors records about the model. It is saved whole with every
    # checkpoint (the weights file's metadata) and `_restore` takes it back whole, so a run resumed at
    # any boundary holds what the uninterrupted run held (position and RNG streams are in state.pt).
    info: dict
    val_loaders: dict
    train_beton: Path
    is_main: bool
    show_progress: bool
    interrupt: _InterruptFlag
    epochs_before: list[int] = field(default_factory=list)  # global epoch index of each stage's start
    last_row: dict | None = None  # the newest metrics row, the same on every rank (rank 0 alone writes the file)
    tracker: Tracker | None = None  # TensorBoard / W&B (logging:), rank 0 only
    epoch_times: dict = field(default_factory=dict)  # (stage, resolution) -> measured seconds of its epochs

    def save(self, position: Position, state: dict) -> Path | None:
        if not self.is_main:
            return None
        with kept_on_write_fault(self.out):
            return save_checkpoint(self.out, position, self.model.net, self.info, state)


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
    paths = beton_paths(data_dir)
    train_manifest = checked_manifests(data_dir)["train"]
    checksums.check_sample(paths, seed=recipe.seed)  # every rank alike: a damaged beton stops them all here
    classes = train_manifest["classes"]
    _check_batch_sizes(recipe, train_manifest["images"], world)
    if resume and rank == 0:
        runs.check_resumable(out)
    created = not out.exists()
    try:
        with runs.lock(out) if rank == 0 else nullcontext():
            if rank == 0:
                recipe = runs.prepare(out, recipe, resume=resume, overwrite=overwrite, data_dir=data_dir)
            distributed.barrier()  # the folder is ready (or cleared) before any rank looks into it
            return _train(recipe, data_dir, paths, classes, out, device, resume=resume, stop_after=stop_after,
                          show_progress=show_progress)
    except UserError:
        # refused before its first checkpoint (an unknown architecture or module to freeze, say):
        # the folder this call made holds no run, so it goes
        if rank == 0 and created and not runs.is_run(out):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _train(recipe: Recipe, data_dir: Path, paths: dict, classes: list[str], out: Path, device: torch.device, *,
           resume: bool, stop_after: int | None, show_progress: bool) -> dict:
    rank, world = dist_info()
    torch.manual_seed(recipe.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = create_model(recipe.model, len(classes))  # the same initial weights on every rank
    if rank > 0:  # then a stream of its own for dropout and drop-path (rank 0 keeps one process's)
        torch.manual_seed(recipe.seed + rank)
    if recipe.model.sync_batchnorm and world > 1:
        model.net = timm.layers.convert_sync_batchnorm(model.net)
    model = model.to(device).to(memory_format=torch.channels_last)
    info = {"arch": recipe.model.arch, "num_classes": len(classes), "classes": classes,
            "mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist(),
            "val_resize": recipe.data.val_resize, "val_crop": recipe.data.val_crop, "recipe": recipe.name,
            "data": Path(data_dir).name, "pretrained": recipe.model.pretrained_name(),
            "training_data": _training_data(data_dir)}
    loaders = val_loaders(data_dir, resize=recipe.data.val_resize, crop=recipe.data.val_crop,
                          batch_size=recipe.data.val_batch_size, device=device, workers=recipe.data.workers,
                          distributed=world > 1)  # every rank evaluates its shard
    starts = recipe.stage_starts()
    tracker = Tracker(recipe.logging, out, recipe.model_dump(mode="json"), enabled=rank == 0)
    with _InterruptFlag() as interrupt, closing(tracker):
        train_model = torch.compile(model) if compile_enabled(recipe.model.compile, device) else model
        run = Run(recipe, out, device, model, train_model, info, loaders, paths["train"],
                  rank == 0, show_progress, interrupt, starts, tracker=tracker)
        position, state = _restore(run) if resume else (Position(0, 0), None)
        run.epoch_times = epoch_times(runs.read_metrics(out))  # the epochs so far, for the run ETA
        started = time.time()
        done_now = 0
        for s, stage in enumerate(recipe.stages):
            if s < position.stage or (s == position.stage and _stage_done(position, stage)):
                continue
            begin = position if s == position.stage else Position(s, 0)
            done_now = _run_stage(run, s, stage, begin, state if s == position.stage else None,
                                  stop_after=stop_after, done_now=done_now)
            if stop_after is not None and done_now >= stop_after:
                return _stopped(run, stop_after)
    summary = _finish(run, time.time() - started)
    distributed.barrier()
    return summary


def _training_data(data_dir: Path) -> str:
    """What the model was trained on, as the export's metadata names it: the images' folder (not the
    betons' folder, whose name says nothing) and its size."""
    from fasttricks.data.beton import read_manifest

    manifest = read_manifest(beton_paths(data_dir)["train"])
    source = Path(manifest.get("source", data_dir))
    name = "toy" if "toy-seed" in str(source) else "/".join(source.parts[-2:])
    return f"{name} ({manifest['images']} images, {len(manifest['classes'])} classes)"


def _check_batch_sizes(recipe: Recipe, images: int, world: int) -> None:
    """Every stage's batch divides among the processes and fits the training set (FFCV drops the
    last partial batch, so a larger batch would give epochs of no step)."""
    for i, stage in enumerate(recipe.stages):
        key = f"--set stages.{i}.batch_size=N"
        if stage.batch_size % world:
            raise RecipeError(f"stage {i} ({stage.name}): batch_size {stage.batch_size} (the global batch) does not "
                              f"divide among {world} processes; choose a multiple of {world} with {key}")
        if stage.batch_size // world > images // world:
            raise RecipeError(f"stage {i} ({stage.name}): batch_size {stage.batch_size} is more than the "
                              f"{images} training images ({images // world} per process); lower it with {key}")


def _run_stage(run: Run, s: int, stage: StageConfig, begin: Position, state: dict | None, *,
               stop_after: int | None, done_now: int) -> int:
    """Run the stage's remaining epochs, or until ``done_now`` (epochs finished in this call)
    reaches ``stop_after``; returns the new ``done_now``."""
    data = run.recipe.data
    rank, world = dist_info()
    loader = TrainLoader(run.train_beton, batch_size=distributed.per_process_batch(stage.batch_size),
                         resolution=resolution_at(stage.resolution, begin.epoch), seed=run.recipe.seed,
                         device=run.device, workers=data.workers, order=data.order, os_cache=data.os_cache,
                         distributed=world > 1, scale=data.crop_scale, ratio=data.crop_ratio)
    if stage.weights and begin == Position(s, 0) and state is None:
        load_weights(run.model.net, stage.weights)
    _apply_freeze(run, stage)
    step_model = distributed.step_module(run.model, run.train_model, run.device)  # after freezing (DDP's params)
    augment = _augmentation(run, stage)
    optimizer = create_optimizer(run.model, stage.optimizer)
    criterion = _criterion(stage)
    ema = (timm.utils.ModelEmaV3(run.model.net, decay=stage.average.ema_decay)
           if stage.average and stage.average.ema_decay else None)
    if state is not None:
        _load_training_state(state, optimizer, ema)
    stage = _guarded_attack(run, s, stage)  # after a collapse, the fallback PGD (the decision is in run.info)
    finished = epoch = begin.epoch
    while epoch < stage.epochs:
        resume_step = begin.step if epoch == begin.epoch else 0
        row = _run_epoch(run, s, stage, epoch, loader, step_model, optimizer, criterion, augment, ema, resume_step,
                         state if resume_step else None)
        if _guard_says_collapse(run, s, stage, epoch, row):
            stage = _fall_back(run, s, stage, epoch, optimizer, ema, row)
            begin = Position(s, epoch)  # the epoch again from its start (even one this call resumed mid-way)
            continue  # from the checkpoint before it, with PGD
        run.last_row = row
        run.tracker.epoch(run.epochs_before[s] + epoch + 1, row)
        if run.is_main:
            runs.append_metrics(run.out, row)
        run.save(Position(s, epoch + 1), {"optimizer": optimizer.state_dict(), **_rng_state(), **_ema_state(ema)})
        finished = epoch = epoch + 1
        done_now += 1
        if stop_after is not None and done_now >= stop_after:
            break
    if finished >= stage.epochs and stage.average is not None:
        _average_stage(run, s, stage, ema)
    if finished >= stage.epochs:
        _write_curves(run)
    return done_now


def _guarded_attack(run: Run, s: int, stage: StageConfig) -> StageConfig:
    """The stage with the attack its guard decided on: its own, or the fallback after a collapse."""
    adv = stage.adversarial
    if adv is None or adv.guard is None or guard.state_for(run.info, s)["fell_back_at_epoch"] is None:
        return stage
    return stage.model_copy(update={"adversarial": adv.fallback()})


def _guard_says_collapse(run: Run, s: int, stage: StageConfig, epoch: int, row: dict) -> bool:
    """Measure a guarded stage's robust top-1 (in ``row``) and update its best; True on a collapse."""
    adv = stage.adversarial
    if adv is None or adv.guard is None:
        return False
    tic = time.perf_counter()
    robust = guard.robust_top1(run.model, run.train_beton, adv, run.recipe.data, device=run.device,
                               seed=run.recipe.seed, distributed=dist_info()[1] > 1)
    # the guard's cost is the method's cost: a robust stage's time is its epochs' plus this
    row["guard_robust_top1"], row["guard_seconds"] = round(100 * robust, 2), round(time.perf_counter() - tic, 2)
    state = guard.state_for(run.info, s)
    if run.is_main and run.show_progress:
        best = "" if state["best"] is None else f" (best so far {100 * state['best']:.1f}%)"
        console.print(f"  guard: robust top-1 {100 * robust:.1f}% on {adv.guard.images} training images, "
                      f"PGD-{adv.guard.steps}{best}")
    if guard.collapsed(robust, state["best"], adv.guard):
        return True
    state["best"] = robust if state["best"] is None else max(state["best"], robust)
    return False


def _fall_back(run: Run, s: int, stage: StageConfig, epoch: int, optimizer, ema, row: dict) -> StageConfig:
    """After a collapse in ``epoch``: the weights, optimizer, EMA and RNG of the checkpoint before it,
    and the rest of the stage with the fallback PGD. Said on the console, in metrics.jsonl and in
    the run's state (so in summary.json and every later checkpoint)."""
    adv, state = stage.adversarial, guard.state_for(run.info, s)
    distributed.barrier()  # rank 0 wrote the checkpoint being read
    path = run.out / "checkpoints" / Position(s, epoch).name()
    weights, saved = load_checkpoint(path)
    run.model.net.load_state_dict(weights)
    _load_training_state(saved, optimizer, ema)
    state["fell_back_at_epoch"] = epoch + 1
    fallback = adv.fallback()
    event = {"stage": stage.name, "stage_index": s, "epoch": epoch + 1, "guard": "collapse",
             "guard_robust_top1": row["guard_robust_top1"], "guard_best": round(100 * state["best"], 2),
             "rolled_back_to": path.name, "fallback": f"pgd-{fallback.steps}",
             # the discarded epoch's cost (not "seconds": the ETA and the plots read those as an epoch's)
             "discarded_seconds": row["seconds"], "guard_seconds": row["guard_seconds"]}
    if run.is_main:
        runs.append_metrics(run.out, event)
        console.print(f"[yellow]{stage.name} epoch {epoch + 1}: robust top-1 on the guard's images fell to "
                      f"{event['guard_robust_top1']:.1f}% (best {event['guard_best']:.1f}%): catastrophic overfitting. "
                      f"Back to {path.name}; the rest of the stage trains with PGD-{fallback.steps}", soft_wrap=True)
    return stage.model_copy(update={"adversarial": fallback})


def _load_training_state(state: dict, optimizer: torch.optim.Optimizer, ema: timm.utils.ModelEmaV3 | None) -> None:
    """What a checkpoint holds beside the weights: the optimizer, the RNG streams, the EMA."""
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state)
    if ema is not None:
        ema.module.load_state_dict(state["ema"])


def _write_curves(run: Run) -> None:
    """RUN/curves.png, refreshed at each stage's end; a plotting failure never stops a run."""
    if not run.is_main:
        return
    try:
        plots.plot([run.out], run.out / plots.CURVES_NAME)
    except Exception as e:  # matplotlib on a head-less node, a full disk...: say so and go on
        console.print(f"[yellow]could not write {run.out / plots.CURVES_NAME}: {type(e).__name__}: {e}")


def _stage_done(position: Position, stage: StageConfig) -> bool:
    return position.epoch >= stage.epochs and (stage.average is None or position.averaged)


def _ema_state(ema: timm.utils.ModelEmaV3 | None) -> dict:
    return {} if ema is None else {"ema": {k: v.detach().clone() for k, v in ema.module.state_dict().items()}}


def _average_stage(run: Run, s: int, stage: StageConfig, ema: timm.utils.ModelEmaV3 | None) -> None:
    """Replace the model by the stage's average (checkpoints or EMA), recompute the statistics of
    the batch norms that are not frozen, evaluate, and checkpoint it as the stage's result."""
    avg = stage.average
    distributed.barrier()  # rank 0 has written the stage's last checkpoint
    if ema is not None:
        run.model.net.load_state_dict(ema.module.state_dict())
        how = f"ema {avg.ema_decay}"
    else:
        epochs = stage.averaged_epochs()
        state, _ = average_files([run.out / "checkpoints" / Position(s, e).name() for e in epochs])
        run.model.net.load_state_dict(state)
        how = f"epochs {','.join(map(str, epochs))}"
    res = resolution_at(stage.resolution, stage.epochs - 1)
    if avg.bn_batches:
        batches = calibration_batches(run.train_beton, avg.bn_batches, stage.batch_size, res, seed=run.recipe.seed,
                                      device=run.device, workers=run.recipe.data.workers)
        recalibrate_batch_norm(run.model, run.model.net, batches, run.info["frozen"])
    distributed.broadcast_weights(run.model.net)  # identical on every rank to the last bit
    row = {"stage": stage.name, "stage_index": s, "epoch": stage.epochs, "averaged": how, "resolution": res}
    row.update(as_row(evaluate_splits(run.model, run.val_loaders, run.device)))
    run.last_row = row
    run.tracker.epoch(run.epochs_before[s] + stage.epochs, row)
    if run.is_main:
        runs.append_metrics(run.out, row)
        if run.show_progress:
            console.print(f"{stage.name}: weights averaged ({how}) · " + _describe_accuracy(row))
    run.save(Position(s, stage.epochs, averaged=True), _rng_state())


def _augmentation(run: Run, stage: StageConfig) -> nn.Module | None:
    """The stage's augmentation, its heavy part compiled where the model is."""
    return stage_augmentation(stage, run.device, compile_enabled(run.recipe.model.compile, run.device),
                              run.recipe.data.pixel_scale)


def _criterion(stage: StageConfig) -> nn.Module:
    """Cross-entropy with the stage's label smoothing; with AugMix's JSD, timm's JsdCrossEntropy
    (cross-entropy on the clean third of the batch plus the consistency term)."""
    if stage.augmix is not None and stage.augmix.jsd:
        return JsdCrossEntropy(num_splits=3, alpha=stage.augmix.jsd_weight, smoothing=stage.label_smoothing)
    return nn.CrossEntropyLoss(label_smoothing=stage.label_smoothing)


def _apply_freeze(run: Run, stage: StageConfig) -> None:
    """Freezing belongs to a stage: undo the previous stage's, apply this one's, record it."""
    freezing.unfreeze(run.model.net)
    frozen = freezing.resolve(run.model.net, stage.freeze)
    freezing.freeze(run.model.net, frozen)
    run.info["frozen"] = frozen
    if frozen and run.is_main and run.show_progress:
        console.print(f"{stage.name}: frozen {len(frozen)} modules ({frozen[0]} … {frozen[-1]})")


def _run_epoch(run: Run, s: int, stage: StageConfig, epoch: int, loader: TrainLoader, step_model: nn.Module,
               optimizer: torch.optim.Optimizer, criterion: nn.Module, augment: nn.Module | None,
               ema: timm.utils.ModelEmaV3 | None, start_step: int, state: dict | None) -> dict:
    res = resolution_at(stage.resolution, epoch)
    steps = len(loader)
    device = run.device
    rank, world = dist_info()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    seen, seconds = 0, 0.0
    if state is not None:  # mid-epoch resume: the running sums continue where they stopped
        loss_sum += state["loss_sum"]
        seen, seconds = state["seen"], state["seconds"]
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    run.model.train()
    label = f"{stage.name} {epoch + 1}/{stage.epochs} @{res}px"
    tic = time.perf_counter()
    with progress_bar(label, steps, enabled=run.show_progress and run.is_main,
                      extra="loss {task.fields[loss]} · {task.fields[ips]} img/s · run eta {task.fields[run_eta]}",
                      loss="…", ips="…", run_eta="…") as advance:
        advance(start_step)
        shown = done = start_step
        seen_before = seen
        for step, (images, labels) in enumerate(loader.epoch(run.epochs_before[s] + epoch, res, start_step),
                                                start=start_step):
            for group in optimizer.param_groups:
                group["lr"] = stage.peak_lr() * lr_factor(stage.schedule, epoch + step / steps, stage.epochs)
            epoch_key = run.epochs_before[s] + epoch
            generator = (attack_generator(device, run.recipe.seed, epoch_key, step, rank)
                         if stage.adversarial else None)
            with syncguard.guard(device, run.train_model is not run.model) if syncguard.enabled() else nullcontext():
                if augment is not None or stage.mixing is not None:
                    with seeded(step_seed(run.recipe.seed, epoch_key, step, rank), device):
                        images, targets = augment_and_mix(images, labels, stage, augment, run.info["num_classes"])
                else:
                    targets = labels
                loss = training_step(step_model, images, targets, optimizer, criterion, stage, generator,
                                     attack_model=run.train_model)
                if ema is not None:
                    ema.update(run.model.net)
                loss_sum += loss
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
            seen += labels.shape[0] * world  # images/s of the whole job
            done = step + 1
            if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
                _check_finite(run, stage, epoch, first_bad)
                mean_loss = loss_sum.item() / (step + 1)
                ips = (seen - seen_before) / max(time.perf_counter() - tic, 1e-9)
                advance(step + 1 - shown, loss=f"{mean_loss:.3f}", ips=f"{ips:.0f}",
                        run_eta=_run_eta(run, s, epoch, res, (step + 1) / steps, seconds + time.perf_counter() - tic))
                run.tracker.scalars((run.epochs_before[s] + epoch) * steps + step + 1,
                                    {"train/loss": mean_loss, "train/lr": optimizer.param_groups[0]["lr"],
                                     "train/images_per_s": ips})
                shown = step + 1
            if _interrupted(run, step, steps):
                _check_finite(run, stage, epoch, first_bad)
                path = run.save(Position(s, epoch, step + 1),
                                {"optimizer": optimizer.state_dict(), **_rng_state(), **_ema_state(ema),
                                 "loss_sum": loss_sum.cpu(),
                                 "seen": seen, "seconds": seconds + time.perf_counter() - tic})
                raise _interrupted_error(run, stage, epoch, step, path)
    seconds += time.perf_counter() - tic
    run.epoch_times.setdefault((s, res), []).append(seconds)
    run.info["train_resolution"] = res
    row = {"stage": stage.name, "stage_index": s, "epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
           "resolution": res, "train_loss": loss_sum.item() / max(done, 1),
           "images_per_s": round(seen / max(seconds, 1e-9), 1), "seconds": round(seconds, 2), "steps": steps}
    every = run.recipe.evaluation.every
    if (epoch + 1) % every == 0 or epoch + 1 == stage.epochs:  # every rank its shard
        row.update(as_row(evaluate_splits(run.model, run.val_loaders, device)))
    if run.is_main and run.show_progress:
        console.print(_describe_row(row))
    return row


def _run_eta(run: Run, s: int, epoch: int, res: int, part_done: float, elapsed: float) -> str:
    """The whole run's remaining time: the recipe's remaining epochs at their resolutions, each at
    the measured time of its stage and resolution (this epoch's rate where none is measured yet)."""
    measured = mean_times(run.epoch_times)
    measured.setdefault((s, res), elapsed / max(part_done, 1e-9))
    left, unknown = remaining_seconds(run.recipe, measured, s, epoch, part_done)
    return f"{format_duration(sum(left))}" + (f" + {', '.join(unknown)}" if unknown else "")


def _interrupted(run: Run, step: int, steps: int) -> bool:
    """Ctrl-C seen. With several processes, agreed at logging points, so that every rank stops
    after the same step."""
    if dist_info()[1] == 1:
        return run.interrupt.set
    if not ((step + 1) % LOG_EVERY == 0 or step + 1 == steps):
        return False
    # which signals reached any rank: every rank then stops, and exits, alike
    seen = distributed.any_rank_each([s in run.interrupt.signals for s in run.interrupt.SIGNALS], run.device)
    run.interrupt.signals = {s for s, flag in zip(run.interrupt.SIGNALS, seen, strict=True) if flag}
    return bool(run.interrupt.signals)


def _interrupted_error(run: Run, stage: StageConfig, epoch: int, step: int, path: Path | None) -> Interrupted:
    """What stops the run after the save; under Slurm, a SIGUSR1 also requeues the job."""
    signals = run.interrupt.signals
    code = PREEMPTED if signals & {signal.SIGTERM, signal.SIGUSR1} else 130
    if not run.is_main:
        return Interrupted("", code)
    message = (f"interrupted in {stage.name} epoch {epoch + 1} after step {step + 1}; saved {path} "
               f"({epoch} epoch(s) and {step + 1} step(s) of stage {stage.name} done). Continue with --resume.")
    if signal.SIGUSR1 in signals and os.environ.get("SLURM_JOB_ID"):
        message += " " + slurm.requeue(os.environ["SLURM_JOB_ID"])
    return Interrupted(message, code)


def _describe_row(row: dict) -> str:
    return (f"  epoch {row['epoch']} · lr {row['lr']:.3g} · loss {row['train_loss']:.3f} · "
            f"{row['images_per_s']:.0f} img/s · {_describe_accuracy(row)}")


def _describe_accuracy(row: dict) -> str:
    return " · ".join(f"{split} {row[f'{split}_top1']:.1f}% (top-5 {row[f'{split}_top5']:.1f}%)"
                      for split in ("val", "val_clutter") if f"{split}_top1" in row)


@contextmanager
def kept_on_write_fault(out: Path):
    """A checkpoint or the final model that cannot be written ends the run in one line: the file,
    the system's message, and the last complete checkpoint, which is kept (writes are atomic)."""
    try:
        yield
    except WriteFault as e:
        kept = list_checkpoints(out)
        where = f"the last complete checkpoint, {kept[-1][1]}, is kept" if kept else "no checkpoint was complete yet"
        raise WriteFault(f"{e}; {where}. Free space and continue with --resume") from None


def _check_finite(run: Run, stage: StageConfig, epoch: int, first_bad: torch.Tensor) -> None:
    bad = distributed.earliest_step(first_bad)  # agreed: every rank raises the same, together
    if bad >= 0:
        kept = list_checkpoints(run.out)
        where = f"the last good checkpoint is {kept[-1][1]}" if kept else "no checkpoint was written yet"
        raise TrainingDiverged(f"non-finite loss in stage {stage.name!r}, epoch {epoch + 1}, step {bad + 1}; "
                               f"{where}. Lower the learning rate or set grad_clip.")


def _rng_state() -> dict:
    """Every rank's own generators (the CPU's and its CUDA device's), gathered for rank 0 to save:
    each rank draws its own dropout and drop-path masks, and a resumed rank continues its own."""
    own = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        own["cuda"] = torch.cuda.get_rng_state()  # the current device: this rank's
    return {"rng_by_rank": distributed.gather_objects(own)}


def _set_rng_state(state: dict) -> None:
    rank = dist_info()[0]
    if "rng_by_rank" not in state:  # a checkpoint of an earlier version: rank 0's streams, every device
        torch.set_rng_state(state["torch_rng"])
        cuda = state.get("cuda_rng", [])
        if torch.cuda.is_available() and torch.cuda.current_device() < len(cuda):
            torch.cuda.set_rng_state(cuda[torch.cuda.current_device()])
        return
    by_rank = state["rng_by_rank"]
    own = by_rank[rank % len(by_rank)]  # another world size cannot continue every stream: each rank takes one
    torch.set_rng_state(own["torch"])
    if "cuda" in own and torch.cuda.is_available():
        torch.cuda.set_rng_state(own["cuda"])


def _restore(run: Run) -> tuple[Position, dict | None]:
    """Load the newest checkpoint of the run folder; drop metrics rows written after it."""
    found = list_checkpoints(run.out)
    if not found:
        console.print(f"[yellow]no checkpoint in {run.out}: starting from the beginning")
        return Position(0, 0), None
    position, path = found[-1]
    weights, state = load_checkpoint(path)
    run.model.net.load_state_dict(weights)
    run.info = {**run.info, **read_info(path / "model.safetensors")}
    # frozen as when it was saved: a stage that resumes re-freezes for itself, but after the last
    # stage nothing else would (FixRes' fine-tuning must not train the frozen batch norms)
    freezing.freeze(run.model.net, run.info.get("frozen", []))
    if run.is_main:
        def kept(row: dict) -> bool:
            return (row["stage_index"], row["epoch"], "averaged" in row) <= (
                position.stage, position.epoch, position.averaged)
        runs.truncate_metrics(run.out, kept)
        console.print(f"resuming from {path}")
    # At a stage's end the next stage starts afresh: its optimizer, the RNG continuing.
    if _stage_done(position, run.recipe.stages[position.stage]):
        _set_rng_state(state)
        return position, None
    return position, state


def _final_metrics(run: Run) -> dict:
    rows = runs.read_metrics(run.out)
    return rows[-1] if rows else {}


def _finish(run: Run, seconds: float) -> dict:
    """After the last stage: the FixRes sweep (when the recipe has one), the final evaluation at
    the chosen test size (robust accuracy too when the recipe asks), final.safetensors, summary.json."""
    last = run.last_row or _final_metrics(run)  # (read back when this call trained nothing)
    data = run.recipe.data
    summary = {"run": str(run.out.resolve()), "recipe": run.recipe.name, "model": run.recipe.model.arch,
               "epochs": run.recipe.total_epochs(),
               "final_weights": str((run.out / "final.safetensors").resolve()),
               "val_resize": data.val_resize, "val_crop": data.val_crop,
               "test_resize": data.val_resize, "test_crop": data.val_crop,
               "seconds_this_call": round(seconds, 1)}
    summary.update({k: v for k, v in last.items() if k.startswith(("val", "train_loss", "images_per_s"))})
    # every rank sweeps, fine-tunes and evaluates (sharded); rank 0 writes
    if run.recipe.fixres is not None:
        summary.update(_fixres(run))
    if any(g.get("fell_back_at_epoch") for g in run.info.get("guard", {}).values()):
        summary["guard"] = run.info["guard"]  # a stage fell back to PGD after a collapse
    evaluation = run.recipe.evaluation
    summary["metrics_at"] = {"resize": data.val_resize, "crop": data.val_crop}  # where val_* were measured
    if run.recipe.fixres is not None or evaluation.attack is not None or evaluation.autoattack is not None:
        summary.update(_final_accuracy(run, summary["test_resize"], summary["test_crop"]))
        summary["metrics_at"] = {"resize": summary["test_resize"], "crop": summary["test_crop"]}
    if run.is_main:
        with kept_on_write_fault(run.out):
            save_weights(run.out / "final.safetensors", run.model.net, run.info)
            runs.write_json(run.out / "summary.json", summary)
        _write_curves(run)  # with the final robust accuracy
    return summary


def _fixres(run: Run) -> dict:
    """Sweep the test size, write the curve, optionally fine-tune at the best size; the model's
    info then names that size (eval and export read it)."""
    cfg, data = run.recipe.fixres, run.recipe.data
    sizes = fixres.size_pairs(cfg.sizes or fixres.default_sizes(data.val_crop), data.val_crop / data.val_resize)
    _, chosen = fixres.choose(run.model, run.val_loaders, sizes, metric=cfg.metric, held_out=cfg.held_out,
                              device=run.device, out_dir=run.out,
                              train_crop=run.info.get("train_resolution"), title=f"FixRes: {run.recipe.name}",
                              show_progress=run.show_progress and run.is_main, write=run.is_main)
    if cfg.finetune is not None:  # every rank, the same batches (a SyncBatchNorm then all-gathers on every rank)
        fixres.finetune(run.model, run.model.net, run.train_beton, crop=chosen["crop"], resize=chosen["resize"],
                        cfg=cfg.finetune, seed=run.recipe.seed, device=run.device, workers=data.workers,
                        frozen=run.info.get("frozen", []), show_progress=run.show_progress and run.is_main)
        distributed.broadcast_weights(run.model.net)
    run.info.update(fixres.test_size_info(run.info, chosen))
    return fixres.summary_fields(chosen)


def _final_accuracy(run: Run, resize: int, crop: int) -> dict:
    """Clean accuracy at the test size, and robust accuracy under the recipe's PGD and AutoAttack."""
    attack, auto = run.recipe.evaluation.attack, run.recipe.evaluation.autoattack
    for loader in run.val_loaders.values():
        loader.set_size(resize, crop)
    results = evaluate_splits(run.model, run.val_loaders, run.device, attack, auto, num_classes=run.info["num_classes"])
    out = as_row(results)
    if attack is not None:
        out["robust_attack"] = f"{attack.norm}:{describe_eps(attack)}:{attack.steps}"
    if auto is not None:
        out["autoattack"] = {**describe_autoattack(auto),
                             "images": {split: m["autoattack_images"] for split, m in results.items()
                                        if "autoattack_images" in m}}
    return out


def _stopped(run: Run, epochs: int) -> dict:
    return {"run": str(run.out.resolve()), "stopped_after_epochs": epochs, **_final_metrics(run)}


class _InterruptFlag:
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

    def __enter__(self) -> _InterruptFlag:
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
