"""Every GPU figure from one command, the GPU tests from another: the train-step and augmentation
benchmarks and the recipes' projected ImageNet hours, then one table of each figure against its goal
(#13, #31, #36).

    make gpu-bundle                                        # here: the wheels the GPU machine lacks
    make bench-gpu    (gpu_suite.py --bundle .gpu-bundle)  # there: installs them, every figure
    make gpu-tests    (gpu_suite.py --suite tests ...)     # there: the GPU tests (pytest -m gpu)
    python3 benchmarks/gpu_suite.py --rehearse ...         # the CPU rehearsal of both (make gpu-rehearsal)

Each part runs in its own process with a time limit, so that one failing or slow part still leaves
the others' figures; a part that fails is a row saying so, never a figure. The benchmarks save each
row as it ends and the table is rewritten after each part, so a run stopped at any point brings back
what it measured. Results go to ``--results`` (default benchmarks/results/): each benchmark's JSON,
one log, and ``gpu-suite-<device>.md`` / ``.json`` (``gpu-tests-<device>.*`` for the tests: the
table, the parts, the packages it ran with). The exit status is 1 when a part fails or a figure of
the table is missing (never for a missed goal).

Order and budgets (``BUDGET``). The parts come cheapest figure first, so a lease cut short still
brings back the most: the eager steps (three figures in under a minute), their projection, the
augmentation, the compiled steps, the loader-saturation rows, then the projection at compiled rates.
Each part's time limit is computed from what it must start, compile and run: a process start, a
number of cold inductor graphs of EfficientNet-B1, and its images at the H100's eager rates of
2026-11-22, with a margin. The compile time per graph is the one figure not yet measured on a GPU
(an assumption, ``COMPILE_S``); each step row now records its seconds with warm-up
(``seconds_with_warmup``), so the first GPU run replaces it. The figures' limits add up, with the
bundle's install, to 8 minutes; the GPU tests (7 compiled toy training runs among them) do not fit
beside them, and get their own call with a limit sized for those runs (``make gpu-tests``).
With ``--rehearse``: the same parts and rows on the CPU, timm's tiny test_efficientnet at 32 px,
one timed step after one warm-up, torch.compile with the aot_eager backend (it traces the graphs as
inductor would and generates no code: the rehearsal checks that every row runs, not its speed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"

# The cost model of the GPU parts' time limits (seconds). Evidence: the H100 eager step rates of
# 2026-11-22 (benchmarks/results/train_step_throughput-NVIDIA-H100-80GB-HBM3.json: plain 2,708 img/s,
# PGD-3 665; N-FGSM, two passes, taken at half the plain rate); the rehearsal's process starts
# (~10 s on 2 CPU cores, CUDA's start added). COMPILE_S is an assumption until a GPU run records
# seconds_with_warmup: a cold inductor compile of one EfficientNet-B1 training graph on 16 cores.
# The backbones (#35: ConvNeXt-L, CLIP ViT-B/16, plain and PGD-3 at 224, batch 128) have no measured
# rate yet: projection.py's FLOP estimate, taken 3x slower, and 10 s to build the two models.
START_S = 20
COMPILE_S = 45
CACHED_COMPILE_S = 12  # the same graph again in a new process: inductor's FX graph cache on local disk
TOY_RUN_S = 20  # one compiled toy training run of the GPU tests (tiny graphs, cache warm after the first)
MARGIN = 1.5
STEP_IMAGES = 13 * 256  # 3 warm-up + 10 timed steps of batch 256
RATES = {"plain": 2708, "pgd-3": 665, "n-fgsm": 1354}
BACKBONE_RATES = (1679 / 3, 560 / 3, 3285 / 3, 1095 / 3)  # ConvNeXt-L plain, PGD-3; ViT-B/16 plain, PGD-3
BACKBONE_IMAGES = 7 * 128  # 2 warm-up + 5 timed steps: a rate for the projection


def _images_s(images: float, rate: float) -> float:
    return images / rate


BUDGET = {  # (process starts, cold graphs, cached graphs, seconds of work) per part
    "eager steps": (1, 0, 0, sum(_images_s(STEP_IMAGES, r) for r in RATES.values())
                    + 10 + sum(_images_s(BACKBONE_IMAGES, r) for r in BACKBONE_RATES)),  # and the backbones
    "projection (eager)": (0.4, 0, 0, 4),  # and timm's import, when it estimates a backbone from its FLOPs
    "augmentation": (1, 1, 0, 5),  # one graph (heavy augmentation + F-CutMix), ~10k images
    "compiled steps": (1, 2, 0, sum(_images_s(STEP_IMAGES, r) for r in RATES.values())),  # train, attack
    # a 4,096-image beton (~20 s), the PGD-3 row fed and synthetic, the frozen behaviour graph
    "loader saturation": (1, 1, 3, 20 + 2 * _images_s(STEP_IMAGES, RATES["pgd-3"]) + 5),
    "projection": (0.4, 0, 0, 4),
}
TESTS_BUDGET = {"gpu tests": (1, 0, 0, 7 * TOY_RUN_S + 40)}  # 7 toy runs (test_syncguard) + the other GPU tests
INSTALL_S = 30  # the bundle's wheels, pip --no-index
MACHINE_START_S = 90  # a lent machine's start, counted in the lease
FIGURES_CALL_S = 8 * 60  # one device call of make bench-gpu
LEASE_S = 15 * 60  # a lease's device time: the start and both calls


def limit(starts: float, cold: int, cached: int, work: float) -> int:
    """A part's time limit from its cost (rounded up to 5 s)."""
    seconds = starts * START_S + cold * COMPILE_S + cached * CACHED_COMPILE_S + work * MARGIN
    return int(-(-seconds // 5) * 5)


SIZES = {
    "gpu": {"arch": "efficientnet_b1", "res": 240, "batch": 256, "steps": 10, "warmup": 3, "aug_res": 224,
            "aug_batch": 256, "aug_batches": 8, "aug_repeats": 5, "backend": "inductor", "backbone_batch": 128,
            "limits": {name: limit(*cost) for name, cost in {**BUDGET, **TESTS_BUDGET}.items()}},
    "rehearsal": {"arch": "test_efficientnet", "res": 32, "batch": 8, "steps": 1, "warmup": 1, "aug_res": 32,
                  "aug_batch": 16, "aug_batches": 2, "aug_repeats": 1, "backend": "aot_eager", "backbone_batch": 8,
                  "limits": {"eager steps": 60, "projection (eager)": 60, "augmentation": 60, "compiled steps": 90,
                             "loader saturation": 120, "projection": 60, "gpu tests": 120}},
}
SUITES = {"figures": list(BUDGET), "tests": list(TESTS_BUDGET)}


def budget_problems(limits: dict[str, int]) -> list[str]:
    """What does not add up: the figures' call inside 8 minutes with the install, and the machine's
    start, that call and the tests' call inside one lease. Empty when all fits."""
    figures = INSTALL_S + sum(limits[n] for n in SUITES["figures"])
    tests = INSTALL_S + sum(limits[n] for n in SUITES["tests"])
    problems = []
    if figures > FIGURES_CALL_S:
        problems.append(f"make bench-gpu may take {figures} s, over its {FIGURES_CALL_S} s")
    if MACHINE_START_S + figures + tests > LEASE_S:
        problems.append(f"start + bench-gpu + gpu-tests may take {MACHINE_START_S + figures + tests} s, "
                        f"over the lease's {LEASE_S} s")
    return problems

# The packages the suite's figures depend on: their versions go into the results (and a GPU run's
# list is what the rehearsal's requirements, benchmarks/gpu_machine.txt, should pin next).
PACKAGES = ("torch", "torchvision", "triton", "numpy", "numba", "timm", "opencv-python-headless", "kornia", "ffcv",
            "pydantic", "robustness", "pytorch_optimizer", "albumentations", "safetensors", "typer", "rich",
            "matplotlib", "pytest")


def _row(rows: list[dict], **match) -> dict:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), {})


