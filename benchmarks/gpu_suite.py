"""Every GPU figure from one command: the GPU tests, the train-step and augmentation benchmarks and
the recipes' projected ImageNet hours, then one table of each figure against its goal (#13, #31).

    make gpu-bundle                                        # here: the wheels the GPU machine lacks
    python3 benchmarks/gpu_suite.py --bundle .gpu-bundle   # there (make bench-gpu): installs them, runs all
    python3 benchmarks/gpu_suite.py --rehearse ...         # the CPU rehearsal (make gpu-rehearsal)

Each part runs in its own process with a time limit, so that one failing or slow part still leaves
the others' figures; a part that fails is a row saying so, never a figure. The benchmarks save each
row as it ends and the table is rewritten after each part, so a run stopped at any point brings back
what it measured. Results go to ``--results`` (default benchmarks/results/): each benchmark's JSON,
one log, and ``gpu-suite-<device>.md`` / ``.json`` (the table, the parts, the packages it ran with).
The exit status is 1 when a part fails or a figure of the table is missing (never for a missed goal).

Sizes (SIZES below). On the GPU: the figures at the recipes' own settings (EfficientNet-B1, 240 px,
batch 256; augmentation at 224), 10 timed steps after 3 warm-up ones per figure (the slowest, eager
PGD-3 at ~665 img/s on an H100, then times 2,560 images in about 4 s); the time limits add up to
7 minutes, which with the bundle's install (~30 s) keeps `make bench-gpu` inside 8. With
``--rehearse``: the same parts and rows on the CPU, timm's tiny test_efficientnet at 32 px, one
timed step after one warm-up, torch.compile with the aot_eager backend (it traces the graphs as
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

SIZES = {
    "gpu": {"arch": "efficientnet_b1", "res": 240, "batch": 256, "steps": 10, "warmup": 3, "aug_res": 224,
            "aug_batch": 256, "aug_batches": 8, "aug_repeats": 5, "backend": "inductor",
            "limits": {"train step": 270, "augmentation": 60, "projection": 30, "gpu tests": 60}},
    "rehearsal": {"arch": "test_efficientnet", "res": 32, "batch": 8, "steps": 1, "warmup": 1, "aug_res": 32,
                  "aug_batch": 16, "aug_batches": 2, "aug_repeats": 1, "backend": "aot_eager",
                  "limits": {"train step": 150, "augmentation": 60, "projection": 30, "gpu tests": 120}},
}

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
]


def parts(tag: str, results: Path, size: dict) -> list[tuple[str, list[str], Path | None]]:
    """(name, command, JSON it writes); GOALS read a JSON by its part's name."""
    py, limits = sys.executable, size["limits"]
    train_step = results / f"train_step_throughput-{tag}.json"
    augment = results / f"augment_throughput-{tag}.json"
    projection = results / f"projection-{tag}.json"
    listed = [
        ("train step", [py, str(BENCH / "train_step_throughput.py"), "--rows", "steps,pgd,behaviour",
                        "--pgd-steps", "3", "--arch", size["arch"], "--res", str(size["res"]),
                        "--batch-size", str(size["batch"]), "--steps", str(size["steps"]),
                        "--warmup", str(size["warmup"]), "--compile", "on",
                        "--compile-backend", size["backend"], "--out", str(train_step)], train_step),
        ("augmentation", [py, str(BENCH / "augment_throughput.py"), "--res", str(size["aug_res"]),
                          "--batch-size", str(size["aug_batch"]), "--batches", str(size["aug_batches"]),
                          "--repeats", str(size["aug_repeats"]), "--compile", "--compile-backend", size["backend"],
                          "--out", str(augment)], augment),
        ("projection", [py, str(BENCH / "projection.py"), "--rates", str(train_step), "--out", str(projection)],
         projection),
        # last: a lease cut short loses the tests' verdict before any figure
        ("gpu tests", [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *gpu_test_files()], None),
    ]
    assert {name for name, _, _ in listed} == limits.keys()
    return listed


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
    p.add_argument("--only", default=None, help="comma-separated part names (gpu tests, train step, …)")
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
    wanted = args.only.split(",") if args.only else None
    status, figures, installed = [], {}, versions(env)
    log = args.results / f"gpu-suite-{tag}.log"
    log.write_text(f"gpu_suite on {device}\n{json.dumps(installed)}\n")
    for name, cmd, out in parts(tag, args.results, size):
        if wanted and name not in wanted:
            continue
        status.append(run_part(name, cmd, size["limits"][name], log, env))
        if out is not None and out.exists():  # also after a timeout: the benchmarks save row by row
            figures[name] = json.loads(out.read_text())
        tests = next((re.sub(r"=+", "", s["tail"][-1]).strip() for s in status
                      if s["part"] == "gpu tests" and s["tail"]), "not run")
        md = table(status, figures, device, tests, sizes)
        (args.results / f"gpu-suite-{tag}.md").write_text(md)
        (args.results / f"gpu-suite-{tag}.json").write_text(json.dumps(
            {"device": device, "sizes": size, "packages": installed, "parts": status,
             "figures": figures_of(figures)}, indent=2) + "\n")
    print(md)
    sys.exit(verdict(figures, status, complete=not wanted))


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
