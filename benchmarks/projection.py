"""Projected ImageNet training hours of `winner` and `winner-fast` from measured training-step rates,
with every term of the sum written out (results/projection-<machine>.json and the console).

The rates come from a `train_step_throughput.py` results file (default: the lent H100's, eager,
EfficientNet-B1 at 240, batch 192, loader-fed): PGD-k steps for k = 0, 1, 3 at one resolution.
From them:
- a PGD-k epoch at resolution r takes 1,281,167 / (rate_k × (R / r)²) seconds, R the measured
  resolution: the cost of a step taken as proportional to its pixels (an assumption: a GPU is
  less busy at small sizes, so the low-resolution epochs are if anything slower than this says);
- an N-FGSM step is taken at PGD-1's rate (the same two passes; N-FGSM also draws its noise and
  skips the projection);
- the behaviour stage at the plain step's rate with augmentation (rate_0 of the augmented file when
  given, else the plain one; its frozen first half makes the real step cheaper);
- the guard: each epoch of a guarded stage, PGD-10 on its images at the recipe's test crop, taken
  at 11/4 of a PGD-3 step's cost per image;
- left out: evaluation, averaging's BN recalibration, the FixRes sweep (minutes, in both recipes).

The measured alternative is `train_step_throughput.py --rows projection` on the GPU (in `make
bench-gpu`), which times each resolution of each recipe itself.

    python benchmarks/projection.py
    python benchmarks/projection.py --rates results/train_step_throughput-NVIDIA-H100-80GB-HBM3.json
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
GOALS = {"winner-fast": 7.0}  # hours (issue #23)


def measured_rates(path: Path) -> tuple[dict[int, float], int, str]:
    """PGD steps -> loader-fed images/s, the resolution they were measured at, and the machine."""
    report = json.loads(path.read_text())
    rates = {r["pgd_steps"]: r["images_per_s_loader_fed"] for r in report["results"] if "pgd_steps" in r
             and r.get("row", "pgd") == "pgd"}
    return rates, report["settings"]["res"], report["machine"].get("gpu") or report["machine"].get("machine")


def stage_terms(recipe_name: str, rates: dict[int, float], res_measured: int, behaviour_rate: float) -> list[dict]:
    """One term per (stage, resolution): epochs, the rate used and its seconds."""
    recipe, terms = load_recipe(recipe_name), []
    for stage in recipe.stages:
        adv = stage.adversarial
        if adv is None:
            kind, base = "behaviour (plain, augmented)", behaviour_rate
        elif adv.method == "n_fgsm":
            kind, base = "N-FGSM (at PGD-1's rate)", rates[1]
        else:
            kind, base = f"PGD-{adv.steps}", rates[adv.steps]
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
            rate = rates[3] * 4 / (adv.guard.steps + 1) * (res_measured / crop) ** 2
            terms.append({"stage": stage.name, "method": f"guard: PGD-{adv.guard.steps} on {adv.guard.images} images",
                          "res": crop, "epochs": stage.epochs, "images_per_s": round(rate, 1),
                          "hours": round(stage.epochs * adv.guard.images / rate / 3600, 3)})
    return terms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", type=Path, default=DEFAULT_RATES)
    p.add_argument("--augmented", type=Path, default=DEFAULT_AUGMENTED,
                   help="a results file measured with augmentation: its plain step's rate for the behaviour stage")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    rates, res, machine = measured_rates(a.rates)
    behaviour = measured_rates(a.augmented)[0][0] if a.augmented.is_file() else rates[0]
    report = {"question": "ImageNet training hours of winner and winner-fast from measured step rates",
              "rates_file": a.rates.name, "machine": machine, "measured_at_res": res,
              "rates_images_per_s": rates, "behaviour_images_per_s": behaviour, "images": IMAGENET_TRAIN,
              "excluded": "evaluation, averaging's BN recalibration, the FixRes sweep", "recipes": {}}
    for name in ("winner", "winner-fast"):
        terms = stage_terms(name, rates, res, behaviour)
        total = sum(t["hours"] for t in terms)
        report["recipes"][name] = {"terms": terms, "hours": round(total, 2), "goal_hours": GOALS.get(name)}
        print(f"{name}:")
        for t in terms:
            print(f"  {t['stage']:<13} {t['method']:<34} {t['res']:>3} px x{t['epochs']:>2} epochs at "
                  f"{t['images_per_s']:>7.1f} img/s = {t['hours']:6.3f} h")
        print(f"  total {total:.2f} h" + (f" (goal <= {GOALS[name]} h)" if name in GOALS else ""))
    fast, slow = (report["recipes"][n]["hours"] for n in ("winner-fast", "winner"))
    report["ratio_winner_fast_to_winner"] = round(fast / slow, 3)
    out = a.out or RESULTS / f"projection-{machine.replace(' ', '-')}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"winner-fast / winner = {fast / slow:.3f}; wrote {out}")


if __name__ == "__main__":
    main()
