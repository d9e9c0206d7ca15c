"""How busy does the input pipeline keep the device during (adversarial) training? Images/s of
training steps with 0, 1, 3 and 7 PGD steps, (a) fed by the real FFCV loader + heavy augmentation
and Foreground-CutMix on the device (--no-augment: loader only) and (b) on one synthetic batch
already on the device, in one run. (a)/(b) is the saturation: 1.0 means the whole input pipeline
is free.

Method: per PGD setting, a warm-up (compilation, cudnn autotuning), then --steps timed steps
each way, the device synchronised inside the timed region. Defaults: EfficientNet-B1 at 240 on
CUDA; timm's tiny test_efficientnet at 64 on the CPU (where the figures only show that it runs).

    python benchmarks/train_step_throughput.py
    python benchmarks/train_step_throughput.py --arch efficientnet_b1 --res 240 --batch-size 192
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

from fasttricks.augment.heavy import HeavyAugmentation, seeded
from fasttricks.data.beton import BetonOptions, build_beton
from fasttricks.data.loader import TrainLoader
from fasttricks.models import create_model
from fasttricks.recipes import AdversarialConfig, AugmentConfig, MixingConfig, ModelConfig, OptimizerConfig, StageConfig
from fasttricks.train import augment_and_mix, create_optimizer, training_step

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, machine_tag, make_jpeg_folder, timed  # noqa: E402


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="efficientnet_b1" if cuda else "test_efficientnet")
    p.add_argument("--res", type=int, default=240 if cuda else 64)
    p.add_argument("--batch-size", type=int, default=192 if cuda else 32)
    p.add_argument("--pgd-steps", default="0,1,3,7")
    p.add_argument("--steps", type=int, default=30 if cuda else 8, help="timed steps per setting and path")
    p.add_argument("--images", type=int, default=None, help="images in the beton (default: enough for --steps)")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="heavy augmentation + Foreground-CutMix in the fed path")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True

    torch.manual_seed(0)
    model = create_model(ModelConfig(arch=args.arch), 1000).to(device).to(memory_format=torch.channels_last)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    synthetic = (torch.rand(args.batch_size, 3, args.res, args.res, device=device)
                 .contiguous(memory_format=torch.channels_last),
                 torch.randint(0, 1000, (args.batch_size,), device=device))
    n_images = args.images or args.batch_size * (args.steps + 6)
    results = []
    with tempfile.TemporaryDirectory(prefix="fasttricks-bench-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        folder = make_jpeg_folder(tmp / "images", n_images, int(args.res * 1.2))
        build_beton(folder, tmp / "train.beton", BetonOptions(write_mode="jpg", workers=args.workers),
                    show_progress=False)
        print(f"prepared {n_images} images in {time.perf_counter() - t:.0f} s")
        loader = TrainLoader(tmp / "train.beton", batch_size=args.batch_size, resolution=args.res, seed=0,
                             device=device, workers=args.workers)
        tricks = StageConfig(augment=AugmentConfig(), mixing=MixingConfig(kind="foreground_cutmix", p=0.5))
        heavy = HeavyAugmentation(tricks.augment).to(device)
        for k in map(int, args.pgd_steps.split(",")):
            adv = (AdversarialConfig(norm="linf", eps=8 / 255, step_size=2.5 * 8 / 255 / max(k, 1), steps=k)
                   if k else None)
            stage = StageConfig(optimizer=OptimizerConfig(name="sgd", lr=0.01), adversarial=adv)
            optimizer = create_optimizer(model, stage.optimizer)

            def run(batches, n, optimizer=optimizer, stage=stage, augment=False):
                for step, (images, labels) in enumerate(itertools.islice(batches, n)):
                    targets = labels
                    if augment:
                        with seeded(step, device):
                            images, targets = augment_and_mix(images, labels, tricks, heavy, 1000)
                    training_step(model, images, targets, optimizer, criterion, stage)
                return n * args.batch_size

            run(itertools.repeat(synthetic), 3)  # warm-up
            fed_batches = loader.epoch(k, args.res)
            run(fed_batches, 3, augment=args.augment)
            fed = timed(lambda b=fed_batches: run(b, args.steps, augment=args.augment), device)
            synth = timed(lambda: run(itertools.repeat(synthetic), args.steps), device)
            row = {"pgd_steps": k, "images_per_s_loader_fed": round(fed, 1),
                   "images_per_s_synthetic": round(synth, 1), "saturation": round(fed / synth, 3)}
            results.append(row)
            print(row, flush=True)

    report = {"question": "images/s of training steps with k PGD steps, loader-fed (+ GPU augmentation) vs "
                          "synthetic batch",
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "results": results,
              "machine": machine(device)}
    out = args.out or RESULTS / f"train_step_throughput-{machine_tag(device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
