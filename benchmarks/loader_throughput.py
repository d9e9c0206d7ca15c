"""How fast does the training loader deliver batches? FFCV (our seeded decoder and FFCV's stock
one) against torchvision's ImageFolder + DataLoader, on the same JPEG images, resolution,
random-resized-crop + flip, batch size and worker count, in one process.

Method: the images are toy renders at --size px saved as JPEG q90 (the ImageFolder) and the
same pixels compiled to a beton with every image stored as JPEG q90. Each loader runs one
untimed warm-up epoch (numba compilation, page cache), then --repeats timed epochs, interleaved
round-robin across loaders so that drift on a shared machine hits all of them alike. The figure
is the median images/s; a batch counts when it is a float tensor in [0, 1] on the target device
(torch.cuda.synchronize inside the timed region on a GPU).

    python benchmarks/loader_throughput.py                       # CPU defaults
    python benchmarks/loader_throughput.py --images 8000 --workers 16 --res 224
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fasttricks.data.beton import BetonOptions, build_beton
from fasttricks.data.loader import TrainLoader

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, machine_tag, make_jpeg_folder  # noqa: E402


def ffcv_seeded(beton, args, device):
    loader = TrainLoader(beton, batch_size=args.batch_size, resolution=args.res, seed=0, device=device,
                         workers=args.workers)
    epoch = iter(range(10**6))
    return lambda: loader.epoch(next(epoch), args.res)


def ffcv_stock(beton, args, device):
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage

    to_dev = [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []
    loader = Loader(str(beton), batch_size=args.batch_size, num_workers=args.workers, order=OrderOption.RANDOM,
                    drop_last=True, seed=0, os_cache=True,
                    pipelines={"image": [RandomResizedCropRGBImageDecoder((args.res, args.res)),
                                         RandomHorizontalFlip(), ToTensor(), *to_dev,
                                         ToTorchImage(channels_last=True)],
                               "label": [IntDecoder(), ToTensor(), Squeeze(), *to_dev]})

    def epoch():
        for images, labels in loader:
            yield images.float().div_(255), labels.long()
    return epoch


def torchvision_loader(folder, args, device):
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomResizedCrop(args.res), transforms.RandomHorizontalFlip(),
                             transforms.PILToTensor()])
    ds = datasets.ImageFolder(str(folder), transform=tf)
    dl = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                     num_workers=args.workers, pin_memory=device.type == "cuda",
                                     persistent_workers=True, prefetch_factor=4)

    def epoch():
        for images, labels in dl:
            images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            yield images.float().div_(255), labels.to(device, non_blocking=True)
    return epoch


def time_epoch(make_epoch, device) -> tuple[float, int]:
    start, seen = time.perf_counter(), 0
    for images, _ in make_epoch():
        seen += images.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, seen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", type=int, default=256, help="side of the stored images")
    p.add_argument("--res", type=int, default=160, help="training resolution (crop output)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None, help="JSON path; default results/loader_throughput-<machine>.json")
    args = p.parse_args()
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory(prefix="fasttricks-bench-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        folder = make_jpeg_folder(tmp / "images", args.images, args.size)
        beton = tmp / "train.beton"
        build_beton(folder, beton, BetonOptions(write_mode="jpg", jpeg_quality=90, workers=args.workers),
                    show_progress=False)
        print(f"prepared {args.images} images in {time.perf_counter() - t:.0f} s")
        loaders = {"ffcv_seeded (ours)": ffcv_seeded(beton, args, device),
                   "ffcv_stock": ffcv_stock(beton, args, device),
                   "torchvision": torchvision_loader(folder, args, device)}
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        for make_epoch in loaders.values():
            time_epoch(make_epoch, device)  # warm-up: compilation, page cache, worker start
        for _ in range(args.repeats):
            for name, make_epoch in loaders.items():
                seconds, seen = time_epoch(make_epoch, device)
                rates[name].append(seen / seconds)
                print(f"  {name:<20} {seen / seconds:8.0f} img/s")

    median = {name: statistics.median(r) for name, r in rates.items()}
    result = {
        "question": "images/s of the training loader, FFCV vs torchvision, same images and augmentation",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "images_per_s_median": {k: round(v, 1) for k, v in median.items()},
        "images_per_s_all": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "ratio_ffcv_seeded_to_torchvision": round(median["ffcv_seeded (ours)"] / median["torchvision"], 2),
        "ratio_ffcv_seeded_to_ffcv_stock": round(median["ffcv_seeded (ours)"] / median["ffcv_stock"], 3),
        "machine": machine(device),
    }
    out = args.out or RESULTS / f"loader_throughput-{machine_tag(device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("images_per_s_median", "ratio_ffcv_seeded_to_torchvision",
                                              "ratio_ffcv_seeded_to_ffcv_stock")}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
