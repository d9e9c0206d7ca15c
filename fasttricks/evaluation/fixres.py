"""FixRes (Touvron et al., "Fixing the train-test resolution discrepancy"): a network trained on
random-resized crops sees objects larger than a centre crop at the same size shows them, so its
best test size is larger than its training crop. We sweep test crops C with resize R = C / ratio
(the ratio of the training-time test transform, 240/272 in the paper), save the curve (the paper's
Figure 1) and pick the size with the best validation top-1, or, as the paper did, the best score on
a Brain-Score benchmark (``brainscore:Rajalingham2018public-i2n``, the public behaviour benchmark).

The optional second step of FixRes fine-tunes only the classifier and the batch-norm layers at
the chosen size, on training images cropped so that objects appear at their test-time size.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fasttricks.atomic import atomic_path, make_folder, write_json, write_text
from fasttricks.data.loader import ValLoader
from fasttricks.errors import InputError
from fasttricks.evaluation.evaluate import as_row, evaluate_splits, val_loaders
from fasttricks.models.factory import patch_size
from fasttricks.models.weights import update_info
from fasttricks.progress import console, progress_bar
from fasttricks.recipes import FIXRES_SPLITS, FixResFineTuneConfig, resize_crop

CSV_NAME, PNG_NAME = "fixres.csv", "fixres.png"
BRAINSCORE = "brainscore:"


def benchmark_of(metric: str) -> str | None:
    """The Brain-Score benchmark a metric names (``brainscore:ID``), or None for a split's top-1;
    any other metric is an error naming the choices."""
    if metric.startswith(BRAINSCORE) and metric[len(BRAINSCORE):].strip():
        return metric[len(BRAINSCORE):].strip()
    if metric not in FIXRES_SPLITS:
        raise InputError(f"FixRes metric {metric!r}: expected val, val_clutter or brainscore:BENCHMARK "
                         f"(e.g. brainscore:Rajalingham2018public-i2n)")
    return None


def default_sizes(crop: int) -> list[int]:
    """Test crops from 0.8x to 1.75x the training test crop, on a grid of multiples of 8 (about 15
    points): 192, 208, ..., 416 for 240. It holds crop 288 (the 2022 entries tested at resize 324 / crop
    288; the paper names 324x324 as the behaviour-optimal test resolution) and 384, the classification
    optimum the paper cites."""
    step = max(8, 8 * round(crop / 15 / 8))
    start = max(8, 8 * round(0.8 * crop / 8))
    return list(range(start, int(1.75 * crop) + 1, step))


def size_pairs(sizes: list[int | str], ratio: float, multiple: int = 1) -> list[tuple[int, int]]:
    """(resize, crop) for each size: a crop is resized at the training ``ratio``, a ``"R/C"`` pair
    is taken as written. Sorted by crop, then resize; duplicates dropped. ``multiple``: a ViT's
    patch side; a crop is rounded to the nearest multiple of it (a written pair must be one)."""
    if not 0 < ratio <= 1:
        raise InputError(f"crop/resize ratio must lie in (0, 1], not {ratio}")
    pairs = set()
    for size in sizes:
        if isinstance(size, str):
            resize, crop = resize_crop(size)
            if crop % multiple:
                raise InputError(f"FixRes size {size}: the crop must be a multiple of the model's patch side "
                                 f"({multiple} px)")
        else:
            crop = max(multiple, multiple * round(int(size) / multiple))
            resize = round(crop / ratio)
        pairs.add((resize, crop))
    return sorted(pairs, key=lambda rc: (rc[1], rc[0]))


def sweep(model: nn.Module, loaders: dict[str, ValLoader], sizes: list[tuple[int, int]], *,
          device: torch.device, show_progress: bool = True) -> list[dict]:
    """Accuracy at each (resize, crop); one row per size. The loaders are left at the last size."""
    rows = []
    with progress_bar("FixRes sweep", len(sizes), enabled=show_progress) as advance:
        for resize, crop in sizes:
            for loader in loaders.values():
                loader.set_size(resize, crop)
            rows.append({"crop": crop, "resize": resize, **as_row(evaluate_splits(model, loaders, device))})
            advance(1)
    return rows


def best(rows: list[dict], metric: str = "val_top1") -> dict:
    """The row with the highest ``metric`` (a column of the curve); on a tie, the smallest size
    (cheaper to run)."""
    if metric not in rows[0]:
        raise InputError(f"fixres metric {metric!r}: the data has no such split (have: "
                         f"{', '.join(k for k in rows[0] if k.endswith('_top1'))})")
    return max(rows, key=lambda r: (r[metric], -r["crop"], -r["resize"]))


def halves(loaders: dict[str, ValLoader]) -> tuple[dict[str, ValLoader], dict[str, ValLoader]]:
    """Each split's loader as two: its even-numbered images (to choose the size on) and its
    odd-numbered ones (to report the chosen size on)."""
    from fasttricks.data.manifest import read_manifest

    pick, report = {}, {}
    for split, loader in loaders.items():
        n = read_manifest(loader.beton)["images"]
        pick[split], report[split] = (loader.subset(np.arange(start, n, 2)) for start in (0, 1))
    return pick, report


def write_curve(rows: list[dict], chosen: dict, out_dir: Path, *, train_crop: int | None = None,
                title: str = "") -> tuple[Path, Path]:
    """``fixres.csv`` (one row per size) and ``fixres.png`` (top-1 against the test crop), atomically."""
    make_folder(out_dir)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(out_dir / CSV_NAME, buf.getvalue())
    _plot(rows, chosen, out_dir / PNG_NAME, train_crop=train_crop, title=title)
    return out_dir / CSV_NAME, out_dir / PNG_NAME


def _plot(rows: list[dict], chosen: dict, path: Path, *, train_crop: int | None, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    crops = [r["crop"] for r in rows]
    scored = chosen.get("metric") in rows[0]  # a Brain-Score benchmark: a column of its own
    half = " (even half)" if "held_out" in chosen else " (all images)" if scored else ""
    for split, style in (("val", "o-"), ("val_clutter", "s--")):
        if f"{split}_top1" in rows[0]:
            line, = ax.plot(crops, [r[f"{split}_top1"] for r in rows], style, label=split + half)
            if "held_out" in chosen:
                ax.plot([chosen["crop"]], [chosen["held_out"][f"{split}_top1"]], "*", markersize=12,
                        color=line.get_color(), label=f"{split} at the chosen size, odd half")
    lines = []
    if scored:  # on an axis of its own
        twin = ax.twinx()
        lines = twin.plot(crops, [r[chosen["metric"]] for r in rows], "^-", color="tab:purple",
                          label=chosen["metric"])
        twin.set_ylabel("Brain-Score benchmark score")
    ax.axvline(chosen["crop"], color="tab:green", alpha=0.5,
               label=f"chosen by {chosen.get('metric', 'val')}: resize {chosen['resize']} / crop {chosen['crop']}")
    if train_crop is not None:
        ax.axvline(train_crop, color="gray", linestyle=":", label=f"training crop {train_crop}")
    ax.set(xlabel="test crop (px)", ylabel="top-1 (%)", title=title or "FixRes: accuracy against test size")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles + lines, labels + [line.get_label() for line in lines], fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def finetune(model: nn.Module, net: nn.Module, train_beton: Path, *, crop: int, resize: int,
             cfg: FixResFineTuneConfig, seed: int, device: torch.device, workers: int = 0,
             frozen: list[str] = (), show_progress: bool = True) -> None:
    """Train the classifier and the batch norms that are not frozen at the test size, everything
    else fixed. Crops cover at least (crop/resize)² of the image, so objects appear at about the
    size the test transform shows them."""
    from fasttricks.data.loader import TrainLoader, sample_indices
    from fasttricks.models.averaging import batch_norms
    from fasttricks.runtime.devices import autocast

    norms = batch_norms(net, frozen)
    saved = {n: p.requires_grad for n, p in net.named_parameters()}
    for p in net.parameters():
        p.requires_grad_(False)
    trainable = [*net.get_classifier().parameters(), *(p for m in norms for p in m.parameters())]
    for p in trainable:
        p.requires_grad_(True)
    # a subset just large enough for the steps: FFCV reads an epoch to its end, so a full
    # ImageNet epoch would be decoded for 300 steps
    indices = sample_indices(train_beton, cfg.steps * cfg.batch_size, seed)
    loader = TrainLoader(train_beton, batch_size=min(cfg.batch_size, len(indices)), resolution=crop, seed=seed,
                         device=device, workers=workers, scale=((crop / resize) ** 2, 1.0), indices=indices)
    optimizer = torch.optim.Adam(trainable, lr=cfg.lr)
    criterion = nn.CrossEntropyLoss()
    was_training = model.training
    model.eval()
    for m in norms:
        nn.Module.train(m, True)
    step, epoch = 0, 0
    try:
        with progress_bar(f"FixRes fine-tuning @{crop}px", cfg.steps, enabled=show_progress) as advance:
            while step < cfg.steps:
                for images, labels in loader.epoch(epoch, crop):
                    if step < cfg.steps:  # (a small set is read to the end of its last epoch)
                        with autocast(device):
                            loss = criterion(model(images), labels)
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        step += 1
                        advance(1)
                epoch += 1
    finally:
        for m in norms:
            nn.Module.train(m, False)
        model.train(was_training)
        for n, p in net.named_parameters():
            p.requires_grad_(saved[n])


def choose(model: nn.Module, loaders: dict[str, ValLoader], sizes: list[tuple[int, int]], *,
           metric: str = "val", held_out: bool = True, device: torch.device, out_dir: Path,
           train_crop: int | None, title: str, show_progress: bool = True, write: bool = True,
           score_size: Callable[[int, int], float] | None = None) -> tuple[list[dict], dict]:
    """Sweep, pick the size with the best ``metric``, write ``fixres.csv`` / ``fixres.png`` into
    ``out_dir`` (unless ``write`` is False: the other ranks of a run) and say which size won.
    Returns (curve, chosen row).

    A split's top-1 (``val``, ``val_clutter``): with ``held_out``, the curve and the choice use the
    even-numbered half of each split and the chosen size is then measured on the odd half
    (``chosen["held_out"]``): the maximum of a noisy curve overstates the accuracy at the size it picks.

    A Brain-Score benchmark (``brainscore:ID``): ``score_size(resize, crop)`` scores the model at
    each size and the benchmark's stimuli choose. No split takes part in the choice, so each split's
    top-1 is measured on all of its images; the benchmark score at the chosen size is the top of
    its own curve (Brain-Score's private benchmarks, scored on its servers, are the held-out figure)."""
    benchmark = benchmark_of(metric)
    if benchmark is not None and score_size is None:
        raise InputError(f"FixRes metric {metric}: scoring needs the model as a plugin; "
                         f"run `fasttricks fixres RUN --metric {metric}` on the trained model")
    split_half = held_out and benchmark is None
    pick, report = halves(loaders) if split_half else (loaders, None)
    rows = sweep(model, pick, sizes, device=device, show_progress=show_progress)
    if benchmark is not None:
        with progress_bar(f"Brain-Score {benchmark}", len(rows), enabled=show_progress) as advance:
            for row in rows:
                row[metric] = score_size(row["resize"], row["crop"])
                advance(1)
    chosen = dict(best(rows, metric if benchmark else f"{metric}_top1"), metric=metric,
                  chosen_on=f"benchmark {benchmark}" if benchmark else "even half" if split_half else "all images")
    if report is not None:
        for loader in report.values():
            loader.set_size(chosen["resize"], chosen["crop"])
        chosen["held_out"] = as_row(evaluate_splits(model, report, device))
    if write:
        write_curve(rows, chosen, out_dir, train_crop=train_crop, title=title)
    if show_progress:
        console.print(f"FixRes: best test size resize {chosen['resize']} / crop {chosen['crop']} by {metric} "
                      f"({_said(chosen, benchmark)}; {out_dir / PNG_NAME})")
    return rows, chosen


def _said(chosen: dict, benchmark: str | None) -> str:
    metric = chosen["metric"]
    if benchmark is not None:
        return (f"score {chosen[metric]:.4f}, the top of its curve; val top-1 on every image "
                f"{chosen['val_top1']:.2f}%")
    if "held_out" in chosen:
        return f"held-out half: {metric} top-1 {chosen['held_out'][f'{metric}_top1']:.2f}%"
    return f"{metric} top-1 {chosen[f'{metric}_top1']:.2f}%"


def choice(row: dict) -> dict:
    """What is recorded of the chosen size; ``score`` is a Brain-Score metric's value there."""
    keep = ("crop", "resize", "metric", "chosen_on", "val_top1", "val_clutter_top1", "held_out")
    scored = {"score": row[row["metric"]]} if row.get("metric") in row else {}
    return {**{k: row[k] for k in keep if k in row}, **scored}


def summary_fields(chosen: dict) -> dict:
    """What a run's ``summary.json`` records of the choice."""
    return {"fixres": choice(chosen), "test_crop": chosen["crop"], "test_resize": chosen["resize"]}


def test_size_info(info: dict, chosen: dict) -> dict:
    """The model's info with the test size set to ``chosen`` (what eval and export read), the
    training-time test size kept as ``train_val_crop`` / ``train_val_resize``."""
    return {"train_val_crop": info.get("train_val_crop", info["val_crop"]),
            "train_val_resize": info.get("train_val_resize", info["val_resize"]),
            "val_crop": chosen["crop"], "val_resize": chosen["resize"], "fixres": choice(chosen)}


def fixres_command(weights: Path, data_dir: Path, *, sizes: list[int | str] | None, batch_size: int,
                   device: torch.device, out_dir: Path | None = None, workers: int = 0, metric: str = "val",
                   held_out: bool = True) -> dict:
    """``fasttricks fixres``: sweep, write the curve beside the weights (or in ``out_dir``), and when
    the weights are a run's ``final.safetensors``, record the choice in its ``summary.json``. With
    ``brainscore:ID`` the model is exported and scored at each size (``RUN/brainscore/``); the
    benchmark is loaded before anything is measured, so a benchmark that cannot be loaded costs nothing."""
    from fasttricks.evaluation.evaluate import load_classifier
    from fasttricks.models.weights import check_data_fits, weights_file

    benchmark = benchmark_of(metric)
    weights = weights_file(weights)
    model, info = load_classifier(weights, device)
    check_data_fits(info, weights, data_dir)
    score_size = _benchmark_scorer(weights, benchmark) if benchmark else None
    train_crop = info.get("train_val_crop", info["val_crop"])
    train_resize = info.get("train_val_resize", info["val_resize"])
    loaders = val_loaders(data_dir, resize=train_resize, crop=train_crop, batch_size=batch_size, device=device,
                          workers=workers)
    out_dir = out_dir or weights.parent
    pairs = size_pairs(sizes or default_sizes(train_crop), train_crop / train_resize, patch_size(model.net))
    rows, chosen = choose(model, loaders, pairs, metric=metric, held_out=held_out, device=device, out_dir=out_dir,
                          train_crop=info.get("train_resolution"), title=f"FixRes: {weights.name}",
                          score_size=score_size)
    result = {"weights": str(weights), "best": chosen, "curve": rows, "csv": str(out_dir / CSV_NAME),
              "png": str(out_dir / PNG_NAME)}
    summary = weights.parent / "summary.json"
    if summary.is_file() and weights.name == "final.safetensors":  # a run's model: record the choice
        update_info(weights, test_size_info(info, chosen))
        data = json.loads(summary.read_text())
        # the val_* figures stay those measured at metrics_at; the chosen size's are under "fixres"
        data.setdefault("metrics_at", {"resize": data.get("test_resize"), "crop": data.get("test_crop")})
        data.update(summary_fields(chosen))
        write_json(summary, data)
        result["summary"] = str(summary)
    return result


def _benchmark_scorer(weights: Path, benchmark: str) -> Callable[[int, int], float]:
    """score(resize, crop) on a benchmark loaded once, through the exported plugin at that size."""
    from fasttricks.brainscore.local import load_benchmark, score

    loaded = load_benchmark(benchmark)
    return lambda resize, crop: score(weights, benchmark, size=(resize, crop), loaded=loaded)["score"]
