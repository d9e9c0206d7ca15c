"""Projected ImageNet training hours of `winner`, `winner-fast` and `winner-pretrained` from measured
training-step rates, with every term of the sum written out (results/projection-<machine>.json and
the console).

The rates come from a `train_step_throughput.py` results file: its ``step`` rows (plain, PGD-3 and
N-FGSM steps at one resolution, eager and compiled: what `make bench-gpu` measures), or, in files
from before those rows (the lent H100's of 2026-11-22, eager, EfficientNet-B1 at 240, batch 192,
the default), its ``pgd`` rows for k = 0, 1, 3. From them:
- a step at resolution r costs its pixels: rate(r) = rate(R) × (R / r)², R the measured resolution
  (an assumption: a GPU is less busy at small sizes, so the low-resolution epochs are if anything
  slower than this says);
- PGD-k for a k not measured: PGD-3's rate × 4 / (k + 1) (k + 1 forward-backward passes);
  N-FGSM, in the older files: PGD-1's rate (the same two passes; N-FGSM also draws its noise);
- the adversarial stages' rates times the loader saturation of the robust stage (the ``pgd`` row
  at k = 3, fed and augmented against synthetic), when the file has it;
- the behaviour stage: the plain step's rate times the behaviour row's saturation (its loader,
  heavy augmentation and Foreground-CutMix), or the augmented file's plain loader-fed rate in the
  older files; its frozen first half makes the real step cheaper than this;
- the guard: each epoch of a guarded stage, PGD-10 on its images at the recipe's test crop;
- left out: evaluation, averaging's BN recalibration, the FixRes sweep (minutes, in each recipe).

`winner-convnext` and `winner-vit` (#35) are projected from their own model's rates, the file's
``backbone_step`` rows (plain and PGD-3, eager, at the recipe's full size: `make bench-gpu`
measures them). Until a file has them, from an estimate, said in every term: the model's forward
FLOPs at that size (counted by torch's FlopCounterMode on the meta device), a plain step at 3x them
and a PGD-3 step at 9x (each attack step a forward and an input-gradient backward), run at an
assumed 35% of an H100's dense bf16 peak (989 TFLOP/s); the behaviour stage at the plain rate.

    python benchmarks/projection.py
    python benchmarks/projection.py --rates results/train_step_throughput-NVIDIA-H200.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fasttricks.recipes import load_recipe
from fasttricks.recipes.schedules import resolution_at

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS  # noqa: E402

IMAGENET_TRAIN = 1_281_167
DEFAULT_RATES = RESULTS / "train_step_throughput-NVIDIA-H100-80GB-HBM3.json"
DEFAULT_AUGMENTED = RESULTS / "train_step_throughput-NVIDIA-H100-80GB-HBM3-augmented.json"
RECIPES = ("winner", "winner-fast", "winner-pretrained")
GOALS = {"winner": 10.0, "winner-fast": 7.0, "winner-pretrained": 5.0}  # hours on one H100 (#13, #23, #31)
BACKBONE_RECIPES = ("winner-convnext", "winner-vit")  # #35: projected from their own model's rates
PEAK_FLOPS, ASSUMED_MFU = 989e12, 0.35  # H100 SXM dense bf16; the share of it assumed until measured


def backbone_rates(report: dict, name: str) -> tuple[dict, int, str]:
    """(rates, the resolution they hold at, where they come from) for a BACKBONE_RECIPES recipe."""
    recipe = load_recipe(name)
    rows = {r["method"]: r for r in report["results"]
            if r.get("row") == "backbone_step" and r.get("recipe") == name and r.get("arch") == recipe.model.arch}
    if {"plain", "pgd-3"} <= rows.keys():
        plain, pgd3 = rows["plain"]["images_per_s"], rows["pgd-3"]["images_per_s"]
        return ({"plain": plain, "pgd-3": pgd3, "saturation": 1.0, "behaviour": plain}, rows["plain"]["res"],
                f"measured ({recipe.model.arch}, eager)")
    res = recipe.stages[0].resolution.max
    flops = forward_flops(recipe.model.arch, res)
    plain, pgd3 = ASSUMED_MFU * PEAK_FLOPS / (3 * flops), ASSUMED_MFU * PEAK_FLOPS / (9 * flops)
    return ({"plain": plain, "pgd-3": pgd3, "saturation": 1.0, "behaviour": plain}, res,
            f"estimated: {flops / 1e9:.1f} GFLOP forward at {res} px, {ASSUMED_MFU:.0%} of {PEAK_FLOPS / 1e12:.0f} "
            f"TFLOP/s (not measured yet)")


def forward_flops(arch: str, res: int) -> float:
    """FLOPs of one image's forward pass, counted on the meta device (no weights, no time)."""
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fasttricks.models.factory import with_any_image_size

    with torch.device("meta"):
        net = with_any_image_size(lambda **size: timm.create_model(arch, **size))  # a ViT at the recipe's size
        with FlopCounterMode(display=False) as counter:
            net(torch.empty(1, 3, res, res))
    return float(counter.get_total_flops())


