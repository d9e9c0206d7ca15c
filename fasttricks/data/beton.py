"""ImageFolder → FFCV ``.beton`` (RGB image + int label), with a manifest beside it.

Real folders are dirty. Every file is checked before FFCV sees it, because an exception inside an
FFCV writer process leaves the writer waiting forever for a sample that never comes: grayscale,
CMYK, palette, 16-bit and alpha images are converted to RGB; empty, truncated and non-image files
are skipped, each with its reason in the manifest. The beton is written under a temporary name
and renamed, so ``OUT`` is either complete or absent.
"""

from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from fasttricks.atomic import atomic_path, make_folder, write_json
from fasttricks.data.manifest import BuildError, Manifest, manifest_path, read_manifest
from fasttricks.progress import progress_bar

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif"}
WRITE_MODES = ("raw", "jpg", "proportion", "smart")


@dataclass
class BetonOptions:
    max_res: int | None = None
    jpeg_quality: int = 90
    compress_probability: float = 0.5
    write_mode: str = "proportion"
    workers: int = 0  # 0: one per core
    limit: int | None = None
    seed: int = 0  # which files --limit keeps
    classes_from: str | None = None  # a beton whose manifest's class list defines the ids
    smart_threshold: int = 256 * 256 * 3  # write_mode smart: images with more raw bytes are stored as JPEG
    shuffle: bool = False  # write in a seeded random order (what data.order quasi_random needs)

    def validate(self) -> None:
        if self.write_mode not in WRITE_MODES:
            raise BuildError(f"--write-mode must be one of {', '.join(WRITE_MODES)}, not {self.write_mode!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise BuildError(f"--jpeg-quality must be in 1..100, not {self.jpeg_quality}")
        if not 0 <= self.compress_probability <= 1:
            raise BuildError(f"--compress-probability must be in [0, 1], not {self.compress_probability}")
        if self.max_res is not None and self.max_res < 8:
            raise BuildError(f"--max-res must be at least 8 pixels, not {self.max_res}")
        if self.limit is not None and self.limit < 1:
            raise BuildError(f"--limit must be positive, not {self.limit}")


# ---------------------------------------------------------------------------------------------
# Reading one file

def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: alpha composited on white, 16-bit/float scaled, EXIF turned."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB")


FFCV_MAX_SIDE = 65535  # FFCV stores heights and widths as uint16


def check_image(path: Path, max_res: int | None = None) -> str | None:
    """None if ``path`` decodes and converts to RGB as the write will, else why not.

    JPEGs are decoded in draft mode (DCT scaling, several times faster): the whole entropy-coded
    stream is still read, so truncation is still caught, and the conversion to RGB that the write
    applies runs on the same mode, so a file it would fail on is skipped here instead of aborting
    the build.
    """
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with Image.open(path) as img:
            width, height = img.size
            if width < 1 or height < 1:
                return "zero-sized image"
            scale = 1.0 if max_res is None else min(1.0, max_res / max(width, height))
            if max(width, height) * scale > FFCV_MAX_SIDE:
                return f"side of {max(width, height)} px: FFCV stores at most {FFCV_MAX_SIDE}; set --max-res"
            if int(min(width, height) * scale) < 1:  # FFCV's resize would fail in a writer process, and hang
                return f"{width}x{height} px is less than one pixel thick after --max-res {max_res}"
            img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            img.load()
            to_rgb(img)
        return None
    except Image.DecompressionBombError as e:
        return f"too large: {e}"
    except OSError as e:  # PIL raises OSError subclasses for unknown formats and truncation
        msg = str(e)
        return "not an image" if "cannot identify image file" in msg else f"unreadable: {msg}"
    except Exception as e:  # a decoder bug on a hostile file must not stop a 1.2M-image build
        return f"unreadable: {type(e).__name__}: {e}"


