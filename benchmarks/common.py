"""What the benchmarks share: photo-like JPEG folders, the method's timer, the machine record."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fasttricks.data.toy import CLASSES, ToyOptions, render
from fasttricks.runs.folder import environment

RESULTS = Path(__file__).parent / "results"


def _write_one(job: tuple[Path, int, int]) -> None:
    root, i, size = job
    label = i % len(CLASSES)
    small = Image.fromarray(render(label, "train", i, ToyOptions(size=64)))
    big = np.asarray(small.resize((size, size), Image.BICUBIC))
    noisy = np.clip(big + np.random.default_rng(i).normal(0, 8, big.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(root / CLASSES[label] / f"{i:06d}.jpg", quality=90)


def make_jpeg_folder(root: Path, n: int, size: int) -> Path:
    """Toy renders upscaled to ``size`` with sensor-like noise, so that the JPEGs carry about the
    entropy of photographs (decode cost follows it) at a fraction of the rendering time."""
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    with Pool(os.cpu_count()) as pool:
        pool.map(_write_one, [(root, i, size) for i in range(n)], chunksize=64)
    return root


def timed(fn: Callable[[], int], device: torch.device) -> float:
    """Images per second of ``fn`` (which returns how many images it processed), the device
    synchronised inside the timed region."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    n = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def machine(device: torch.device) -> dict:
    return {**environment(), "processor": cpu_model(), "device": str(device)}


def machine_tag(device: torch.device) -> str:
    return torch.cuda.get_device_name().replace(" ", "-") if device.type == "cuda" else f"cpu{os.cpu_count()}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()