def step_rates(report: dict, augmented: dict | None = None) -> dict[str, dict]:
    """{mode: {"plain", "pgd-3", "n-fgsm", "behaviour", "saturation"}} in images/s at the measured
    resolution, from either format of a train_step_throughput results file."""
    rows = report["results"]
    steps = [r for r in rows if r.get("row") == "step"]
    pgd3 = next((r for r in rows if r.get("row") == "pgd" and r.get("pgd_steps") == 3 and "saturation" in r), None)
    behaviour = next((r for r in rows if r.get("row") == "behaviour"), None)
    if steps:
        out = {}
        for mode in sorted({r["mode"] for r in steps}):
            rates = {r["method"]: r["images_per_s"] for r in steps if r["mode"] == mode}
            if {"plain", "pgd-3", "n-fgsm"} <= rates.keys():
                out[mode] = {**rates, "saturation": pgd3["saturation"] if pgd3 else 1.0,
                             "behaviour": rates["plain"] * (behaviour["saturation"] if behaviour else 1.0)}
        return out
    # before the step rows: loader-fed PGD-k rates, eager
    pgd = {r["pgd_steps"]: r["images_per_s_loader_fed"] for r in rows
           if "pgd_steps" in r and r.get("row", "pgd") == "pgd"}
    plain_augmented = augmented and next(r["images_per_s_loader_fed"] for r in augmented["results"]
                                         if r.get("pgd_steps") == 0)
    return {"eager": {"plain": pgd[0], "pgd-3": pgd[3], "n-fgsm": pgd[1], "saturation": 1.0,
                      "behaviour": plain_augmented or pgd[0]}}


def measured_res(report: dict) -> int:
    step = next((r for r in report["results"] if r.get("row") == "step"), None)
    return step["res"] if step else report["settings"]["res"]


def stage_terms(recipe_name: str, rates: dict, res_measured: int) -> list[dict]:
    """One term per (stage, resolution): epochs, the rate used and its hours."""
    recipe, terms = load_recipe(recipe_name), []
    for stage in recipe.stages:
        adv = stage.adversarial
        if adv is None:
            kind, base = "behaviour (plain step x its saturation)", rates["behaviour"]
        elif adv.method == "n_fgsm":
            kind, base = "N-FGSM", rates["n-fgsm"] * rates["saturation"]
        else:
            kind, base = f"PGD-{adv.steps}", rates["pgd-3"] * 4 / (adv.steps + 1) * rates["saturation"]
        epochs_at: dict[int, int] = {}
        for e in range(stage.epochs):
            res = resolution_at(stage.resolution, e)
            epochs_at[res] = epochs_at.get(res, 0) + 1
        for res, n in sorted(epochs_at.items()):
            rate = base * (res_measured / res) ** 2 if adv is not None else base
            terms.append({"stage": stage.name, "method": kind, "res": res, "epochs": n, "images_per_s": round(rate, 1),
                          "hours": round(n * IMAGENET_TRAIN / rate / 3600, 3)})
        if adv is not None and adv.guard is not None:
            crop = recipe.data.val_crop
            rate = rates["pgd-3"] * 4 / (adv.guard.steps + 1) * (res_measured / crop) ** 2
            terms.append({"stage": stage.name, "method": f"guard: PGD-{adv.guard.steps} on {adv.guard.images} images",
                          "res": crop, "epochs": stage.epochs, "images_per_s": round(rate, 1),
                          "hours": round(stage.epochs * adv.guard.images / rate / 3600, 3)})
    return terms


def project(report: dict, augmented: dict | None = None) -> dict:
    """{mode: {recipe: {"terms", "hours", "goal_hours"}}} for every mode the file measured."""
    res = measured_res(report)
    out = {mode: {name: {"terms": (terms := stage_terms(name, rates, res)),
                         "hours": round(sum(t["hours"] for t in terms), 2), "goal_hours": GOALS.get(name)}
                  for name in RECIPES}
           for mode, rates in step_rates(report, augmented).items()}
    for name in BACKBONE_RECIPES:  # eager rates (measured or estimated), beside the others' eager ones
        rates, at, source = backbone_rates(report, name)
        terms = [{**t, "source": source} for t in stage_terms(name, rates, at)]
        out.setdefault("eager", {})[name] = {"terms": terms, "hours": round(sum(t["hours"] for t in terms), 2),
                                             "goal_hours": None, "source": source}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", type=Path, default=DEFAULT_RATES)
    p.add_argument("--augmented", type=Path, default=None,
                   help="older files: one measured with augmentation, its plain step's rate for the behaviour "
                        "stage (default: the H100's beside the default --rates)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    if not a.rates.is_file():
        p.error(f"--rates {a.rates}: no such file (a train_step_throughput.py results file)")
    report = json.loads(a.rates.read_text())
    augmented_path = a.augmented or (DEFAULT_AUGMENTED if a.rates == DEFAULT_RATES else None)
    augmented = json.loads(augmented_path.read_text()) if augmented_path and augmented_path.is_file() else None
    machine = report["machine"].get("gpu") or report["machine"].get("machine") or report["machine"].get("device")
    projected = project(report, augmented)
    for mode, recipes in projected.items():
        for name, r in recipes.items():
            print(f"{name} ({mode} rates):")
            for t in r["terms"]:
                print(f"  {t['stage']:<16} {t['method']:<40} {t['res']:>3} px x{t['epochs']:>2} epochs at "
                      f"{t['images_per_s']:>7.1f} img/s = {t['hours']:6.3f} h")
            goal = r["goal_hours"]
            print(f"  total {r['hours']:.2f} h" + (f" (goal <= {goal} h: {'met' if r['hours'] <= goal else 'MISSED'})"
                                                   if goal else ""))
    out = a.out or RESULTS / f"projection-{str(machine).replace(' ', '-')}.json"
    out.write_text(json.dumps({"question": "ImageNet training hours of each recipe from measured step rates",
                               "rates_file": a.rates.name, "machine": machine, "measured_at_res": measured_res(report),
                               "rates_images_per_s": step_rates(report, augmented), "images": IMAGENET_TRAIN,
                               "excluded": "evaluation, averaging's BN recalibration, the FixRes sweep",
                               "projection": projected}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