def _step(method: str, mode: str) -> Callable[[dict], float | None]:
    return lambda f: _row(f.get("train step", {}).get("results", []), row="step", method=method,
                          mode=mode).get("images_per_s")


def _backbone_step(recipe: str, method: str) -> Callable[[dict], float | None]:
    return lambda f: _row(f.get("train step", {}).get("results", []), row="backbone_step", recipe=recipe,
                          method=method).get("images_per_s")


def _projected(recipe: str, mode: str) -> Callable[[dict], float | None]:
    return lambda f: f.get("projection", {}).get("projection", {}).get(mode, {}).get(recipe, {}).get("hours")


# (figure, how it is read from the parts' JSON, goal or None, comparison); goals on one H100
GOALS: list[tuple[str, Callable[[dict], float | None], float | None, str]] = [
    ("loader saturation, robust stage (PGD-3, fed + augmented / synthetic)",
     lambda f: _row(f.get("train step", {}).get("results", []), row="pgd", pgd_steps=3).get("saturation"), 0.95, ">="),
    ("loader saturation, behaviour stage (fed + augmented / synthetic)",
     lambda f: _row(f.get("train step", {}).get("results", []), row="behaviour").get("saturation"), 0.95, ">="),
    ("heavy aug + F-CutMix, compiled (img/s)",
     lambda f: f.get("augmentation", {}).get("images_per_s_batched_compiled"), 50_000, ">="),
    ("heavy aug + F-CutMix, eager (img/s)",
     lambda f: f.get("augmentation", {}).get("images_per_s_batched_on_device"), None, ">="),
    ("plain step, eager (img/s)", _step("plain", "eager"), None, ">="),
    ("plain step, compiled (img/s)", _step("plain", "compiled"), None, ">="),
    ("PGD-3 step, eager (img/s)", _step("pgd-3", "eager"), None, ">="),
    ("PGD-3 step, compiled (img/s)", _step("pgd-3", "compiled"), 1_000, ">="),
    ("N-FGSM step, eager (img/s)", _step("n-fgsm", "eager"), None, ">="),
    ("N-FGSM step, compiled (img/s)", _step("n-fgsm", "compiled"), 1_300, ">="),
    *[(f"projected {recipe} on ImageNet, {mode} rates (h)", _projected(recipe, mode), goal, "<=")
      for recipe, goal in (("winner", 10), ("winner-fast", 7), ("winner-pretrained", 5))
      for mode in ("eager", "compiled")],
    # #35: the backbones' own steps, and their recipes' hours from them
    *[(f"{recipe} {method} step, eager (img/s)", _backbone_step(recipe, method), None, ">=")
      for recipe in ("winner-convnext", "winner-vit") for method in ("plain", "pgd-3")],
    *[(f"projected {recipe} on ImageNet, eager rates (h)", _projected(recipe, "eager"), None, "<=")
      for recipe in ("winner-convnext", "winner-vit")],
]


