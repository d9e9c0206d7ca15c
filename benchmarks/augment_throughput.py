"""What does heavy augmentation + Foreground-CutMix cost? Batched on the device (ours: Kornia and
torch ops on the whole batch) against the usual way (albumentations per sample in DataLoader
worker processes on the CPU, as the paper did), on the same images, in one run.

Method: uint8 images at --res in memory. Ours: the float batch already on the device, augment +
mix, --repeats timed batches after a warm-up, device synchronised, median; eager, and compiled into
one graph (--compile, default on CUDA, as training runs it there). Albumentations: a
DataLoader with --workers processes applying the same ops per image (albumentations 1.2.1 at its
defaults, as ours) and collating the batch; median of --repeats
epochs of --batches batches. On CUDA also the cost of one PGD-3 EfficientNet-B1 training step at
240 on the same batch size, to state the augmentation's share of a step (goal: < 5%).

    python benchmarks/augment_throughput.py                  # CPU defaults (small)
    python benchmarks/augment_throughput.py --res 224 --batch-size 256 --workers 16
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

from fasttricks.augment.heavy import OPS, HeavyAugmentation, seeded
from fasttricks.augment.mixing import mix
from fasttricks.recipes import (
    AdversarialConfig,
    AugmentConfig,
    MixingConfig,
    ModelConfig,
    OptimizerConfig,
    StageConfig,
)

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, machine_tag, timed  # noqa: E402

FCUTMIX = MixingConfig(kind="foreground_cutmix", p=0.5)


def albumentations_pipeline():
    import albumentations as A

    # albumentations 1.2.1 (the dev extra's pin), each op at its defaults: what ours reproduces
    return A.Compose([A.ShiftScaleRotate(), A.ElasticTransform(), A.RandomBrightnessContrast(), A.MotionBlur(),
                      A.Cutout(), A.GaussNoise(), A.ISONoise()])


class _Images(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray):
        self.images, self.transform = images, None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        if self.transform is None:  # built in the worker
            self.transform = albumentations_pipeline()
        return torch.from_numpy(self.transform(image=self.images[i])["image"]).permute(2, 0, 1), i % 10


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--res", type=int, default=224 if cuda else 128)
    p.add_argument("--batch-size", type=int, default=256 if cuda else 64)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--batches", type=int, default=8 if cuda else 4, help="batches per albumentations epoch")
    p.add_argument("--repeats", type=int, default=5 if cuda else 3)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=cuda,
                   help="also time the augmentation compiled (torch.compile, one graph); default on CUDA")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile's backend (aot_eager: the CPU rehearsal of the GPU suite)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    rng = np.random.default_rng(0)
    n = args.batch_size * args.batches
    small = rng.integers(0, 256, (n, args.res // 8, args.res // 8, 3), dtype=np.uint8)
    images = np.ascontiguousarray(np.repeat(np.repeat(small, 8, axis=1), 8, axis=2))

    # ours
    batch = (torch.from_numpy(images[: args.batch_size]).to(device).permute(0, 3, 1, 2).float().div(255)
             .contiguous(memory_format=torch.channels_last))
    labels = torch.arange(args.batch_size, device=device) % 10
    augment = HeavyAugmentation(AugmentConfig()).to(device)

    def batched_step(aug):
        """One augment + mix of the batch, each call a new seed."""
        steps = itertools.count()

        def step():
            with seeded(next(steps), device):
                mix(aug(batch), labels, 10, FCUTMIX)
            return args.batch_size
        return step

    def rate(step) -> float:
        step()  # warm-up (compilation)
        return statistics.median(timed(step, device) for _ in range(args.repeats))

    ours = batched_step(augment)
    batched = rate(ours)
    # as train runs it on CUDA: the augmentation one compiled graph
    compiled_rate = rate(batched_step(augment.compiled(args.compile_backend))) if args.compile else None

    # albumentations, per sample in worker processes
    loader = torch.utils.data.DataLoader(_Images(images), batch_size=args.batch_size, num_workers=args.workers,
                                         persistent_workers=True, prefetch_factor=2)

    def albu():
        count = 0
        for x, _ in loader:
            count += x.shape[0]
        return count

    albu()
    per_sample = statistics.median(timed(albu, torch.device("cpu")) for _ in range(args.repeats))
    result = {"question": "images/s of heavy augmentation + Foreground-CutMix: batched on the device vs "
                          "albumentations per sample in CPU workers",
              "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "images_per_s_batched_on_device": round(batched, 1),
              "images_per_s_batched_compiled": compiled_rate and round(compiled_rate, 1),
              "images_per_s_albumentations_cpu_workers": round(per_sample, 1),
              "ratio": round(batched / per_sample, 2), "machine": machine(device)}
    result["per_op_ms_per_batch"] = _per_op(batch, device, args.repeats)
    if cuda:
        result.update(_share_of_pgd3_step(args, device, ours))
    out = args.out or RESULTS / f"augment_throughput-{machine_tag(device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
    print(f"wrote {out}")


def _per_op(batch: torch.Tensor, device: torch.device, repeats: int) -> dict:
    """Milliseconds per batch of each op alone (at p=1, and the non-geometric ones at p=0.5), of
    Foreground-CutMix, and of the baseline the geometry replaced: Kornia's affine warp followed by
    its elastic transform (two warps and a full-resolution blur, at sigma 6) against our one
    resampling of shift/scale/rotate + elastic."""
    import kornia.augmentation as K

    def ms(fn) -> float:
        def run():
            fn()
            return 1
        run()
        return round(1000 / statistics.median(timed(run, device) for _ in range(repeats)), 2)

    def only(ops, p: float) -> HeavyAugmentation:
        return HeavyAugmentation(AugmentConfig(**{o: {"p": p if o in ops else 0.0} for o in OPS})).to(device)

    out = {op: ms(lambda aug=only([op], 1.0): aug(batch)) for op in OPS}
    # at albumentations' p = 0.5 these ops run on half the batch; computing the whole batch and
    # blending (Kornia >= 0.9, or a torch.where coin) costs what p = 1 costs
    out |= {f"{op}_at_p0.5": ms(lambda aug=only([op], 0.5): aug(batch)) for op in OPS[2:]}
    geometry = only(OPS[:2], 1.0)
    out["geometry_ours_one_resampling"] = ms(lambda: geometry(batch))
    affine = K.RandomAffine(degrees=45, translate=(0.0625, 0.0625), scale=(0.9, 1.1), padding_mode="reflection",
                              p=1.0).to(device)
    elastic = K.RandomElasticTransform(kernel_size=(33, 33), sigma=(6.0, 6.0), alpha=(1.0, 1.0),
                                       padding_mode="reflection", p=1.0).to(device)
    out["geometry_kornia_affine_then_elastic"] = ms(lambda: elastic(affine(batch)))
    labels = torch.arange(batch.shape[0], device=device) % 10
    out["foreground_cutmix"] = ms(lambda: mix(batch, labels, 10, FCUTMIX.model_copy(update={"p": 1.0})))
    return out


def _share_of_pgd3_step(args, device, ours) -> dict:
    from fasttricks.models.factory import create_model
    from fasttricks.training.step import create_optimizer, training_step

    torch.backends.cudnn.benchmark = True
    model = create_model(ModelConfig(arch="efficientnet_b1"), 1000).to(device).to(memory_format=torch.channels_last)
    stage = StageConfig(optimizer=OptimizerConfig(name="sgd", lr=0.01),
                        adversarial=AdversarialConfig(norm="linf", eps=8 / 255, step_size=6.67 / 255, steps=3))
    optimizer = create_optimizer(model, stage.optimizer)
    x = torch.rand(args.batch_size, 3, 240, 240, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)

    def step():
        training_step(model, x, y, optimizer, torch.nn.CrossEntropyLoss(), stage)
        return args.batch_size

    for _ in range(3):
        step()
    step_rate = statistics.median(timed(step, device) for _ in range(args.repeats))
    aug_rate = statistics.median(timed(ours, device) for _ in range(args.repeats))
    return {"images_per_s_pgd3_effnet_b1_240_step": round(step_rate, 1),
            "augmentation_share_of_step": round(step_rate / aug_rate, 4)}


if __name__ == "__main__":
    main()
