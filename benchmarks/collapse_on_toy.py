"""Does one-step adversarial training collapse on the toy set, and does the guard catch it?

Catastrophic overfitting (Wong et al. 2020): FGSM training with a step well above ε, or without a
random start, can lose its robustness within an epoch; robust accuracy under PGD falls to near
zero while clean accuracy goes on rising. This script trains the toy set (pipelines/fast-at's toy
override, 12 epochs) with such settings twice: once with a guard that only watches (PGD-10 on 256
training images each epoch, a drop of 1.0, which never acts) and once with the guard's default drop
of 20 points. It reports per epoch the guard's reading and whether the guard fell back to PGD-3;
the final models' robust top-1 under PGD-10 on val says what the fall-back kept.

    python benchmarks/collapse_on_toy.py                          # FGSM, no start, step 2·ε, at 4/255
    python benchmarks/collapse_on_toy.py --eps 8/255 --step 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from fasttricks.atomic import write_json
from fasttricks.data.sources import resolve_data
from fasttricks.recipes import PIPELINES, load_recipe
from fasttricks.runs.folder import read_metrics
from fasttricks.training.loop import train

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, machine_tag  # noqa: E402


def run(eps: str, step: float, random_start: bool, guarded: bool, out: Path) -> dict:
    """One toy run of fast-at's FGSM-RS row with its attack replaced: one step of ``step``·ε. The
    guard measures every epoch in both runs; unguarded, it cannot act (a drop of 1.0)."""
    num, _, den = eps.partition("/")
    eps_value = float(num) / float(den or 1)
    guard = "{images: 256}" if guarded else "{images: 256, drop: 1.0}"
    attack = (f"stages.0.adversarial={{method: pgd, eps: {eps_value!r}, steps: 1, step_size: {step * eps_value!r}, "
              f"random_start: {str(random_start).lower()}, guard: {guard}}}")
    evaluation = (f"evaluation={{attack: {{eps: {eps_value!r}, step_size: {eps_value / 4!r}, steps: 10}}, "
                  "autoattack: null}")
    recipe = load_recipe("fast-at/2-fgsm-rs", [PIPELINES / "overrides" / "toy-fast-at.yaml"], [attack, evaluation])
    summary = train(recipe, resolve_data("toy"), out, show_progress=False)
    rows = read_metrics(out)
    return {"guarded": guarded, "epochs": [{k: r.get(k) for k in ("epoch", "guard", "guard_robust_top1", "val_top1")}
                                           for r in rows],
            "fell_back_at_epoch": (summary.get("guard") or {}).get("0", {}).get("fell_back_at_epoch"),
            "val_top1": summary["val_top1"], "val_robust_top1": summary["val_robust_top1"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eps", default="4/255")
    p.add_argument("--step", type=float, default=2.0, help="the FGSM step in units of eps")
    p.add_argument("--random-start", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    import torch

    results = []
    with tempfile.TemporaryDirectory(prefix="fasttricks-collapse-") as tmp:
        for guarded in (False, True):
            results.append(run(a.eps, a.step, a.random_start, guarded, Path(tmp) / f"guarded-{guarded}"))
            print(json.dumps(results[-1]), flush=True)
    report = {"question": "does one-step training collapse on the toy set, and does the guard catch it?",
              "settings": {"eps": a.eps, "step_in_eps": a.step, "random_start": a.random_start,
                           "recipe": "fast-at/2-fgsm-rs with overrides/toy-fast-at.yaml, attack replaced"},
              "runs": results, "machine": machine(torch.device("cpu"))}
    tag = f"eps{a.eps.replace('/', '-')}-step{a.step:g}" + ("-rs" if a.random_start else "")
    out = a.out or RESULTS / f"collapse_on_toy-{tag}-{machine_tag(torch.device('cpu'))}.json"
    write_json(out, report)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