def parts(tag: str, results: Path, size: dict) -> list[tuple[str, list[str], Path | None]]:
    """(name, command, JSON it writes) of every part, in the order they run; GOALS read a JSON by
    the name of the part that writes it last (the step parts add rows to one file)."""
    py, limits = sys.executable, size["limits"]
    train_step = results / f"train_step_throughput-{tag}.json"
    augment = results / f"augment_throughput-{tag}.json"
    projection = results / f"projection-{tag}.json"
    step = [py, str(BENCH / "train_step_throughput.py"), "--pgd-steps", "3", "--arch", size["arch"],
            "--res", str(size["res"]), "--batch-size", str(size["batch"]), "--steps", str(size["steps"]),
            "--warmup", str(size["warmup"]), "--compile-backend", size["backend"], "--out", str(train_step)]
    project = [py, str(BENCH / "projection.py"), "--rates", str(train_step), "--out", str(projection)]
    listed = [
        ("eager steps", [*step, "--rows", "steps_eager,backbones", "--compile", "off", "--backbone-batch",
                         str(size["backbone_batch"]), "--backbone-steps", "5", "--backbone-warmup", "2"], train_step),
        ("projection (eager)", project, projection),
        ("augmentation", [py, str(BENCH / "augment_throughput.py"), "--res", str(size["aug_res"]),
                          "--batch-size", str(size["aug_batch"]), "--batches", str(size["aug_batches"]),
                          "--repeats", str(size["aug_repeats"]), "--compile", "--compile-backend", size["backend"],
                          "--out", str(augment)], augment),
        ("compiled steps", [*step, "--rows", "steps_compiled", "--compile", "on", "--append"], train_step),
        ("loader saturation", [*step, "--rows", "pgd,behaviour", "--compile", "on", "--append"], train_step),
        ("projection", project, projection),
        ("gpu tests", [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *gpu_test_files()], None),
    ]
    assert {name for name, _, _ in listed} == limits.keys()
    return listed


FIGURE_SOURCES = {"eager steps": "train step", "compiled steps": "train step", "loader saturation": "train step",
                  "projection (eager)": "projection", "projection": "projection", "augmentation": "augmentation"}


