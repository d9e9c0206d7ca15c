"""Using an export here: activations on local images and benchmark scores, both through
brainscore_vision itself (its ``PytorchWrapper``, ``ModelCommitment`` and ``load_benchmark``), on
the exported plugin folder, so that what is checked is what Brain-Score will run.

A run is exported once into ``RUN/brainscore/<identifier>/`` and re-used while its weights, test
size and region map (the default one) are unchanged.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np

from fasttricks.atomic import atomic_path, write_json
from fasttricks.brainscore.export import ExportError, export, find_weights, identifier_for, run_folder, sha1
from fasttricks.errors import InputMissing, UserError
from fasttricks.models.weights import read_info

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


class BrainScoreError(UserError, RuntimeError):
    """Scoring could not run; the message says what is missing and where it goes."""


def plugin_for(source: Path, regions: list[str] = (), size: tuple[int, int] | None = None) -> Path:
    """The plugin folder of a run (exported on first use, and again when ``regions`` are given),
    or ``source`` itself when it is one. ``size`` (resize, crop) exports at that test size, into a
    folder of its own (the identifier names the size)."""
    if (source / "model.json").is_file() and (source / "__init__.py").is_file():
        if regions or size:
            raise ExportError(f"{source} is an exported plugin: give --region or the test size to "
                              f"`brainscore export` instead")
        return source
    weights, _ = find_weights(source)
    info = read_info(weights)
    run = run_folder(source)
    resize, crop = size or (info["val_resize"], info["val_crop"])
    name = identifier_for(info, run.resolve().name, resize, crop)
    folder = run / "brainscore" / name
    config = folder / "model.json"
    if regions or not _reusable(config, weights):
        export(source, folder, regions=list(regions), overwrite=True, size=size)
    return folder


def _reusable(config: Path, weights: Path) -> bool:
    """An earlier export of these weights with the default region map (one made with --region maps
    other layers to the regions, and its scores would not be the default export's)."""
    if not config.is_file():
        return False
    saved = json.loads(config.read_text())
    return saved["weights_sha1"] == sha1(weights) and saved.get("regions_given") == {}


def load_plugin(folder: Path):
    """Import the plugin's model.py as its own module (not through fasttricks)."""
    module_name = f"_fasttricks_plugin_{abs(hash(str(folder.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, folder / "model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def image_files(items: list[Path]) -> list[Path]:
    files = []
    for item in items:
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            files.append(item)
        else:
            raise InputMissing(f"{item} does not exist")
    if not files:
        raise InputMissing(f"no image in {', '.join(map(str, items))} ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def activations(source: Path, images: list[Path], layers: list[str] | None, out: Path) -> dict:
    """Activations of ``layers`` (default: the read-out) for local images through brainscore's
    ``PytorchWrapper``; saved as ``out`` (.npz: one array per layer, rows = images, plus the
    image paths). Returns {layer: shape}."""
    plugin = load_plugin(plugin_for(source))
    name = plugin.CONFIG["identifier"]
    layers = layers or [plugin.behavioral_readout_layer(name)]
    wrapper = plugin.get_model(name)
    # any named module can be read (the stem, say), not only the layers the export offers Brain-Score
    modules = {n for n, _ in wrapper._model.named_modules() if n}
    unknown = [layer for layer in layers if layer not in modules]
    if unknown:
        raise ExportError(f"--layers: {', '.join(unknown)} is not a module of the network; for example "
                          f"{', '.join(plugin.get_layers(name)[:6])} ... (any name of net.named_modules())")
    files = [str(p) for p in image_files(images)]
    assembly = wrapper(files, layers=layers)
    arrays = {layer: np.asarray(assembly.sel(layer=layer).values) for layer in layers}
    order = [str(p) for p in assembly["stimulus_path"].values]
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.savez(f, stimulus_paths=np.asarray(order), layers=np.asarray(layers), **arrays)
    return {layer: list(a.shape) for layer, a in arrays.items()}


def load_benchmark(benchmark: str):
    """The brainscore_vision benchmark, its data loaded (downloaded on first use); a clear
    ``BrainScoreError`` when it cannot be."""
    # brainscore would otherwise `pip install` the benchmark's requirements into this environment
    # (which can change the versions this model was trained with); BS_INSTALL_DEPENDENCIES=yes restores that.
    os.environ.setdefault("BS_INSTALL_DEPENDENCIES", "no")
    try:
        from brainscore_vision import load_benchmark as load

        return load(benchmark)
    except Exception as e:  # brainio/boto/result_caching raise many kinds; all end here
        raise BrainScoreError(_explain(benchmark, e)) from None


def commitment(folder: Path):
    """The plugin's ``ModelCommitment``. Its activations are cached (result_caching) under the
    identifier and the weights' sha1: the identifier alone names a run folder and a size, so a
    run trained again in the same folder would otherwise be scored on its old activations."""
    from brainscore_vision.model_helpers.brain_transformation import ModelCommitment

    plugin = load_plugin(folder)
    name = plugin.CONFIG["identifier"]
    wrapper = plugin.get_model(name)
    wrapper.identifier = f"{name}-sha1-{plugin.CONFIG['weights_sha1'][:12]}"
    return ModelCommitment(identifier=wrapper.identifier, activations_model=wrapper, layers=plugin.get_layers(name),
                           behavioral_readout_layer=plugin.behavioral_readout_layer(name),
                           region_layer_map=plugin.region_layer_map(name))


def score(source: Path, benchmark: str, regions: list[str] = (), *, size: tuple[int, int] | None = None,
          loaded=None) -> dict:
    """Score the exported commitment on a brainscore_vision benchmark, in this process (at the test
    ``size`` when given; ``loaded``: the benchmark object, when the caller scores several sizes);
    the result is appended to ``RUN/brainscore/scores.json``."""
    folder = plugin_for(source, regions, size)
    loaded = loaded if loaded is not None else load_benchmark(benchmark)
    try:
        model = commitment(folder)
        result = loaded(model)
    except Exception as e:
        raise BrainScoreError(_explain(benchmark, e)) from None
    config = json.loads((folder / "model.json").read_text())
    record = {"benchmark": benchmark, "identifier": config["identifier"], "resize": config["resize"],
              "crop": config["crop"], "weights_sha1": config["weights_sha1"],
              "score": float(np.asarray(result).ravel()[0]),
              "attrs": {k: _plain(v) for k, v in result.attrs.items() if not k.startswith("raw")},
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    scores = folder.parent / "scores.json"
    previous = json.loads(scores.read_text()) if scores.is_file() else []
    write_json(scores, [*previous, record])
    return record


def _plain(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)


def _explain(benchmark: str, error: Exception) -> str:
    if "No registrations found" in str(error):
        return (f"no benchmark {benchmark!r} in brainscore_vision (public ones: FreemanZiemba2013public.V1-pls, "
                f"FreemanZiemba2013public.V2-pls, MajajHong2015public.V4-pls, MajajHong2015public.IT-pls, "
                f"Rajalingham2018public-i2n)")
    brainio = os.environ.get("BRAINIO_HOME", str(Path.home() / ".brainio"))
    caching = os.environ.get("RESULTCACHING_HOME", str(Path.home() / ".result_caching"))
    return (f"could not score benchmark {benchmark!r}: {type(error).__name__}: {str(error)[:300]}\n"
            f"  Scoring needs the benchmark's stimuli and recordings, which brainio downloads on first use "
            f"(network access to Brain-Score's S3 storage) into BRAINIO_HOME ({brainio}); results are "
            f"cached in RESULTCACHING_HOME ({caching}). Run once with network access, or copy those "
            f"folders from a machine that has them. Without a region_layer_map (score --region V1=LAYER), "
            f"neural benchmarks first score the public benchmarks to choose layers, which needs their data too.")
