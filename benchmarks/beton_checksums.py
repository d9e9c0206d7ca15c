"""What do a beton's per-image checksums cost? The time `build-beton` spends computing them, and a
full `verify-beton`, each as a ratio to the build's own time (checking, converting and writing),
measured in one process on the same photo-like JPEG folder.

    python benchmarks/beton_checksums.py                      # 2,000 images of 256 px, JPEG betons
    python benchmarks/beton_checksums.py --images 8000 --size 320
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from fasttricks.atomic import write_json
from fasttricks.data.beton import BetonOptions, build_beton
from fasttricks.data.checksums import damaged

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, machine_tag, make_jpeg_folder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_jpeg_folder(Path(tmp) / "images", args.images, args.size)
        beton = Path(tmp) / "train.beton"
        m = build_beton(folder, beton, BetonOptions(write_mode="jpg", workers=args.workers), show_progress=False)
        start = time.perf_counter()
        assert damaged(beton) == []
        verify = time.perf_counter() - start
    build = m.seconds - m.checksum_seconds
    result = {"images": m.images, "size": args.size, "beton_bytes": m.beton_bytes, "build_seconds": build,
              "checksum_seconds": m.checksum_seconds, "verify_seconds": round(verify, 3),
              "checksum_over_build": round(m.checksum_seconds / build, 4),
              "verify_over_build": round(verify / build, 4), "machine": machine(torch.device("cpu"))}
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    write_json(RESULTS / f"beton_checksums-{machine_tag(torch.device('cpu'))}.json", result)


if __name__ == "__main__":
    main()