def gpu_test_files() -> list[str]:
    """Only the modules holding GPU tests: the others import what a GPU machine may lack."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if re.search(r"^@pytest\.mark\.gpu", p.read_text(), re.MULTILINE))


def install_bundle(bundle: Path) -> Path:
    """The bundle's wheels into a folder of their own, as the GPU machine takes them (no index)."""
    wheels = sorted(bundle.glob("*.whl"))
    if not wheels:
        sys.exit(f"--bundle {bundle}: no wheels there; build them with `make gpu-bundle` on the CPU machine")
    site = Path(tempfile.mkdtemp(prefix="fasttricks-site-"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", str(site), *map(str, wheels)], check=True)
    return site


def run_part(name: str, cmd: list[str], limit: int, log: Path, env: dict) -> dict:
    print(f"== {name}: {' '.join(Path(c).name if '/' in c else c for c in cmd[:2])} … (limit {limit} s)", flush=True)
    t = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=limit, text=True, errors="replace")
        rc, output = done.returncode, done.stdout
    except subprocess.TimeoutExpired as e:
        out = e.stdout or ""
        rc, output = "timeout", out.decode(errors="replace") if isinstance(out, bytes) else out
    seconds = round(time.perf_counter() - t, 1)
    with log.open("a") as f:  # one log for all parts: few files come back from a lent machine
        f.write(f"\n===== {name} (rc={rc}, {seconds} s): {' '.join(cmd)}\n{output}")
    tail = output.strip().splitlines()[-3:]
    print(f"   rc={rc} in {seconds} s; " + " | ".join(tail), flush=True)
    return {"part": name, "rc": rc, "seconds": seconds, "tail": tail}


def figures_of(figures: dict) -> list[dict]:
    """Each GOALS row with its measured value and whether it met its goal."""
    out = []
    for figure, read, goal, op in GOALS:
        value = read(figures)
        met = None if value is None or goal is None else (value >= goal if op == ">=" else value <= goal)
        out.append({"figure": figure, "goal": goal, "op": op, "value": value, "met": met})
    return out


def table(status: list[dict], figures: dict, device: str, tests: str, sizes: str = "") -> str:
    lines = [f"# GPU suite on {device}", "", *([sizes, ""] if sizes else []), f"GPU tests: {tests}", "",
             "| figure | goal | measured | met |", "| --- | --- | --- | --- |"]
    for r in figures_of(figures):
        goal = "–" if r["goal"] is None else f"{r['op']} {r['goal']:,}"
        value = "not measured" if r["value"] is None else f"{r['value']:,}"
        met = "–" if r["met"] is None else ("yes" if r["met"] else "no")
        lines.append(f"| {r['figure']} | {goal} | {value} | {met} |")
    lines += ["", "| part | exit | seconds |", "| --- | --- | --- |"]
    lines += [f"| {s['part']} | {s['rc']} | {s['seconds']} |" for s in status]
    return "\n".join(lines) + "\n"


def versions(env: dict) -> dict:
    """The installed version of each of PACKAGES, as the parts see them (bundle included)."""
    code = ("import json, sys; from importlib import metadata as m\n"
            "def v(n):\n    try: return m.version(n)\n    except m.PackageNotFoundError: return None\n"
            "print(json.dumps({'python': sys.version.split()[0], **{n: v(n) for n in sys.argv[1:]}}))")
    done = subprocess.run([sys.executable, "-c", code, *PACKAGES], env=env, capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr.strip()[-500:]}


def probe_device(env: dict, rehearse: bool) -> str:
    probe = subprocess.run([sys.executable, "-c", "import torch; assert torch.cuda.is_available(); "
                            "print(torch.cuda.get_device_name())"], env=env, capture_output=True, text=True)
    if rehearse:
        return f"rehearsal-cpu{os.cpu_count()}"
    if probe.returncode:
        sys.exit(f"gpu_suite: no CUDA device here ({probe.stderr.strip().splitlines()[-1:]}); "
                 "on a CPU machine, --rehearse runs every part at tiny sizes (make gpu-rehearsal)")
    return probe.stdout.strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, help="folder of wheels from `make gpu-bundle`, installed first")
    p.add_argument("--results", type=Path, default=BENCH / "results")
    p.add_argument("--suite", choices=tuple(SUITES), default="figures",
                   help="figures: every benchmark part (make bench-gpu); tests: the GPU tests (make gpu-tests)")
    p.add_argument("--only", default=None, help="comma-separated part names of the suite (eager steps, …)")
    p.add_argument("--rehearse", action="store_true",
                   help="on the CPU at tiny sizes: every part and row runs, its figures mean nothing")
    args = p.parse_args()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    paths = [str(REPO)]
    if args.bundle:
        paths.insert(0, str(install_bundle(args.bundle)))
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if args.rehearse:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the rehearsal's figures are the CPU's even beside a GPU
    if args.rehearse:  # the GPU budgets are checked here, on the CPU, before any lease depends on them
        problems = budget_problems(SIZES["gpu"]["limits"])
        if problems:
            sys.exit("gpu_suite: the GPU parts' budgets do not add up: " + "; ".join(problems))
    device = probe_device(env, args.rehearse)
    tag = device.replace(" ", "-")
    size = SIZES["rehearsal" if args.rehearse else "gpu"]
    sizes = (f"Sizes: {size['arch']} at {size['res']} px, batch {size['batch']}, {size['steps']} timed step(s) after "
             f"{size['warmup']} warm-up; "
             f"augmentation at {size['aug_res']} px, batch {size['aug_batch']}; compile backend {size['backend']}")
    if args.rehearse:
        sizes = ("A rehearsal on the CPU (make gpu-rehearsal): every part and row ran; the figures say nothing "
                 "of a GPU's speed, and the met column means nothing here.\n\n" + sizes)
    args.results.mkdir(parents=True, exist_ok=True)
    wanted = args.only.split(",") if args.only else SUITES[args.suite]
    unknown = set(wanted) - set(SUITES[args.suite])
    if unknown:
        sys.exit(f"gpu_suite: --only {args.only}: not parts of the {args.suite} suite ({', '.join(sorted(unknown))}); "
                 f"its parts: {', '.join(SUITES[args.suite])}")
    status, figures, installed = [], {}, versions(env)
    stem = args.results / f"{'gpu-suite' if args.suite == 'figures' else 'gpu-tests'}-{tag}"
    log = stem.with_suffix(".log")
    log.write_text(f"gpu_suite --suite {args.suite} on {device}\n{json.dumps(installed)}\n")
    for name, cmd, out in parts(tag, args.results, size):
        if name not in wanted:
            continue
        status.append(run_part(name, cmd, size["limits"][name], log, env))
        if out is not None and out.exists():  # also after a timeout: the benchmarks save row by row
            figures[FIGURE_SOURCES[name]] = json.loads(out.read_text())
        tests = next((re.sub(r"=+", "", s["tail"][-1]).strip() for s in status
                      if s["part"] == "gpu tests" and s["tail"]), "not run in this call")
        md = table(status, figures, device, tests, sizes) if args.suite == "figures" else \
            tests_table(status, device, tests)
        stem.with_suffix(".md").write_text(md)
        stem.with_suffix(".json").write_text(json.dumps(
            {"device": device, "suite": args.suite, "sizes": size, "packages": installed, "parts": status,
             "figures": figures_of(figures) if args.suite == "figures" else []}, indent=2) + "\n")
    print(md)
    sys.exit(verdict(figures, status, complete=args.suite == "figures" and not args.only))


def tests_table(status: list[dict], device: str, tests: str) -> str:
    lines = [f"# GPU tests on {device}", "", f"GPU tests: {tests}", "", "| part | exit | seconds |",
             "| --- | --- | --- |", *[f"| {s['part']} | {s['rc']} | {s['seconds']} |" for s in status]]
    return "\n".join(lines) + "\n"


def verdict(figures: dict, status: list[dict], complete: bool = True) -> str | None:
    """The exit: None (status 0) when every part exited 0 and (``complete``) every figure of the
    table was measured, else a line naming what failed (status 1). A goal missed is a figure, not a
    failure."""
    failed = [f"{s['part']} (exit {s['rc']})" for s in status if s["rc"] != 0]
    missing = [r["figure"] for r in figures_of(figures) if r["value"] is None] if complete else []
    said = ([f"{len(failed)} part(s) failed: {'; '.join(failed)}"] if failed else []) + \
        ([f"{len(missing)} figure(s) not measured: {'; '.join(missing)}"] if missing else [])
    return "gpu_suite: " + ". ".join(said) if said else None


if __name__ == "__main__":
    main()
