"""What a recipe compiles, and room for it: torch.compile keeps one graph per (function, guards),
and dynamo gives each function at most ``recompile_limit`` of them (8 by default). Past that it
runs the function eagerly from then on, with one warning in the log: a recipe's later epochs would
silently lose compilation. The graphs of a training step change with the resolution (until dynamo
marks the image size dynamic, at the second one), the model's mode (the attack runs it in eval
mode with the weights not requiring gradients; the step in train mode), the trainable set (a
stage that freezes), and a batch-norm momentum (SAM's second pass holds the running statistics).
``planned_graphs`` lists, for each stage and resolution, the graphs its steps may need (an upper
bound: dynamic shapes make fewer), ``--dry-run`` prints them, and ``make_room`` raises dynamo's
limit to hold them all (tests/test_compile.py walks the shipped recipes' schedules through the
compiled step and fails on a step that would run eagerly)."""

from __future__ import annotations

import torch._dynamo

from fasttricks.recipes import Recipe, StageConfig
from fasttricks.recipes.schedules import resolution_at

SLACK = 4  # the compiled heavy augmentation and a guard's fallback attack, which share no graph with the step


def stage_graphs(stage: StageConfig) -> list[str]:
    """The graphs of one stage's steps, per distinct resolution, in the order the epochs meet them."""
    modes = ["attack (eval, input gradients)"] if stage.adversarial is not None else []
    modes.append("step (train)")
    if stage.optimizer.sam is not None:
        modes.append("SAM's second pass (train, statistics held)")
    resolutions = dict.fromkeys(resolution_at(stage.resolution, e) for e in range(stage.epochs))
    return [f"{res} px {mode}" for res in resolutions for mode in modes]


def planned_graphs(recipe: Recipe) -> dict[str, list[str]]:
    """Each stage's graphs, by stage name."""
    return {stage.name: stage_graphs(stage) for stage in recipe.stages}


def limit_for(recipe: Recipe) -> int:
    """The recompile limit that holds every planned graph of ``recipe``, never below dynamo's default."""
    return max(8, sum(len(g) for g in planned_graphs(recipe).values()) + SLACK)


def make_room(recipe: Recipe) -> int:
    """Raise dynamo's per-function recompile limit (and the accumulated one) to hold ``recipe``;
    returns the limit in force. Process-wide: dynamo has no per-function setting."""
    limit = max(torch._dynamo.config.recompile_limit, limit_for(recipe))
    torch._dynamo.config.recompile_limit = limit
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                           4 * limit)
    return limit
