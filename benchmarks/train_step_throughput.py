"""Training-step speed: how busy the input pipeline keeps the device, what torch.compile buys the
PGD step, the winner's behaviour stage as it runs, and the winner recipe's projected wall-clock on
ImageNet. All figures in one process, each a ratio against a baseline measured beside it.

Rows (``--rows``, comma-separated):
- ``pgd``: k = --pgd-steps PGD steps, (a) fed by the real FFCV loader + heavy augmentation and
  Foreground-CutMix on the device (--no-augment: loader only) against (b) one synthetic batch
  already on the device. (a)/(b) is the saturation: 1.0 means the input pipeline is free.
- ``steps``: plain, PGD-3 and N-FGSM training steps on one synthetic batch, each eager and then
  compiled (the figures ``make bench-gpu`` sets against its goals and projects recipes from).
- ``compile``: PGD-3 on the synthetic batch, eager against torch.compile.
- ``behaviour``: the winner recipe's second stage as it runs (first half frozen, Adam, heavy
  augmentation + Foreground-CutMix, its resolution and batch, bf16 autocast on CUDA): fed +
  augmented against the same step on a synthetic batch.
- ``projection``: images/s of each adversarial stage of ``winner`` and ``winner-fast`` at each
  resolution of its ramp, with its own attack (PGD-3, N-FGSM; synthetic batch, times the ``pgd``
  row's saturation when measured), a guarded stage's PGD-10 check at the test crop, the behaviour
  row's fed rate, and from them the hours of each recipe on ImageNet's 1,281,167 images (one row
  each). Training steps only: evaluation, averaging and the FixRes sweep are left out.
  ``projection.py`` makes the same sum from rates measured at one resolution.

Method: per setting a warm-up (compilation, cudnn autotuning), then --steps timed steps, the
device synchronised inside the timed region. Defaults: EfficientNet-B1 on CUDA with the model
compiled (as ``model.compile`` does there); timm's tiny test_efficientnet at 64 px on the CPU,
eager (the figures there only show that it runs).

    python benchmarks/train_step_throughput.py
    python benchmarks/train_step_throughput.py --rows compile,behaviour --steps 20
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from fasttricks.augment import augment_and_mix
from fasttricks.augment.heavy import HeavyAugmentation, seeded
from fasttricks.data.beton import BetonOptions, build_beton
from fasttricks.data.loader import TrainLoader
from fasttricks.models import freezing
from fasttricks.models.factory import create_model
from fasttricks.recipes import AdversarialConfig, ModelConfig, OptimizerConfig, StageConfig, load_recipe
from fasttricks.recipes.schedules import resolution_at
from fasttricks.runtime.devices import compile_enabled
from fasttricks.training.step import create_optimizer, training_step

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, machine_tag, make_jpeg_folder, timed  # noqa: E402

IMAGENET_TRAIN = 1_281_167
ROWS = ("steps", "steps_eager", "steps_compiled", "backbones", "pgd", "one_step", "compile", "behaviour", "projection")
# issue #35: the recipes on the backbones that lead Brain-Score in 2026, and the tiny timm model of
# each family that stands in for them off a GPU
BACKBONES = {"winner-convnext": "test_convnext", "winner-vit": "test_vit"}


def parse_args(cuda: bool) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help=f"which rows, of {', '.join(ROWS)}")
    p.add_argument("--arch", default="efficientnet_b1" if cuda else "test_efficientnet")
    p.add_argument("--res", type=int, default=240 if cuda else 64, help="resolution of the pgd and compile rows")
    p.add_argument("--batch-size", type=int, default=256 if cuda else 32, help="of the pgd and compile rows")
    p.add_argument("--pgd-steps", default="0,1,3,7")
    p.add_argument("--steps", type=int, default=30 if cuda else 6, help="timed steps per setting and path")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, cudnn autotuning)")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="heavy augmentation + Foreground-CutMix in the fed path of the pgd rows")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the model in the pgd, behaviour and projection rows; auto: on CUDA")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile's backend; aot_eager traces as inductor does without generating code "
                        "(the CPU rehearsal of the GPU suite: it checks the graphs, not their speed)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--backbone-batch", type=int, default=128 if cuda else 8, help="of the backbones rows")
    p.add_argument("--backbone-steps", type=int, default=None, help="timed steps of the backbones rows (--steps)")
    p.add_argument("--backbone-warmup", type=int, default=None, help="their warm-up steps (--warmup)")
    p.add_argument("--backbone-res", type=int, default=None,
                   help="of the backbones rows; default: each recipe's full training size (CUDA), --res (CPU)")
    p.add_argument("--append", action="store_true", help="keep the rows --out already holds, add these")
    args = p.parse_args()
    unknown = set(args.rows.split(",")) - set(ROWS)
    if unknown:
        p.error(f"--rows: unknown {sorted(unknown)}; choose from {', '.join(ROWS)}")
    return args


class Bench:
    """The model, the data and the timing shared by the rows."""

    def __init__(self, args: argparse.Namespace, device: torch.device, tmp: Path):
        self.args, self.device, self.tmp = args, device, tmp
        torch.manual_seed(0)
        self.model = create_model(ModelConfig(arch=args.arch), 1000).to(device).to(memory_format=torch.channels_last)
        self.compile = compile_enabled({"auto": None, "on": True, "off": False}[args.compile], device)
        self.compiled = self.compiled_twin() if self.compile else self.model
        self.criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
        self.betons: dict[int, Path] = {}
        self.epoch = 0

    def compiled_twin(self) -> nn.Module:
        return torch.compile(self.model, backend=self.args.compile_backend)

    def heavy(self, cfg) -> nn.Module:
        """The heavy augmentation, compiled when the model is (as train does)."""
        augment = HeavyAugmentation(cfg).to(self.device)
        return augment.compiled(self.args.compile_backend) if self.compile else augment

    def synthetic(self, batch: int, res: int):
        return (torch.rand(batch, 3, res, res, device=self.device).contiguous(memory_format=torch.channels_last),
                torch.randint(0, 1000, (batch,), device=self.device))

    def loader(self, batch: int, res: int) -> TrainLoader:
        """A beton of photo-like JPEGs stored at 1.2x ``res``, enough for one timed pass."""
        n = batch * (self.args.steps + self.args.warmup + 3)
        if res not in self.betons:
            t = time.perf_counter()
            folder = make_jpeg_folder(self.tmp / f"images{res}", n, int(res * 1.2))
            self.betons[res] = self.tmp / f"train{res}.beton"
            build_beton(folder, self.betons[res], BetonOptions(write_mode="jpg", workers=self.args.workers),
                        show_progress=False)
            print(f"prepared {n} images at {int(res * 1.2)} px in {time.perf_counter() - t:.0f} s", flush=True)
        return TrainLoader(self.betons[res], batch_size=batch, resolution=res, seed=0, device=self.device,
                           workers=self.args.workers)

    def rate(self, model, stage: StageConfig, batches, *, tricks: StageConfig | None = None,
             heavy: nn.Module | None = None, optimizer=None, steps: int | None = None,
             warmup: int | None = None) -> float:
        """Images/s of ``--steps`` training steps on ``batches`` after ``--warmup`` untimed ones."""
        optimizer = optimizer or create_optimizer(self.model, stage.optimizer)

        def run(n: int) -> int:
            seen = 0
            for step, (images, labels) in enumerate(itertools.islice(batches, n)):
                targets = labels
                if tricks is not None:
                    with seeded(step, self.device):
                        images, targets = augment_and_mix(images, labels, tricks, heavy, 1000)
                training_step(model, images, targets, optimizer, self.criterion, stage, attack_model=model)
                seen += labels.shape[0]
            return seen

        run(self.args.warmup if warmup is None else warmup)
        return timed(lambda: run(self.args.steps if steps is None else steps), self.device)

    def fed(self, batch: int, res: int):
        self.epoch += 1
        return self.loader(batch, res).epoch(self.epoch, res)


def pgd_stage(k: int) -> StageConfig:
    adv = AdversarialConfig(norm="linf", eps=8 / 255, step_size=2.5 * 8 / 255 / max(k, 1), steps=k) if k else None
    return StageConfig(optimizer=OptimizerConfig(name="sgd", lr=0.01), adversarial=adv)


def pgd_rows(b: Bench) -> list[dict]:
    a, rows = b.args, []
    winner = load_recipe("winner").stages[1]
    tricks = StageConfig(augment=winner.augment, mixing=winner.mixing)
    heavy = b.heavy(tricks.augment) if a.augment else None
    for k in map(int, a.pgd_steps.split(",")):
        stage = pgd_stage(k)
        synth = b.rate(b.compiled, stage, itertools.repeat(b.synthetic(a.batch_size, a.res)))
        fed = b.rate(b.compiled, stage, b.fed(a.batch_size, a.res), tricks=tricks if a.augment else None, heavy=heavy)
        rows.append({"row": "pgd", "pgd_steps": k, "compiled": b.compile, "images_per_s_loader_fed": round(fed, 1),
                     "images_per_s_synthetic": round(synth, 1), "saturation": round(fed / synth, 3)})
        print(rows[-1], flush=True)
    return rows


ONE_STEP = {"pgd-3": AdversarialConfig(eps=8 / 255, steps=3),  # the baseline the one-step methods divide
            "fgsm-rs": AdversarialConfig(eps=8 / 255, steps=1),  # Wong et al.: step 1.25·eps by the rule
            "n-fgsm": AdversarialConfig(method="n_fgsm", eps=8 / 255)}  # de Jorge et al.: noise ±2·eps, step eps


def one_step_rows(b: Bench) -> list[dict]:
    """PGD-3, FGSM-RS and N-FGSM training steps on one synthetic batch, each as a ratio of PGD-3's
    time measured in the same process (the robust stage's cost per epoch, loader aside)."""
    a, rows = b.args, []
    batch = itertools.repeat(b.synthetic(a.batch_size, a.res))
    rates = {name: b.rate(b.compiled, StageConfig(optimizer=OptimizerConfig(name="sgd", lr=0.01), adversarial=adv),
                          batch) for name, adv in ONE_STEP.items()}
    for name, rate in rates.items():
        rows.append({"row": f"one_step_{name}", "method": name, "compiled": b.compile, "res": a.res,
                     "images_per_s": round(rate, 1), "time_vs_pgd3": round(rates["pgd-3"] / rate, 3)})
        print(rows[-1], flush=True)
    return rows


STEP_METHODS = {"plain": None, "pgd-3": ONE_STEP["pgd-3"], "n-fgsm": ONE_STEP["n-fgsm"]}


def step_rows(b: Bench, save, modes: tuple[str, ...] = ("eager", "compiled")) -> None:
    """Each of STEP_METHODS on one synthetic batch, eager then compiled: one row each, saved as it
    ends (eager first: a time limit reached while compiling still leaves every eager figure)."""
    a = b.args
    batch = itertools.repeat(b.synthetic(a.batch_size, a.res))
    models = {"eager": lambda: b.model, "compiled": lambda: b.compiled if b.compile else b.compiled_twin()}
    for mode in modes:
        model = models[mode]()
        for method, adv in STEP_METHODS.items():
            stage = StageConfig(optimizer=OptimizerConfig(name="sgd", lr=0.01), adversarial=adv)
            tic = time.perf_counter()
            rate = b.rate(model, stage, batch)
            # the whole call, warm-up (and compilation) included: the GPU suite's budgets read it
            row = {"row": "step", "method": method, "mode": mode, "arch": a.arch, "res": a.res,
                   "batch_size": a.batch_size, "images_per_s": round(rate, 1),
                   "seconds_with_warmup": round(time.perf_counter() - tic, 1)}
            if mode == "compiled":
                row["compile_backend"] = a.compile_backend
            print(row, flush=True)
            save(row)


def backbone_rows(b: Bench, save) -> None:
    """Plain and PGD-3 training steps, eager, of each BACKBONES recipe's model (the recipe's own on
    CUDA, its family's tiny stand-in elsewhere) at its full training size: the rates projection.py
    projects those recipes with. A row each, saved as it ends; each model freed before the next."""
    a = b.args
    for name, tiny in BACKBONES.items():
        recipe = load_recipe(name)
        arch = recipe.model.arch if b.device.type == "cuda" else tiny
        res = a.backbone_res or (recipe.stages[0].resolution.max if b.device.type == "cuda" else a.res)
        model = create_model(ModelConfig(arch=arch), 1000).to(b.device).to(memory_format=torch.channels_last)
        batch = itertools.repeat(b.synthetic(a.backbone_batch, res))
        for method in ("plain", "pgd-3"):
            stage = StageConfig(optimizer=OptimizerConfig(name="adamw", lr=1e-5), adversarial=STEP_METHODS[method])
            tic = time.perf_counter()
            rate = b.rate(model, stage, batch, optimizer=create_optimizer(model, stage.optimizer),
                          steps=a.backbone_steps, warmup=a.backbone_warmup)
            row = {"row": "backbone_step", "recipe": name, "arch": arch, "method": method, "mode": "eager",
                   "res": res, "batch_size": a.backbone_batch, "images_per_s": round(rate, 1),
                   "seconds_with_warmup": round(time.perf_counter() - tic, 1)}
            print(row, flush=True)
            save(row)
        del model, batch
        if b.device.type == "cuda":
            torch.cuda.empty_cache()


def compile_row(b: Bench) -> dict:
    a = b.args
    batch = itertools.repeat(b.synthetic(a.batch_size, a.res))
    compiled = b.compiled if b.compile else b.compiled_twin()
    eager = b.rate(b.model, pgd_stage(3), batch)
    fast = b.rate(compiled, pgd_stage(3), batch)
    row = {"row": "compile", "pgd_steps": 3, "res": a.res, "images_per_s_eager": round(eager, 1),
           "images_per_s_compiled": round(fast, 1), "speed-up": round(fast / eager, 3)}
    print(row, flush=True)
    return row


def behaviour_row(b: Bench) -> dict:
    """Freezes the shared model's first half: run it last."""
    stage = load_recipe("winner").stages[1]
    cuda = b.device.type == "cuda"  # the recipe's own sizes on a GPU, the row's on the CPU
    res, batch = (resolution_at(stage.resolution, 0), stage.batch_size) if cuda else (b.args.res, b.args.batch_size)
    freezing.freeze(b.model.net, freezing.resolve(b.model.net, stage.freeze))
    heavy = b.heavy(stage.augment)
    optimizer = create_optimizer(b.model, stage.optimizer)
    synth = b.rate(b.compiled, stage, itertools.repeat(b.synthetic(batch, res)), optimizer=optimizer)
    fed = b.rate(b.compiled, stage, b.fed(batch, res), tricks=stage, heavy=heavy, optimizer=optimizer)
    row = {"row": "behaviour", "res": res, "batch_size": batch, "compiled": b.compile,
           "frozen_modules": len(freezing.resolve(b.model.net, stage.freeze)), "optimizer": stage.optimizer.name,
           "images_per_s_synthetic_no_augmentation": round(synth, 1),
           "images_per_s_loader_fed_augmented": round(fed, 1), "saturation": round(fed / synth, 3)}
    print(row, flush=True)
    return row


PROJECTED = ("winner", "winner-fast")  # issue #23: winner-fast's goal is <= 7 h on one H100


def stage_rates(b: Bench, rows: list[dict]) -> dict:
    """Images/s of each adversarial stage of the projected recipes at each resolution of its ramp,
    with the stage's own attack (synthetic batch, times the pgd row's saturation at PGD-3 when that
    row ran); and the guard's PGD-10 at the test crop. Before the behaviour row freezes the model."""
    pgd = next((r for r in rows if r.get("row") == "pgd" and r["pgd_steps"] == 3), None)
    saturation = pgd["saturation"] if pgd else 1.0
    rates: dict[str, dict] = {}
    for name in PROJECTED:
        recipe = load_recipe(name)
        for i, stage in enumerate(recipe.stages):
            if stage.adversarial is None:
                continue
            batch_size = stage.batch_size if b.device.type == "cuda" else b.args.batch_size
            key = f"{name}/{i}"
            rates[key] = {}
            for res in sorted({resolution_at(stage.resolution, e) for e in range(stage.epochs)}):
                batch = itertools.repeat(b.synthetic(batch_size, res))
                rates[key][res] = round(b.rate(b.compiled, stage, batch) * saturation, 1)
                print(f"  {name} stage {i} at {res} px: {rates[key][res]:.0f} img/s", flush=True)
            guard = stage.adversarial.guard
            if guard is not None:
                check = stage.model_copy(update={"adversarial": AdversarialConfig(eps=stage.adversarial.eps,
                                                                                  steps=guard.steps)})
                crop = recipe.data.val_crop
                # a PGD-10 training step stands in for the guard's PGD-10 measurement (one more backward)
                batch = itertools.repeat(b.synthetic(batch_size, crop))
                rates[f"{key}/guard"] = round(b.rate(b.compiled, check, batch), 1)
    return {"rates": rates, "saturation": saturation}


def projection_rows(measured: dict, behaviour: dict, compiled: bool) -> list[dict]:
    """Hours of each projected recipe's training steps on ImageNet, term by term."""
    rows = []
    for name in PROJECTED:
        recipe, terms = load_recipe(name), []
        for i, stage in enumerate(recipe.stages):
            key = f"{name}/{i}"
            if stage.adversarial is None:  # the behaviour stage, as the behaviour row ran it
                terms.append({"stage": stage.name, "epochs": stage.epochs,
                              "images_per_s": behaviour["images_per_s_loader_fed_augmented"]})
                continue
            for e in range(stage.epochs):
                res = resolution_at(stage.resolution, e)
                rate = measured["rates"][key][res]
                terms.append({"stage": stage.name, "epochs": 1, "res": res, "images_per_s": rate})
            guard = stage.adversarial.guard
            if guard is not None:
                terms.append({"stage": f"{stage.name} guard", "epochs": stage.epochs, "images": guard.images,
                              "images_per_s": measured["rates"][f"{key}/guard"]})
        seconds = sum(t["epochs"] * t.get("images", IMAGENET_TRAIN) / t["images_per_s"] for t in terms)
        row = {"row": "projection", "recipe": name, "images": IMAGENET_TRAIN, "compiled": compiled,
               "stage_images_per_s_by_res": {k: v for k, v in measured["rates"].items() if k.startswith(name + "/")},
               "saturation_applied": measured["saturation"],
               "behaviour_images_per_s": behaviour["images_per_s_loader_fed_augmented"],
               "hours": round(seconds / 3600, 2),
               "excluded": "evaluation, averaging (BN recalibration) and the FixRes sweep"}
        print(row, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    cuda = torch.cuda.is_available()
    args = parse_args(cuda)
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
    wanted = args.rows.split(",")
    out = args.out or RESULTS / f"train_step_throughput-{machine_tag(device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    # --append: the rows of earlier calls stay (the GPU suite measures in several processes, one file)
    rows: list[dict] = json.loads(out.read_text())["results"] if args.append and out.is_file() else []

    def save(row: dict | list[dict]) -> None:
        """After every row: a run stopped at a time limit keeps what it measured."""
        rows.extend(row if isinstance(row, list) else [row])
        report = {"question": "training-step images/s: loader-fed vs synthetic, eager vs compiled, the winner's "
                              "behaviour stage, and the winner recipe projected onto ImageNet",
                  "settings": {k: v for k, v in vars(args).items() if k != "out"}, "results": rows,
                  "machine": machine(device)}
        out.write_text(json.dumps(report, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="fasttricks-bench-") as tmp:
        b = Bench(args, device, Path(tmp))
        if "steps" in wanted:
            step_rows(b, save)
        for mode in ("eager", "compiled"):
            if f"steps_{mode}" in wanted:
                step_rows(b, save, (mode,))
        if "backbones" in wanted:
            backbone_rows(b, save)
        if "compile" in wanted:
            save(compile_row(b))
        if "pgd" in wanted:
            save(pgd_rows(b))
        if "one_step" in wanted:
            save(one_step_rows(b))
        measured = stage_rates(b, rows) if "projection" in wanted else None
        if "behaviour" in wanted or measured is not None:
            save(behaviour_row(b))  # last but the projection: it freezes the shared model
        if measured is not None:
            save(projection_rows(measured, rows[-1], b.compile))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
