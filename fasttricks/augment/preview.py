"""``fasttricks show-augs``: one training batch before and after a stage's augmentation and
mixing, as a labelled image grid (people check augmentations by looking)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from fasttricks.atomic import atomic_path  # noqa: E402
from fasttricks.augment import stage_augmentation  # noqa: E402
from fasttricks.augment.heavy import seeded, step_seed  # noqa: E402
from fasttricks.augment.mixing import one_hot  # noqa: E402
from fasttricks.data.loader import TrainLoader, beton_paths  # noqa: E402
from fasttricks.data.manifest import read_manifest  # noqa: E402
from fasttricks.errors import InputError
from fasttricks.recipes import Recipe  # noqa: E402
from fasttricks.recipes.schedules import resolution_at  # noqa: E402


def _label(target: torch.Tensor, classes: list[str]) -> str:
    top = target.topk(min(2, len(classes)))
    parts = [f"{classes[i]} {w:.2f}" for w, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
             if w > 0.005]
    return "\n".join(parts)


def augment_grid(recipe: Recipe, data_dir: str | os.PathLike, out: str | os.PathLike, *, stage: int = 0,
                 n: int = 8, device: torch.device) -> Path:
    """Write the grid PNG to ``out`` (atomically); returns its path."""
    from fasttricks.augment import augment_and_mix

    if not 0 <= stage < len(recipe.stages):
        raise InputError(f"--stage must be in 0..{len(recipe.stages) - 1}, not {stage}")
    cfg = recipe.stages[stage]
    if cfg.augment is None and cfg.augmix is None and cfg.mixing is None:
        with_aug = [i for i, s in enumerate(recipe.stages)
                    if s.augment is not None or s.augmix is not None or s.mixing is not None]
        hint = (f"; stage(s) {', '.join(map(str, with_aug))} have: --stage {with_aug[0]}" if with_aug
                else "; choose a recipe that has, e.g. pipelines/table1/5-heavy-aug-fcutmix.yaml")
        raise InputError(f"{recipe.name} stage {stage} ({cfg.name!r}) has no augmentation or mixing: both rows of "
                         f"the grid would be the same images{hint}")
    paths = beton_paths(data_dir)
    classes = read_manifest(paths["train"])["classes"]
    res = resolution_at(cfg.resolution, cfg.epochs - 1)
    loader = TrainLoader(paths["train"], batch_size=n, resolution=res, seed=recipe.seed, device=device,
                         workers=recipe.data.workers, scale=recipe.data.crop_scale, ratio=recipe.data.crop_ratio)
    images, labels = next(iter(loader.epoch(0, res)))
    with seeded(step_seed(recipe.seed, 0, 0), device):
        augment = stage_augmentation(cfg, device, pixel_scale=recipe.data.pixel_scale)
        after, targets = augment_and_mix(images, labels, cfg, augment, len(classes))
    if cfg.augmix is not None and cfg.augmix.jsd:  # clean, view 1, view 2: show view 1
        after = after[n:2 * n]
    targets = one_hot(targets, len(classes))
    fig, axes = plt.subplots(2, n, figsize=(1.8 * n, 4.4), squeeze=False)
    for col in range(n):
        for row, (batch, caption) in enumerate(((images, classes[labels[col]]),
                                                (after, _label(targets[col], classes)))):
            ax = axes[row][col]
            ax.imshow(batch[col].permute(1, 2, 0).float().cpu().clamp(0, 1).numpy())
            ax.set_title(caption, fontsize=8)
            ax.axis("off")
    axes[0][0].text(-0.1, 0.5, "loaded", transform=axes[0][0].transAxes, rotation=90, va="center", ha="right")
    axes[1][0].text(-0.1, 0.5, "augmented\n+ mixed", transform=axes[1][0].transAxes, rotation=90,
                    va="center", ha="right")
    fig.suptitle(f"{recipe.name}, stage {cfg.name!r} at {res}px", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out
