"""Can the toy model learn the toy set's clutter task at all? An upper bound for what any trick
applied to the centred training set could reach on ``val_clutter``.

Method: 1,600 training images rendered exactly as ``val_clutter`` renders its images (small
objects, any angle and place, photographs), at indices disjoint from it; the baseline recipe with
the toy override trained on them from scratch, then evaluated on the usual ``val`` and
``val_clutter``; once with the recipe's random-resized crop (area 0.08-1, which can crop small
objects away) and once with area 0.64-1. JSON under benchmarks/results/.

    python benchmarks/toy_clutter_oracle.py        # ~6 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image

from fasttricks.data.beton import BetonOptions, build_beton
from fasttricks.data.sources import ensure_toy_data
from fasttricks.data.toy import CLASSES, ToyOptions, render
from fasttricks.recipes import PIPELINES, load_recipe
from fasttricks.training.loop import train

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, machine_tag  # noqa: E402

FIRST_INDEX = 100_000  # val_clutter uses indices below clutter_per_class * 10


def clutter_training_set(root: Path, per_class: int, opts: ToyOptions) -> Path:
    """train.beton of clutter-style images, with the toy set's val and val_clutter beside it."""
    images = root / "images"
    for label, name in enumerate(CLASSES):
        (images / name).mkdir(parents=True)
        for k in range(per_class):
            img = render(label, "val_clutter", FIRST_INDEX + label * per_class + k, opts)
            Image.fromarray(img).save(images / name / f"{k:05d}.png")
    data = root / "data"
    data.mkdir()
    build_beton(images, data / "train.beton", BetonOptions(workers=0))
    toy = ensure_toy_data(opts, show_progress=False)
    for split in ("val", "val_clutter"):
        for suffix in (".beton", ".beton.json"):
            shutil.copy(toy / f"{split}{suffix}", data / f"{split}{suffix}")
    return data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-class", type=int, default=160)
    p.add_argument("--clutter-radius", type=float, nargs=2, default=ToyOptions().clutter_radius,
                   help="the clutter objects' radius range (fraction of the side); the default set's by default")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        opts = ToyOptions(clutter_radius=tuple(args.clutter_radius))
        data = clutter_training_set(Path(tmp), args.per_class, opts)
        for name, scale in (("crop_scale_0.08_1", "[0.08, 1.0]"), ("crop_scale_0.64_1", "[0.64, 1.0]")):
            recipe = load_recipe("baseline", [PIPELINES / "overrides" / "toy.yaml"], [f"data.crop_scale={scale}"])
            summary = train(recipe, data, Path(tmp) / name, show_progress=False)
            rows[name] = {k: summary[k] for k in ("val_top1", "val_clutter_top1", "train_loss")}
            print(name, rows[name])
    import torch

    result = {"question": "val/val_clutter top-1 of the toy baseline trained on clutter-style images",
              "settings": {"per_class": args.per_class, "clutter_radius": list(args.clutter_radius),
                           "recipe": "baseline + overrides/toy.yaml"},
              "results": rows, "chance_top1": 10.0, "machine": machine(torch.device("cpu"))}
    variant = f"-radius{args.clutter_radius[0]}-{args.clutter_radius[1]}"
    out = args.out or RESULTS / f"toy_clutter_oracle{variant}-{machine_tag(torch.device('cpu'))}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
