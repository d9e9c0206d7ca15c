"""FixRes (Touvron et al., "Fixing the train-test resolution discrepancy"): a network trained on
random-resized crops sees objects larger than a centre crop at the same size shows them, so its
best test size is larger than its training crop. We sweep test crops C with resize R = C / ratio
(the ratio of the training-time test transform, 240/272 in the paper), save the curve (the paper's
Figure 1) and pick the size with the best validation top-1.

The optional second step of FixRes fine-tunes only the classifier and the batch-norm layers at
the chosen size, on training images cropped so that objects appear at their test-time size.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch
from torch import nn

from fasttricks.atomic import atomic_path, write_json, write_text
from fasttricks.checkpoint import update_info
from fasttricks.data.loader import ValLoader
from fasttricks.evaluate import as_row, evaluate_splits, val_loaders
from fasttricks.progress import console, progress_bar
from fasttricks.recipes import FixResFineTuneConfig

CSV_NAME, PNG_NAME = "fixres.csv", "fixres.png"


def default_sizes(crop: int) -> list[int]:
    """Test crops from 0.8x to 1.75x the training test crop, on a grid of multiples of 8 (about 15
    points): 192, 208, ..., 416 for 240, a range that holds the paper's 288 and FixEfficientNet's 384."""
    step = max(8, 8 * round(crop / 15 / 8))
    start = max(8, 8 * round(0.8 * crop / 8))
    return list(range(start, int(1.75 * crop) + 1, step))


def sweep(model: nn.Module, loaders: dict[str, ValLoader], crops: list[int], *, ratio: float,
          device: torch.device, show_progress: bool = True) -> list[dict]:
    """Accuracy at each test crop (resize = round(crop / ratio)); one row per crop. The loaders
    are left at the last size."""
    if not 0 < ratio <= 1:
        raise ValueError(f"crop/resize ratio must lie in (0, 1], not {ratio}")
    rows = []
    with progress_bar("FixRes sweep", len(crops), enabled=show_progress) as advance:
        for crop in sorted(set(crops)):
            resize = round(crop / ratio)
            for loader in loaders.values():
                loader.set_size(resize, crop)
            rows.append({"crop": crop, "resize": resize, **as_row(evaluate_splits(model, loaders, device))})
            advance(1)
    return rows


def best(rows: list[dict], metric: str = "val_top1") -> dict:
    """The row with the highest ``metric``; on a tie, the smallest size (cheaper to run)."""
    return max(rows, key=lambda r: (r[metric], -r["crop"]))


def write_curve(rows: list[dict], chosen: dict, out_dir: Path, *, train_crop: int | None = None,
                title: str = "") -> tuple[Path, Path]:
    """``fixres.csv`` (one row per size) and ``fixres.png`` (top-1 against the test crop), atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
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
    for split, style in (("val", "o-"), ("val_clutter", "s--")):
        if f"{split}_top1" in rows[0]:
            ax.plot(crops, [r[f"{split}_top1"] for r in rows], style, label=split)
    ax.axvline(chosen["crop"], color="tab:green", alpha=0.5,
               label=f"best: crop {chosen['crop']} / resize {chosen['resize']}")
    if train_crop is not None:
        ax.axvline(train_crop, color="gray", linestyle=":", label=f"training crop {train_crop}")
    ax.set(xlabel="test crop (px)", ylabel="top-1 (%)", title=title or "FixRes: accuracy against test size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
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
    from fasttricks.averaging import batch_norms
    from fasttricks.data.loader import TrainLoader, sample_indices
    from fasttricks.devices import autocast

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


def choose(model: nn.Module, loaders: dict[str, ValLoader], crops: list[int], *, ratio: float,
           device: torch.device, out_dir: Path, train_crop: int | None, title: str,
           show_progress: bool = True, write: bool = True) -> tuple[list[dict], dict]:
    """Sweep, pick the best size, write ``fixres.csv`` / ``fixres.png`` into ``out_dir`` (unless
    ``write`` is False: the other ranks of a run) and say which size won; returns (curve, chosen row)."""
    rows = sweep(model, loaders, crops, ratio=ratio, device=device, show_progress=show_progress)
    chosen = best(rows)
    if write:
        write_curve(rows, chosen, out_dir, train_crop=train_crop, title=title)
    if show_progress:
        console.print(f"FixRes: best test size crop {chosen['crop']} / resize {chosen['resize']} "
                      f"(val top-1 {chosen['val_top1']:.2f}%; {out_dir / PNG_NAME})")
    return rows, chosen


def choice(row: dict) -> dict:
    return {k: row[k] for k in ("crop", "resize", "val_top1", "val_clutter_top1") if k in row}


def summary_fields(chosen: dict) -> dict:
    """What a run's ``summary.json`` records of the choice."""
    return {"fixres": choice(chosen), "test_crop": chosen["crop"], "test_resize": chosen["resize"]}


def test_size_info(info: dict, chosen: dict) -> dict:
    """The model's info with the test size set to ``chosen`` (what eval and export read), the
    training-time test size kept as ``train_val_crop`` / ``train_val_resize``."""
    return {"train_val_crop": info.get("train_val_crop", info["val_crop"]),
            "train_val_resize": info.get("train_val_resize", info["val_resize"]),
            "val_crop": chosen["crop"], "val_resize": chosen["resize"], "fixres": choice(chosen)}


def fixres_command(weights: Path, data_dir: Path, *, crops: list[int] | None, batch_size: int,
                   device: torch.device, out_dir: Path | None = None, workers: int = 0) -> dict:
    """``fasttricks fixres``: sweep, write the curve beside the weights (or in ``out_dir``), and when
    the weights are a run's ``final.safetensors``, record the choice in its ``summary.json``."""
    from fasttricks.evaluate import check_data_fits, load_classifier
    from fasttricks.models import weights_file

    weights = weights_file(weights)
    model, info = load_classifier(weights, device)
    check_data_fits(info, weights, data_dir)
    train_crop = info.get("train_val_crop", info["val_crop"])
    train_resize = info.get("train_val_resize", info["val_resize"])
    loaders = val_loaders(data_dir, resize=train_resize, crop=train_crop, batch_size=batch_size, device=device,
                          workers=workers)
    out_dir = out_dir or weights.parent
    rows, chosen = choose(model, loaders, crops or default_sizes(train_crop), ratio=train_crop / train_resize,
                          device=device, out_dir=out_dir, train_crop=info.get("train_resolution"),
                          title=f"FixRes: {weights.name}")
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
