"""Every GPU figure from one command: the GPU tests, the loader, augmentation and train-step
benchmarks, then one markdown table of each figure against its goal (issue #13).

    make gpu-bundle                                        # here: the wheels the GPU machine lacks
    python3 benchmarks/gpu_suite.py --bundle .gpu-bundle   # there: installs them, runs everything

Each part runs in its own process with a time limit, so that one failing or slow part still
leaves the others' figures; a part that fails is a row saying so, never a figure. Results go to
``--results`` (default benchmarks/results/): each benchmark's JSON, the test log, and
``gpu-suite-<device>.md`` / ``.json``. Sized to finish in about 9 minutes on one H100 with 16
cores (``--quick`` for a smoke run of each part).
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"

# (figure, where it is read from, goal, comparison): the goals on one H100
GOALS = [
    ("behaviour-stage saturation with augmentation", ("train step", "behaviour", "saturation"), 0.95, ">="),
    ("heavy aug + F-CutMix at 224, compiled (img/s)", ("augmentation", None, "images_per_s_batched_compiled"),
     50_000, ">="),
    ("PGD-3 EfficientNet-B1 at 240, compiled (img/s)", ("train step", "compile", "images_per_s_compiled"), 1_000,
     ">="),
    ("projected winner recipe on ImageNet (h)", ("train step", "projection:winner", "hours"), 10, "<="),
    # issue #23: winner-fast (N-FGSM to epoch 30, PGD-3 after) under 7 h on one H100
    ("projected winner-fast recipe on ImageNet (h)", ("train step", "projection:winner-fast", "hours"), 7, "<="),
    # issue #23: N-FGSM training steps of EfficientNet-B1 at 240 on one H100
    ("N-FGSM EfficientNet-B1 at 240, compiled (img/s)", ("train step", "one_step_n-fgsm", "images_per_s"), 1_300,
     ">="),
]


def parts(tag: str, results: Path, quick: bool) -> list[tuple[str, list[str], int, Path | None]]:
    """(name, command, time limit in s, JSON it writes); GOALS read a JSON by its part's name."""
    py = sys.executable
    s = "6" if quick else None
    train_step = results / f"train_step_throughput-{tag}.json"
    augment = results / f"augment_throughput-{tag}.json"
    loader = results / f"loader_throughput-{tag}.json"
    return [
        ("gpu tests", [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *gpu_test_files()], 120,
         None),
        ("train step", [py, str(BENCH / "train_step_throughput.py"), "--pgd-steps", "0,3", "--steps", s or "20",
                        "--out", str(train_step)], 330, train_step),
        ("augmentation", [py, str(BENCH / "augment_throughput.py"), "--res", "224", "--batch-size", "256",
                          "--repeats", "3" if quick else "5", "--out", str(augment)], 75, augment),
        ("loader", [py, str(BENCH / "loader_throughput.py"), "--images", "2000" if quick else "4000", "--size", "320",
                    "--res", "224", "--batch-size", "256", "--repeats", "2", "--out", str(loader)], 75, loader),
    ]


def gpu_test_files() -> list[str]:
    """Only the modules holding GPU tests: the others import what a GPU machine may lack."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if re.search(r"^@pytest\.mark\.gpu", p.read_text(), re.MULTILINE))


def install_bundle(bundle: Path) -> Path:
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


def read_figure(data: dict, row: str | None, key: str):
    if row is None:
        return data.get(key)
    row, _, recipe = row.partition(":")  # "projection:winner-fast": the row of that recipe
    return next((r[key] for r in data.get("results", []) if r.get("row") == row and key in r
                 and (not recipe or r.get("recipe") == recipe)), None)


def table(status: list[dict], figures: dict, device: str, tests: str) -> str:
    lines = [f"# GPU suite on {device}", "", f"GPU tests: {tests}", "",
             "| figure | goal | measured | met |", "| --- | --- | --- | --- |"]
    for figure, (source, row, key), goal, op in GOALS:
        value = read_figure(figures.get(source, {}), row, key)
        met = "–" if value is None else ("yes" if (value >= goal if op == ">=" else value <= goal) else "no")
        lines.append(f"| {figure} | {op} {goal:,} | {'not measured' if value is None else f'{value:,}'} | {met} |")
    lines += ["", "| part | exit | seconds |", "| --- | --- | --- |"]
    lines += [f"| {s['part']} | {s['rc']} | {s['seconds']} |" for s in status]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, help="folder of wheels from `make gpu-bundle`, installed first")
    p.add_argument("--results", type=Path, default=BENCH / "results")
    p.add_argument("--only", default=None, help="comma-separated part names (gpu tests, train step, …)")
    p.add_argument("--quick", action="store_true", help="few steps per figure: a smoke run of each part")
    args = p.parse_args()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    paths = [str(REPO)]
    if args.bundle:
        paths.insert(0, str(install_bundle(args.bundle)))
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    probe = subprocess.run([sys.executable, "-c", "import torch; assert torch.cuda.is_available(); "
                            "print(torch.cuda.get_device_name())"], env=env, capture_output=True, text=True)
    if probe.returncode:
        sys.exit(f"gpu_suite: no CUDA device here ({probe.stderr.strip().splitlines()[-1:]})")
    device = probe.stdout.strip()
    tag = device.replace(" ", "-")
    args.results.mkdir(parents=True, exist_ok=True)
    wanted = args.only.split(",") if args.only else None
    status, figures = [], {}
    log = args.results / f"gpu-suite-{tag}.log"
    log.write_text(f"gpu_suite on {device}\n")
    for name, cmd, limit, out in parts(tag, args.results, args.quick):
        if wanted and name not in wanted:
            continue
        status.append(run_part(name, cmd, limit, log, env))
        if out is not None and out.exists():  # also after a timeout: the benchmarks save row by row
            figures[name] = json.loads(out.read_text())
    tests = next((re.sub(r"=+", "", s["tail"][-1]).strip() for s in status if s["part"] == "gpu tests" and s["tail"]),
                 "not run")
    md = table(status, figures, device, tests)
    (args.results / f"gpu-suite-{tag}.md").write_text(md)
    (args.results / f"gpu-suite-{tag}.json").write_text(json.dumps({"device": device, "parts": status}, indent=2))
    print(md)


if __name__ == "__main__":
    main()
