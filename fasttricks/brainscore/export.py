"""``fasttricks brainscore export``: a trained model as a brainscore_vision model plugin folder.

Layout (brainscore_vision's): ``__init__.py`` registers a ``ModelCommitment`` lazily in
``model_registry`` (a literal ``model_registry['ID'] = lambda: ...`` line: Brain-Score finds
plugins by scanning for it), ``model.py`` (``get_model``, ``get_layers``, ``get_bibtex``; a copy of
``plugin_model.py``), ``model.json`` (what model.py reads), ``test.py``, ``requirements.txt``
(pinned to the versions that trained the model), ``weights.safetensors`` and, when given,
``region_layer_map/ID.json``. Nothing in the folder imports fasttricks.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import yaml

from fasttricks.atomic import make_folder
from fasttricks.brainscore.layers import candidate_layers, default_region_map, readout_layer
from fasttricks.errors import OutputUnusable, UserError
from fasttricks.models.factory import patch_size
from fasttricks.models.weights import WeightsError, read_info, weights_file
from fasttricks.progress import console

PLUGIN_MODEL = Path(__file__).with_name("plugin_model.py")
WEIGHTS_NAME = "weights.safetensors"
REGIONS = ("V1", "V2", "V4", "IT")
# What the plugin's model.py imports, as Brain-Score plugins list it: names, with a bound only where
# a feature needs one (timm's registry names, numpy<2 as brainscore_vision itself). Exact pins of
# this machine's builds would make Brain-Score reinstall torch, or fail; the versions the model was
# exported with are recorded in model.json instead.
REQUIREMENTS = {"torch": "", "timm": ">=1.0.9", "safetensors": ">=0.4", "numpy": "<2", "pillow": "",
                "opencv-python-headless": ""}


class ExportError(UserError, ValueError):
    """A run or an option that cannot be exported; the message names it."""


def find_weights(source: Path) -> tuple[Path, dict]:
    """(weights file, summary or {}) of a run folder, a checkpoint folder or a weights file."""
    try:
        weights = weights_file(source)
    except WeightsError as e:
        raise ExportError(str(e)) from None
    summary = weights.parent / "summary.json"
    return weights, json.loads(summary.read_text()) if source.is_dir() and summary.is_file() else {}


def identifier_for(info: dict, run_name: str, resize: int, crop: int, given: str | None = None) -> str:
    """A Brain-Score identifier that names the resolution (activations are cached per identifier:
    two resolutions under one name would reuse each other's). Default: fasttricks, recipe, model,
    run, resolution."""
    suffix = f"{resize}x{crop}"
    base = given or "-".join(p for p in ("fasttricks", info.get("recipe"), info["arch"], run_name) if p)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-").lower()
    if not name:
        raise ExportError(f"--identifier {given!r} has no usable character (letters, digits, _ . -)")
    return name if name.endswith(suffix) else f"{name}-{suffix}"


def run_folder(source: Path) -> Path:
    """The folder a run, checkpoint folder or weights file belongs to (named in identifiers)."""
    return source if source.is_dir() else source.parent


def parse_regions(pairs: list[str], layers: list[str]) -> dict[str, str]:
    """``V1=blocks.3.0`` pairs as a region→layer map, checked against the regions Brain-Score scores
    and the exported layers."""
    mapping = {}
    for pair in pairs:
        region, sep, layer = pair.partition("=")
        if not sep or region not in REGIONS:
            raise ExportError(f"--region expects REGION=LAYER with REGION one of {', '.join(REGIONS)}, not {pair!r}")
        if layer not in layers:
            raise ExportError(f"--region {pair}: {layer!r} is not one of the exported layers ({', '.join(layers)})")
        mapping[region] = layer
    return mapping


def versions() -> dict[str, str]:
    found = {}
    for package in REQUIREMENTS:
        try:
            found[package] = metadata.version(package).split("+")[0]  # drop local tags such as +cu130
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def export(source: Path, out: Path, *, identifier: str | None = None, regions: list[str] = (),
           region_map: bool = True, overwrite: bool = False, size: tuple[int, int] | None = None) -> dict:
    """Write the plugin folder ``out`` (atomically: a temporary folder renamed); returns model.json.
    The region map is the default one (``layers.default_region_map``) with ``regions`` over it;
    ``region_map=False`` writes none, leaving layer selection to Brain-Score (which needs its data).
    ``size`` (resize, crop) sets the test size; default: the model's (FixRes' choice when it made one)."""
    weights, summary = find_weights(source)
    try:
        info = read_info(weights)
    except WeightsError as e:
        raise ExportError(str(e)) from None
    if out.exists() and not out.is_dir():
        raise OutputUnusable(f"{out} is a file, not a folder: choose another --out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; pass --overwrite to replace it")
    net = _network(info)
    layers = candidate_layers(net)
    resize, crop = size or (info["val_resize"], info["val_crop"])
    info = {**info, "val_resize": resize, "val_crop": crop}  # (the metadata names the exported size)
    name = identifier_for(info, run_folder(source).resolve().name, resize, crop, identifier)
    config = {"identifier": name, "arch": info["arch"], "num_classes": info["num_classes"], "weights": WEIGHTS_NAME,
              "weights_sha1": sha1(weights), "resize": resize, "crop": crop, "mean": info["mean"], "std": info["std"],
              "layers": layers, "behavioral_readout_layer": readout_layer(net), "batch_size": 64,
              # a ViT takes the exported size with its position embedding resized, as in training
              "create_kwargs": {"dynamic_img_size": True} if patch_size(net) > 1 else {},
              "source": {"weights": str(weights.resolve()), "recipe": info.get("recipe"),
                         "fixres": info.get("fixres"), "frozen": info.get("frozen", []),
                         "summary": {k: v for k, v in summary.items() if k.endswith(("_top1", "attack"))},
                         "exported_with": versions()}}
    mapping, how = default_region_map(info["arch"], net) if region_map else ({}, "none: Brain-Score chooses")
    given = parse_regions(list(regions), layers)
    if given and not region_map:
        raise ExportError("--region and --no-region-map contradict each other; give one")
    config["region_layer_map"] = {**mapping, **given}
    config["region_layer_map_source"] = how + (f"; given: {', '.join(given)}" if given else "")
    shared = _shared_layers(config["region_layer_map"])
    if shared:  # allowed (Brain-Score scores each region on its own), but rarely what was meant
        console.print(f"[yellow]region map: {shared} (one layer stands for several regions)", soft_wrap=True)
        config["region_layer_map_source"] += f"; shared layers: {shared}"
    config["regions_given"] = given  # a later export without --region must not re-use this folder
    _write_folder(out, config, weights, config["region_layer_map"], overwrite, plugin_metadata(net, info, name))
    return config


def _shared_layers(mapping: dict[str, str]) -> str:
    """``V1 and V2 on blocks.3`` for every layer that more than one region maps to, else ''."""
    by_layer: dict[str, list[str]] = {}
    for region, layer in mapping.items():
        by_layer.setdefault(layer, []).append(region)
    return "; ".join(f"{' and '.join(regions)} on {layer}" for layer, regions in by_layer.items() if len(regions) > 1)


def plugin_metadata(net, info: dict, identifier: str) -> dict:
    """``metadata.yaml`` as plugins write it: Brain-Score's own fields, computed by its own code
    (``VisionDomainPlugin.create_model_metadata``), with what we know of the training added."""
    from brainscore_vision.plugin_management.vision_domain_plugin import VisionDomainPlugin

    class _Offline(VisionDomainPlugin):
        def get_huggingface_link(self, model_name):  # an export makes no network request
            return None

    fields = _Offline().create_model_metadata(net, f"{identifier}-{info['arch']}", identifier)
    frozen = info.get("frozen") or []
    fields["training_dataset"] = info.get("training_data") or info.get("data")  # (older runs: the folder name)
    fields["extra_notes"] = (f"trained with fasttricks, recipe {info.get('recipe')}; tested at resize "
                             f"{info['val_resize']} / crop {info['val_crop']}"
                             + (f"; frozen in the last stage: {frozen[0]} ... {frozen[-1]}" if frozen else ""))
    return {"models": {identifier: fields}}


def _network(info: dict):
    import timm

    return timm.create_model(info["arch"], pretrained=False, num_classes=info["num_classes"])


def sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the filesystem allows one: a FixRes sweep by a benchmark exports the same
    weights once per test size. Safe because weights files are only ever replaced by a rename
    (``atomic``), never rewritten in place, so a link keeps the bytes it was made with."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _write_folder(out: Path, config: dict, weights: Path, region_map: dict, overwrite: bool,
                  meta: dict) -> None:
    make_folder(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        name = config["identifier"]
        _link_or_copy(weights, tmp / WEIGHTS_NAME)
        shutil.copyfile(PLUGIN_MODEL, tmp / "model.py")
        (tmp / "model.json").write_text(json.dumps(config, indent=1) + "\n")
        (tmp / "__init__.py").write_text(_INIT.format(name=name))
        (tmp / "test.py").write_text(_TEST.format(name=name))
        (tmp / "requirements.txt").write_text(
            "".join(f"{p}{bound}\n" for p, bound in REQUIREMENTS.items()))
        (tmp / "metadata.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
        if region_map:
            (tmp / "region_layer_map").mkdir()
            (tmp / "region_layer_map" / f"{name}.json").write_text(json.dumps(region_map, indent=1) + "\n")
        if out.exists():
            if not overwrite:
                raise ExportError(f"{out} appeared while exporting; nothing was replaced")
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_INIT = '''"""Brain-Score plugin written by fasttricks: {name}."""

from brainscore_vision import model_registry
from brainscore_vision.model_helpers.brain_transformation import ModelCommitment

from .model import behavioral_readout_layer, get_layers, get_model, region_layer_map

model_registry['{name}'] = lambda: ModelCommitment(
    identifier='{name}', activations_model=get_model('{name}'), layers=get_layers('{name}'),
    behavioral_readout_layer=behavioral_readout_layer('{name}'), region_layer_map=region_layer_map('{name}'))
'''

_TEST = '''import numpy as np
import pytest
from PIL import Image

import brainscore_vision


@pytest.mark.travis_slow
def test_has_identifier():
    model = brainscore_vision.load_model('{name}')
    assert model.identifier == '{name}'


def test_activations_of_the_readout_layer(tmp_path):
    from .model import get_layers, get_model

    path = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(path)
    layer = get_layers('{name}')[-1]
    activations = get_model('{name}')([str(path)], layers=[layer])
    assert activations.shape[0] == 1 and np.isfinite(activations.values).all()
'''
