"""``train --dry-run``: what a run would do, read from the resolved recipe and the data folder,
without touching a run folder: the recipe as it will be saved, each stage's epochs, resolutions and
attack, and the betons with their image counts."""

from __future__ import annotations

import os
from itertools import groupby
from pathlib import Path

from fasttricks import recipes
from fasttricks.data.classes import checked_manifests
from fasttricks.data.loader import beton_paths
from fasttricks.recipes import AdversarialConfig, Recipe, StageConfig
from fasttricks.recipes.schedules import resolution_at
from fasttricks.robust.pgd import describe_eps
from fasttricks.training.compiled import limit_for, planned_graphs


def describe_plan(recipe: Recipe, data_dir: str | os.PathLike, out: Path) -> list[str]:
    """Lines that say what ``train`` would do; the data folder's splits are checked as train checks them."""
    recipe.check_start()
    manifests = checked_manifests(data_dir)
    lines = ["# resolved recipe (saved as config.yaml)", *recipes.dump(recipe).rstrip().split("\n"), "",
             f"run folder: {out}"]
    starts = recipe.stage_starts()
    for i, stage in enumerate(recipe.stages):
        lines.append(f"stage {i} {stage.name!r}: epochs {starts[i] + 1}-{starts[i] + stage.epochs} of "
                     f"{recipe.total_epochs()}, batch {stage.batch_size}, {stage.optimizer.name} lr "
                     f"{stage.peak_lr():.4g}; resolution {_resolutions(stage)}" + _extras(stage))
    net = _structure(recipe, len(manifests["train"]["classes"]))
    lines += _frozen_lines(recipe, net)
    lines.append(_batch_norm_line(recipe, net))
    lines += _compiled_lines(recipe)
    if recipe.fixres is not None:
        lines.append("then: the FixRes test-size sweep" + (" and fine-tuning" if recipe.fixres.finetune else ""))
    attack = recipe.evaluation.attack
    if attack is not None:
        lines.append(f"final evaluation: robust top-1 under {attack.norm} {describe_eps(attack)}, PGD-{attack.steps}")
    auto = recipe.evaluation.autoattack
    if auto is not None:
        eps = describe_eps(AdversarialConfig(norm=auto.norm, eps=auto.eps))
        lines.append(f"final evaluation: robust top-1 under AutoAttack ({auto.version}), {auto.norm} {eps}, on "
                     f"{auto.images or 'every'} image(s) of {', '.join(auto.splits)}")
    for split, path in beton_paths(data_dir).items():
        lines.append(f"data {split}: {path} ({manifests[split]['images']} images, "
                     f"{len(manifests[split]['classes'])} classes)")
    return lines


def _compiled_lines(recipe: Recipe) -> list[str]:
    """The graphs torch.compile may build for the steps, and the recompile limit set to hold them."""
    setting = {None: "on CUDA, not on the CPU (model.compile: null)", True: "everywhere (model.compile: true)",
               False: "never (model.compile: false)"}[recipe.model.compile]
    graphs = planned_graphs(recipe)
    lines = [f"compiled {setting}: at most {sum(map(len, graphs.values()))} graphs of the model, dynamo's "
             f"recompile limit set to {limit_for(recipe)}"]
    return lines + [f"  {stage}: {', '.join(g)}" for stage, g in graphs.items()]


def _structure(recipe: Recipe, num_classes: int):
    """The recipe's network on the meta device: its modules and names, no weights made or read."""
    import timm
    import torch

    with torch.device("meta"):
        return timm.create_model(recipe.model.arch, num_classes=num_classes)


def _frozen_lines(recipe: Recipe, net) -> list[str]:
    """What each freezing stage freezes, by name, for this network (models/freezing.py)."""
    from fasttricks.models import freezing

    lines = []
    for i, stage in enumerate(recipe.stages):
        if stage.freeze:
            names = freezing.resolve(net, stage.freeze)
            spec = stage.freeze if isinstance(stage.freeze, str) else "by name"
            lines.append(f"stage {i} {stage.name!r} freezes ({spec}, {len(names)}): {', '.join(names)}")
    return lines


def _batch_norm_line(recipe: Recipe, net) -> str:
    """What each batch norm normalises over at this launch's process count (torchrun's WORLD_SIZE)."""
    from fasttricks.runtime.distributed import batch_norm_scope

    world = int(os.environ.get("WORLD_SIZE", "1"))
    scope = batch_norm_scope(net, recipe.model.sync_batchnorm, {s.name: s.batch_size for s in recipe.stages}, world)
    if scope is None:
        return f"normalisation: {recipe.model.arch} has no batch norm: the same run on any number of processes"
    sizes = ", ".join(f"{name} {n}" for name, n in scope["images"].items())
    if scope["sync"]:
        return f"batch norm: over the global batch on {world} processes (SyncBatchNorm): {sizes} images"
    sync = "model.sync_batchnorm: true for the global batch"
    more = (f" (the stage's batch over {world} processes; {sync})" if world > 1
            else f" (under torchrun, each process's share: {sync})")
    return f"batch norm: over each process's images: {sizes} images per norm{more}"


def _resolutions(stage: StageConfig) -> str:
    """``40 px x4, 48 px x2, 56 px x14``: each resolution and for how many epochs, in order."""
    runs = [(res, len(list(group))) for res, group in
            groupby(resolution_at(stage.resolution, e) for e in range(stage.epochs))]
    return ", ".join(f"{res} px x{n}" for res, n in runs)


def _extras(stage: StageConfig) -> str:
    parts = []
    if stage.adversarial is not None:
        a = stage.adversarial
        step = f"{a.step_size * 255:.3g}/255" if a.norm == "linf" else f"{a.step_size:.3g}"
        attack = "N-FGSM" if a.method == "n_fgsm" else f"PGD-{a.steps}"
        parts.append(f"{attack} {a.norm} ε {describe_eps(a)} step {step}" + (", guarded" if a.guard else ""))
    if stage.freeze:
        parts.append(f"frozen {stage.freeze if isinstance(stage.freeze, str) else len(stage.freeze)}")
    if stage.augment is not None:
        parts.append("heavy augmentation")
    if stage.augmix is not None:
        parts.append("AugMix")
    if stage.mixing is not None:
        parts.append(stage.mixing.kind)
    if stage.optimizer.sam is not None:
        parts.append("SAM")
    if stage.average is not None:
        parts.append("weight averaging")
    return "; " + ", ".join(parts) if parts else ""