def load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(to_rgb(img), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# Scanning a folder

SPLIT_NAMES = {"train", "val", "validation", "val_clutter", "test"}


def scan_image_folder(src: Path, classes: list[str] | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes and (relative path, label) for every image-like file. The classes are ``src``'s
    sorted folder names, or ``classes`` (another split's list, so that ids agree): then a folder
    may lack some of them, and a folder not in the list is an error."""
    if not src.is_dir():
        raise BuildError(f"{src} is not a folder")
    folders = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise BuildError(f"{src} has no class folders: expected SRC/<class>/<image> (ImageNet layout)")
    splits = [f for f in folders if f in SPLIT_NAMES]
    if splits and (len(splits) >= 2 or len(splits) == len(folders)):
        raise BuildError(f"{src} holds split folders ({', '.join(splits)}), not class folders: build each split on "
                         f"its own, e.g. `fasttricks build-beton {src / splits[0]} OUT/{splits[0]}.beton`")
    if classes is None:
        classes = folders
    else:
        unknown = [f for f in folders if f not in set(classes)]
        if unknown:
            raise BuildError(f"{src}: class folder(s) {', '.join(unknown[:8])} are not in the --classes-from list "
                             f"of {len(classes)} classes")
    samples = []
    for label, name in enumerate(classes):
        if not (src / name).is_dir():
            continue  # a split that lacks a class keeps every other class's id
        for root, dirs, files in os.walk(src / name):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for f in sorted(files):
                if Path(f).suffix.lower() in IMAGE_EXTENSIONS and not f.startswith("."):
                    samples.append((str(Path(root, f).relative_to(src)), label))
    if not samples:
        raise BuildError(f"{src} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return list(classes), samples


def _limit(samples: list, limit: int | None, seed: int) -> list:
    """A seeded random subset in folder order, so every class keeps its share."""
    if limit is None or limit >= len(samples):
        return samples
    keep = np.sort(np.random.default_rng(seed).choice(len(samples), size=limit, replace=False))
    return [samples[i] for i in keep]


class _FolderDataset:
    """What FFCV's writer indexes. Never raises: a file that fails now (it changed since the check)
    is written as a grey placeholder and reported through a marker file, and the build then fails."""

    def __init__(self, src: Path, samples: list[tuple[str, int]], failures: Path):
        self.src, self.samples, self.failures = src, samples, failures

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        # FFCV's 'proportion' mode draws JPEG-or-raw from np.random in forked workers; seeding by
        # index makes that choice (and so the beton's bytes) the same on every build.
        np.random.seed(i % 2**32)
        rel, label = self.samples[i]
        try:
            return load_rgb(self.src / rel), label
        except Exception as e:
            (self.failures / str(i)).write_text(f"{rel}: {type(e).__name__}: {e}")
            return np.full((8, 8, 3), 128, np.uint8), label


def build_beton(src: str | os.PathLike, out: str | os.PathLike, opts: BetonOptions = BetonOptions(),
                *, overwrite: bool = False, show_progress: bool = True) -> Manifest:
    """Compile the ImageFolder ``src`` into ``out`` and write ``out.json``; return the manifest."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    src, out = Path(src), Path(out)
    opts.validate()
    if not src.exists():
        raise BuildError(f"SRC {src} does not exist")
    if out.exists() and not overwrite:
        raise BuildError(f"{out} exists; pass --overwrite to replace it")
    make_folder(out.parent)
    start = time.time()
    classes, samples = scan_image_folder(src, _classes_from(opts.classes_from))
    source_images = len(samples)
    samples = _limit(samples, opts.limit, opts.seed)
    if opts.shuffle:  # the manifest's file list follows, so index i still names its file
        samples = [samples[i] for i in np.random.default_rng([opts.seed, 0x5F]).permutation(len(samples))]
    workers = opts.workers or os.cpu_count() or 1

    good, skipped = _check_all(src, samples, workers, show_progress, opts.max_res)
    if not good:
        raise BuildError(f"no readable image in {src}: all {len(skipped)} files were skipped "
                         f"(first: {skipped[0]['file']}: {skipped[0]['reason']})")

    fields = {"image": RGBImageField(write_mode=opts.write_mode, max_resolution=opts.max_res,
                                     jpeg_quality=opts.jpeg_quality,
                                     compress_probability=opts.compress_probability,
                                     smart_threshold=opts.smart_threshold),
              "label": IntField()}
    with tempfile.TemporaryDirectory(prefix="fasttricks-failures-") as failures, atomic_path(out) as tmp:
        writer = DatasetWriter(str(tmp), fields, num_workers=workers)
        with _writer_progress(f"writing {out.name} ({workers} workers)", len(good), show_progress):
            writer.from_indexed_dataset(_FolderDataset(src, good, Path(failures)),
                                        chunksize=max(1, min(100, len(good) // workers)))
        failed = sorted(Path(failures).iterdir(), key=lambda p: int(p.name))
        if failed:
            first = "; ".join(p.read_text() for p in failed[:3])
            raise BuildError(f"{len(failed)} file(s) in {src} failed while being written "
                             f"(did they change during the build?): {first}")
        summed = time.time()
        checksums, images_size = compute_checksums(tmp, show_progress=show_progress, name=out.name)
        manifest = Manifest(source=str(src.resolve()), beton=str(out.resolve()), classes=classes,
                            images=len(good), source_images=source_images, beton_bytes=tmp.stat().st_size,
                            files=[rel for rel, _ in good], skipped=skipped,
                            options=asdict(opts), seconds=round(time.time() - start, 2),
                            image_bytes=images_size, checksum_algorithm=_checksum_algorithm(), checksums=checksums,
                            checksum_seconds=round(time.time() - summed, 2))
    write_json(manifest_path(out), asdict(manifest), indent=1)
    return manifest


@contextmanager
def _writer_progress(label: str, total: int, enabled: bool):
    """FFCV's writer draws its own tqdm bar, which interleaves with rich's output and cannot be
    turned off; it has no progress hook either. So, for the write only, its ``tqdm`` name is
    pointed at a small stand-in that advances our rich bar (or nothing, without progress)."""
    import ffcv.writer

    with progress_bar(label, total, enabled=enabled) as advance:
        class _Bar:
            def __init__(self, total=None, **_):
                pass

            def update(self, n=1):
                advance(n)

            def close(self):
                pass

        original, ffcv.writer.tqdm = ffcv.writer.tqdm, _Bar
        try:
            yield
        finally:
            ffcv.writer.tqdm = original


def _checksum_algorithm() -> str:
    from fasttricks.data.checksums import ALGORITHM

    return ALGORITHM


def compute_checksums(path: Path, *, show_progress: bool, name: str) -> tuple[list[int], int]:
    # imported here: data/checksums.py reads manifests through this module
    from fasttricks.data.checksums import compute

    return compute(path, show_progress=show_progress, name=name)


def _classes_from(beton: str | None) -> list[str] | None:
    if beton is None:
        return None
    if not manifest_path(beton).is_file():
        raise BuildError(f"--classes-from {beton}: no manifest {manifest_path(beton)} (give a beton made by "
                         f"`fasttricks build-beton`, normally the train split's)")
    return read_manifest(beton)["classes"]


def _check_all(src: Path, samples: list, workers: int, show_progress: bool,
               max_res: int | None = None) -> tuple[list, list]:
    good, skipped = [], []
    # Threads suffice: PIL releases the GIL while decoding.
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            progress_bar(f"checking {src.name}", len(samples), enabled=show_progress) as advance:
        reasons = pool.map(lambda s: check_image(src / s[0], max_res), samples)
        for (rel, label), reason in zip(samples, reasons, strict=True):
            if reason is None:
                good.append((rel, label))
            else:
                skipped.append({"file": rel, "reason": reason})
            advance(1)
    return good, skipped
