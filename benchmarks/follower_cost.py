"""What does `brainscore follow` cost the trainer beside it? A toy run's images/s with the follower
scoring every checkpoint on the same cores, as a ratio to the same run alone, in one script (the
two runs alternate, alone first).

The follower scores a stand-in benchmark (tests/fake_benchmarks.py: the export's own activations
model on --stimuli local images), since no benchmark data can be downloaded here; a real public
benchmark reads more images per checkpoint, so the figure is a lower bound of the cost.

    python benchmarks/follower_cost.py                      # 2 pairs of 4-epoch toy runs, 200 stimuli
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from fasttricks.atomic import write_json
from fasttricks.data.sources import resolve_data
from fasttricks.recipes import load_recipe
from fasttricks.runs.folder import read_metrics
from fasttricks.training.loop import train

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, machine_tag  # noqa: E402

TESTS = Path(__file__).resolve().parent.parent / "tests"
FOLLOWER = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
import brainscore_vision, fake_benchmarks
stimuli = fake_benchmarks.stimulus_set(Path({stimuli!r}), "fasttricks-follower-cost-{n}", n={n})
brainscore_vision.load_benchmark = lambda name: fake_benchmarks.ReadoutBenchmark(stimuli)
from fasttricks.cli import app
app(["brainscore", "follow", {run!r}, "--benchmark", "StandIn.readout", "--poll", "1"])
"""


def images_per_s(run: Path) -> float:
    return statistics.fmean(r["images_per_s"] for r in read_metrics(run) if "images_per_s" in r)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--stimuli", type=int, default=200)
    args = p.parse_args()
    data = resolve_data("toy")
    recipe = load_recipe("baseline", ["overrides/toy"], [f"stages.0.epochs={args.epochs}"])
    alone, beside, scored = [], [], 0
    with tempfile.TemporaryDirectory(prefix="fasttricks-follower-cost-") as tmp:
        for k in range(args.pairs):
            train(recipe, data, Path(tmp) / f"alone{k}", show_progress=False)
            alone.append(images_per_s(Path(tmp) / f"alone{k}"))
            run = Path(tmp) / f"beside{k}"
            code = FOLLOWER.format(tests=str(TESTS), stimuli=str(Path(tmp) / "stimuli"), run=str(run), n=args.stimuli)
            follower = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, env={**os.environ})
            train(recipe, data, run, show_progress=False)
            follower.wait(timeout=1800)
            beside.append(images_per_s(run))
            scored += sum(1 for _ in (run / "brainscore" / "scores.jsonl").open())
    result = {"question": "trainer images/s with brainscore follow beside it, as a ratio to alone",
              "settings": vars(args), "alone_images_per_s": alone, "beside_images_per_s": beside,
              "ratio": round(statistics.fmean(beside) / statistics.fmean(alone), 3), "records_scored": scored,
              "machine": machine(torch.device("cpu"))}
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    write_json(RESULTS / f"follower_cost-{machine_tag(torch.device('cpu'))}.json", result)


if __name__ == "__main__":
    main()
