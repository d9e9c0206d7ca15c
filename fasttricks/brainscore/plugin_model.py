"""A Brain-Score model plugin written by fasttricks (``fasttricks brainscore export``).

This file is copied as the plugin's ``model.py`` and must stay self-contained: Brain-Score's
servers install only ``requirements.txt`` (torch, timm, safetensors, numpy, pillow,
opencv-python-headless), never fasttricks. ``model.json`` beside it names the timm architecture,
the weights file and its sha1, the test-time preprocessing and the candidate layers.

Preprocessing is the one fasttricks evaluated the model with, not brainscore's
``load_preprocess_images`` (which squashes the whole image to a square): EXIF orientation
applied and transparency composited on white (as ``build-beton`` stores images), the centred
square of crop/resize of the short side, resized to crop x crop with OpenCV's area interpolation
(FFCV's), scaled to [0, 1] and normalised with the architecture's mean and std.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import timm
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
CONFIG = json.loads((HERE / "model.json").read_text())

BIBTEX = """@misc{riedel2022bag,
  title={Bag of Tricks for Training Brain-Like Deep Neural Networks},
  author={Riedel, Alexander},
  note={Brain-Score competition 2022, winning entry},
  year={2022}
}"""


def load_image(path: str | Path) -> np.ndarray:
    """8-bit RGB (H, W, 3)."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # scientific stimuli: stretch to 8 bits
            arr = np.asarray(img, dtype=np.float32)
            lo, hi = float(arr.min()), float(arr.max())
            img = Image.fromarray(((arr - lo) * (255.0 / (hi - lo)) if hi > lo else arr * 0).astype(np.uint8), "L")
        if img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
            img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
        return np.asarray(img.convert("RGB"))


def centre_crop(image: np.ndarray, resize: int, crop: int) -> np.ndarray:
    """Resize the short side to ``resize`` and take the centred ``crop`` square, done as one
    resampling of the centred square of crop/resize of the short side."""
    height, width = image.shape[:2]
    side = max(1, crop * min(height, width) // resize)
    top, left = (height - side) // 2, (width - side) // 2
    square = np.ascontiguousarray(image[top:top + side, left:left + side])
    return cv2.resize(square, (crop, crop), interpolation=cv2.INTER_AREA)


def preprocess(paths, resize: int | None = None, crop: int | None = None) -> np.ndarray:
    """Images as a normalised float32 batch (N, 3, crop, crop)."""
    resize, crop = resize or CONFIG["resize"], crop or CONFIG["crop"]
    mean = np.asarray(CONFIG["mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(CONFIG["std"], dtype=np.float32)[:, None, None]
    batch = [centre_crop(load_image(p), resize, crop).astype(np.float32).transpose(2, 0, 1) / 255.0 for p in paths]
    return ((np.stack(batch) - mean) / std).astype(np.float32)


def build_network() -> torch.nn.Module:
    """The timm network with the exported weights, in eval mode; a corrupted or replaced weights
    file is refused."""
    weights = HERE / CONFIG["weights"]
    digest = hashlib.sha1(weights.read_bytes()).hexdigest()
    if digest != CONFIG["weights_sha1"]:
        raise RuntimeError(f"{weights}: sha1 {digest} does not match model.json's {CONFIG['weights_sha1']}")
    net = timm.create_model(CONFIG["arch"], pretrained=False, num_classes=CONFIG["num_classes"],
                            **CONFIG.get("create_kwargs", {}))
    net.load_state_dict(load_file(str(weights)))
    return net.eval()


def _check(name: str) -> None:
    if name != CONFIG["identifier"]:
        raise ValueError(f"this plugin holds {CONFIG['identifier']!r}, not {name!r}")


@functools.lru_cache(maxsize=1)
def get_model(name: str):
    """brainscore_vision's ``PytorchWrapper`` around the network, with our preprocessing."""
    from brainscore_vision.model_helpers.activations.pytorch import PytorchWrapper

    _check(name)
    wrapper = PytorchWrapper(identifier=name, model=build_network(), preprocessing=preprocess,
                             batch_size=CONFIG.get("batch_size", 64))
    wrapper.image_size = CONFIG["crop"]
    return wrapper


def get_layers(name: str) -> list[str]:
    _check(name)
    return list(CONFIG["layers"])


def behavioral_readout_layer(name: str) -> str:
    _check(name)
    return CONFIG["behavioral_readout_layer"]


def region_layer_map(name: str) -> dict | None:
    """``region_layer_map/<name>.json`` when the export was given one; None lets Brain-Score
    choose layers by scoring its public benchmarks."""
    _check(name)
    path = HERE / "region_layer_map" / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def get_bibtex(name: str) -> str:
    _check(name)
    return BIBTEX
