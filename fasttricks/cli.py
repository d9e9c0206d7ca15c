"""The ``fasttricks`` command: a thin typer layer over the library. Each command parses its
options, calls one library function, and turns bad input (``fasttricks.errors.UserError``) into one
red line and exit status 2 instead of a traceback; any other error is a bug and shows its traceback."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Annotated

import typer

from fasttricks.data.toy import ToyOptions
from fasttricks.errors import InputError, UserError
from fasttricks.progress import console

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Fast training of brain-like vision models (the 2022 Brain-Score winning recipe).")


def friendly(fn):
    """Bad input (``UserError``): its message and exit 2. Ctrl-C in a training run: its message and exit 130;
    SIGTERM or SIGUSR1 (a scheduler's): its message and exit 75 (saved, to be resumed)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from fasttricks.training.interrupts import Interrupted

        try:
            return fn(*args, **kwargs)
        except Interrupted as e:
            if str(e):  # rank 0's; the other ranks stay quiet
                console.print(f"[yellow]{e}", soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except UserError as e:  # raised only where input is checked: anything else keeps its traceback
            console.print(f"[bold red]error:[/] {e}", soft_wrap=True)  # no line breaks inside paths to copy
            raise typer.Exit(2) from None
    return wrapper


@app.callback(invoke_without_command=True)
def _main(version: Annotated[bool, typer.Option("--version", is_eager=True,
                                                help="print the version and exit")] = False):
    if version:
        from importlib.metadata import version as installed

        print(f"fasttricks {installed('fasttricks')}")
        raise typer.Exit()


TOY = ToyOptions()  # make-toy's defaults are the default set's


@app.command("make-toy")
@friendly
def make_toy_cmd(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="folder to write train/, val/, val_clutter/ into")],
    seed: int = TOY.seed, size: Annotated[int, typer.Option(help="image side in pixels")] = TOY.size,
    train_per_class: int = TOY.train_per_class, val_per_class: int = TOY.val_per_class,
    clutter_per_class: int = TOY.clutter_per_class,
    train_photo_backgrounds: Annotated[float, typer.Option(
        help="share of training images on photographs (a variant; the default set has none)")] = 0.0,
    clutter_radius: Annotated[tuple[float, float], typer.Option(
        help="val_clutter objects' radius range, a fraction of the side (first sets: 0.11 0.2)")] = TOY.clutter_radius,
    betons: Annotated[bool, typer.Option(help="also compile each split to OUT/<split>.beton, so that OUT "
                                         "is a --data folder")] = True,
    overwrite: bool = False,
):
    """Generate the toy "objects on backgrounds" set as ImageFolders (same seed, same files), and its betons."""
    from fasttricks.data.sources import TOY_BETON, build_split_betons
    from fasttricks.data.toy import SPLITS, make_toy

    if size < 16:
        raise InputError(f"--size must be at least 16 pixels, not {size}")
    if not 0 <= train_photo_backgrounds <= 1:
        raise InputError(f"--train-photo-backgrounds is a share in [0, 1], not {train_photo_backgrounds}")
    if not 0 < clutter_radius[0] <= clutter_radius[1] < 0.5:
        raise InputError(f"--clutter-radius needs 0 < low <= high < 0.5 (the object must fit), not {clutter_radius}")
    opts = ToyOptions(seed, size, train_per_class, val_per_class, clutter_per_class, train_photo_backgrounds,
                      clutter_radius)
    make_toy(out, opts, overwrite=overwrite)
    if betons:
        build_split_betons(out, out, SPLITS, TOY_BETON)
    console.print(f"wrote {out}" + (f": use it as --data {out}" if betons else ""))


@app.command("build-beton")
@friendly
def build_beton_cmd(
    src: Annotated[Path, typer.Argument(metavar="SRC",
        help="ImageFolder: SRC/<class>/<image>, classes sorted give labels")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="the .beton to write (and OUT.json, its manifest)")],
    max_res: Annotated[int | None, typer.Option(help="longest side kept, larger images are downscaled")] = None,
    jpeg_quality: int = 90,
    compress_probability: Annotated[
        float, typer.Option(help="share stored as JPEG with --write-mode proportion")] = 0.5,
    write_mode: Annotated[str, typer.Option(help="raw | jpg | proportion | smart (FFCV)")] = "proportion",
    workers: Annotated[int, typer.Option(help="0: one per core")] = 0,
    limit: Annotated[int | None, typer.Option(help="write a seeded random subset of this many images")] = None,
    classes_from: Annotated[Path | None, typer.Option(
        help="the train split's beton: its class list gives the ids (use it for every split but train)")] = None,
    smart_threshold: Annotated[int, typer.Option(
        help="--write-mode smart: images of more raw bytes than this are stored as JPEG")] = 256 * 256 * 3,
    shuffle: Annotated[bool, typer.Option(
        help="write the images in a seeded random order (needed by data.order quasi_random)")] = False,
    overwrite: bool = False,
):
    """Compile an ImageFolder into an FFCV .beton; bad files are skipped and listed in the manifest."""
    from fasttricks.data.beton import BetonOptions, build_beton

    opts = BetonOptions(max_res=max_res, jpeg_quality=jpeg_quality, compress_probability=compress_probability,
                        write_mode=write_mode, workers=workers, limit=limit,
                        classes_from=str(classes_from) if classes_from else None, smart_threshold=smart_threshold,
                        shuffle=shuffle)
    m = build_beton(src, out, opts, overwrite=overwrite)
    console.print(f"[green]{out}[/]: {m.images} images, {len(m.classes)} classes, {len(m.skipped)} skipped "
                  f"({m.seconds:.0f} s, of which {m.checksum_seconds:.1f} s for the checksums); manifest {out}.json")
    per_image = m.image_bytes / max(m.images, 1)
    console.print(f"  images {_size(m.image_bytes)}, {_size(per_image)} per image; the file {_size(m.beton_bytes)} "
                  f"(FFCV allocates in pages)"
                  + (f"; all {m.source_images} images at these settings: about "
                     f"{_size(per_image * m.source_images)}" if m.source_images > m.images else ""))
    for s in m.skipped[:10]:
        console.print(f"  skipped {s['file']}: {s['reason']}")


@app.command("verify-beton")
@friendly
def verify_beton_cmd(
    target: Annotated[Path, typer.Argument(metavar="FILE|DIR", help="a beton, or a data folder (every beton in it)")],
):
    """Check every image of a beton against the checksum its manifest recorded when it was built;
    exit 2 naming the damaged images. `train` checks a seeded sample of 1,024 per beton by itself."""
    from fasttricks.data.checksums import damaged, describe
    from fasttricks.data.manifest import BuildError, read_manifest
    from fasttricks.errors import InputMissing

    betons = sorted(target.glob("*.beton")) if target.is_dir() else [target]
    if not betons or not all(b.is_file() for b in betons):
        raise InputMissing(f"{target}: no beton there (give a .beton file or a folder that holds some)")
    problems = []
    for beton in betons:
        bad = damaged(beton, show_progress=True)
        if bad:
            problems.append(describe(beton, bad, read_manifest(beton).get("files", [])))
        else:
            images = len(read_manifest(beton)["checksums"])
            console.print(f"[green]{beton}[/]: all {images} images match their checksums")
    if problems:
        raise BuildError("\n".join(problems))


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


RecipeOpt = Annotated[str, typer.Option("--recipe", "-r", help="a shipped name (`fasttricks recipes`) or a YAML path")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="dotted.key=value (repeatable)")]
OverrideOpt = Annotated[list[Path] | None, typer.Option("--override", help="YAML merged over the recipe")]
DataOpt = Annotated[str, typer.Option("--data", "-d", help="folder of train/val(/val_clutter) betons, or 'toy'")]


@app.command()
@friendly
def train(
    recipe: Annotated[str | None, typer.Option(
        "--recipe", "-r", help="name in pipelines/ or a YAML path; default baseline, or with --resume the "
        "recipe saved in the run folder")] = None,
    data: Annotated[str | None, typer.Option(
        "--data", "-d", help="folder of train/val(/val_clutter) betons, or 'toy' (the default); with --resume, "
        "the folder the run recorded")] = None,
    out: Annotated[Path | None, typer.Option(help="run folder; default runs/<recipe>")] = None,
    set_: SetOpt = None, override: OverrideOpt = None,
    resume: Annotated[bool, typer.Option(help="continue the run in --out from its last checkpoint")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run in --out")] = False,
    stop_after: Annotated[int | None, typer.Option(help="stop after this many epochs (resume later)")] = None,
    toy_settings: Annotated[bool, typer.Option(
        help="with --data toy and no --override: apply the recipe's toy override (a tiny model and budget "
        "for a CPU)")] = True,
    device: Annotated[str | None, typer.Option(help="cuda, cuda:1, cpu; default: cuda if present")] = None,
    dry_run: Annotated[bool, typer.Option(
        help="print the resolved recipe, each stage's epochs and resolutions, and the data it would read; "
        "write nothing")] = False,
):
    """Train a recipe (all its stages) and leave a run folder with metrics, checkpoints and a summary.
    Under torchrun (several processes), trains with DDP; rank 0 writes the run folder. An override
    changes size and budget; the experiment keys your own recipe file sets (eps, step, lr,
    augmentation, mixing) win over it, and a line lists what it changed. SIGTERM/SIGUSR1 save and
    exit 75 (Slurm: the job is requeued), Ctrl-C saves and exits 130; --resume continues."""
    import torch

    from fasttricks.runs.folder import recipe_for_train
    from fasttricks.runtime.distributed import dist_info, process_group
    from fasttricks.training.loop import train as run_training

    if stop_after is not None and stop_after < 1:
        raise InputError(f"--stop-after must be at least 1 epoch, not {stop_after}; to check a recipe and its data "
                         f"without training, use --dry-run")
    r, out = recipe_for_train(recipe, override or [], set_ or [], out=out, resume=resume,
                              toy=(data or "toy") == "toy" and toy_settings)
    data_dir = _train_data(data, out, resume)
    if dry_run:
        from fasttricks.training.plan import describe_plan

        for line in [*r.notes(), *describe_plan(r, data_dir, out)]:
            print(line)
        return
    with process_group(torch.device(device) if device else None) as dev:  # torchrun: one process per device
        summary = run_training(r, data_dir, out, device=dev, resume=resume, overwrite=overwrite,
                               stop_after=stop_after)
        if dist_info()[0] == 0:
            _print_summary(summary)


def _train_data(data: str | None, out: Path, resume: bool) -> Path:
    """The data folder of a train command: --data, else with --resume the run's own, else the toy set."""
    from fasttricks.data.sources import resolve_data
    from fasttricks.runs.folder import data_for_resume

    if not resume:
        return resolve_data(data or "toy")
    given = resolve_data(data) if data else None
    return data_for_resume(out, given) or resolve_data("toy")


@app.command("recipes")
@friendly
def recipes_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="one JSON list instead of a table")] = False,
):
    """The shipped recipes, table rows and overrides: the name --recipe/--override take, what each is,
    and where the file lies (works from any directory and from an installed wheel)."""
    from rich.table import Table

    from fasttricks.recipes import catalogue

    rows = catalogue()
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    table = Table("name", "kind", "description", "path", show_lines=False)
    for r in rows:
        table.add_row(r["name"], r["kind"], r["description"], r["path"])
    console.print(table)


@app.command("show-augs")
@friendly
def show_augs(
    recipe: RecipeOpt = "table1/5-heavy-aug-fcutmix", data: DataOpt = "toy",
    out: Annotated[Path, typer.Option(help="PNG to write")] = Path("augmentations.png"),
    stage: Annotated[int, typer.Option(help="which stage's augmentation (0-based)")] = 0,
    n: Annotated[int, typer.Option(help="images in the grid")] = 8,
    set_: SetOpt = None, override: OverrideOpt = None, device: str | None = None,
):
    """A grid of one batch before and after a stage's augmentation and mixing, with labels."""
    import torch

    from fasttricks.augment.preview import augment_grid
    from fasttricks.data.sources import resolve_data
    from fasttricks.recipes import load_recipe
    from fasttricks.runtime.devices import default_device

    r = load_recipe(recipe, override or [], set_ or [])
    path = augment_grid(r, resolve_data(data), out, stage=stage, n=n,
                        device=torch.device(device) if device else default_device())
    console.print(f"wrote {path}")


@app.command("eval")
@friendly
def eval_cmd(
    weights: Annotated[Path, typer.Argument(metavar="WEIGHTS",
        help="final.safetensors or a checkpoint's model.safetensors")],
    data: DataOpt = "toy",
    res: Annotated[int | None, typer.Option(help="test crop; resize keeps the model's crop/resize ratio")] = None,
    resize: Annotated[int | None, typer.Option(help="test resize (short side), overrides the ratio")] = None,
    batch_size: int = 256, device: str | None = None,
    attack: Annotated[str | None, typer.Option(
        help="also robust accuracy under PGD: norm:eps:steps, e.g. linf:8/255:20 or l2:3:20; or under "
        "AutoAttack (standard version, needs torchattacks): autoattack:norm:eps, e.g. autoattack:linf:4/255")] = None,
    attack_images: Annotated[int | None, typer.Option(
        min=1, help="robust accuracy on a seeded subset of this many images per split (default: all)")] = None,
):
    """Top-1 and top-5 accuracy on val (and val_clutter when present); robust top-1 with --attack."""
    import torch

    from fasttricks.data.sources import resolve_data
    from fasttricks.evaluation.evaluate import eval_command
    from fasttricks.robust.pgd import parse_attack
    from fasttricks.runtime.devices import default_device

    threat = parse_attack(attack) if attack else None
    if attack_images is not None and threat is None:
        raise InputError("--attack-images needs --attack (the attack whose images it limits)")
    result = eval_command(weights, resolve_data(data), crop=res, resize=resize, batch_size=batch_size,
                          device=torch.device(device) if device else default_device(), attack=threat,
                          attack_images=attack_images)
    console.print(f"{weights} at resize {result['resize']} / crop {result['crop']}")
    for split in ("val", "val_clutter"):
        if split in result:
            m = result[split]
            robust = ""
            for key in ("robust", "autoattack"):
                if f"{key}_top1" in m:
                    robust = f"  robust top-1 {m[f'{key}_top1']:6.2f}% ({attack}, {m[f'{key}_images']} images)"
            console.print(f"  {split:<12} top-1 {m['top1']:6.2f}%  top-5 {m['top5']:6.2f}%{robust}  "
                          f"({m['images']} images)")
    print(json.dumps(result))


@app.command()
@friendly
def average(
    checkpoints: Annotated[list[Path], typer.Argument(metavar="CHECKPOINTS",
        help="checkpoint folders or weights files of one run")],
    out: Annotated[Path, typer.Option(help="the averaged weights file (.safetensors)")],
    data: Annotated[str | None, typer.Option(
        "--data", "-d", help="recompute batch-norm statistics on this training set (folder or 'toy')")] = None,
    bn_batches: Annotated[int, typer.Option(help="training batches for the statistics")] = 100,
    batch_size: int = 128, device: str | None = None, overwrite: bool = False,
):
    """Uniform average of checkpoints; with --data, batch-norm statistics recomputed (frozen ones kept)."""
    import torch

    from fasttricks.data.sources import resolve_data
    from fasttricks.models.averaging import average_command
    from fasttricks.runtime.devices import default_device

    report = average_command(checkpoints, out, data_dir=resolve_data(data) if data else None,
                             bn_batches=bn_batches, batch_size=batch_size, overwrite=overwrite,
                             device=torch.device(device) if device else default_device())
    bn = (f"batch norms recomputed on {report['bn_images']} images" if report["bn_images"]
          else "[yellow]batch-norm statistics averaged, not recomputed (give --data to recompute them)")
    console.print(f"wrote {out}: mean of {len(checkpoints)} checkpoints; {bn}")


def _sizes(text: str) -> list[int]:
    from fasttricks.recipes import FixResConfig, RecipeError

    try:
        return FixResConfig(sizes=text).sizes
    except ValueError as e:
        raise RecipeError(f"--sizes {text!r}: expected START:STOP:STEP such as 224:416:16 and/or RESIZE/CROP "
                          f"such as 324/288, comma-separated") from e


def _pair(text: str) -> tuple[int, int]:
    from fasttricks.recipes import resize_crop

    try:
        return resize_crop(text)
    except ValueError as e:
        raise InputError(f"--size: {e}") from None


@app.command("fixres")
@friendly
def fixres_cmd(
    weights: Annotated[Path, typer.Argument(metavar="WEIGHTS",
        help="final.safetensors of a run, or any fasttricks weights file")],
    data: DataOpt = "toy",
    sizes: Annotated[str | None, typer.Option(
        help="test crops START:STOP:STEP (stop included, resized at the training ratio) and/or RESIZE/CROP pairs, "
        "comma-separated: 224:416:16,324/288; default crops 0.8-1.75x the training test crop")] = None,
    metric: Annotated[str, typer.Option(
        help="what picks the size: val or val_clutter (that split's top-1), or brainscore:BENCHMARK, e.g. "
        "brainscore:Rajalingham2018public-i2n (the model exported and scored at each size; needs the "
        "benchmark's data)")] = "val",
    held_out: Annotated[bool, typer.Option(
        help="pick on the even-numbered half of each split and report the chosen size on the odd half")] = True,
    out: Annotated[Path | None, typer.Option(help="folder for fixres.csv/png; default: beside the weights")] = None,
    batch_size: int = 256, device: str | None = None,
):
    """Accuracy against test size (resize keeps the training crop/resize ratio): fixres.csv, fixres.png,
    and for a run's final.safetensors the best size recorded for eval and export."""
    import torch

    from fasttricks.data.sources import resolve_data
    from fasttricks.evaluation.fixres import benchmark_of, fixres_command
    from fasttricks.runtime.devices import default_device

    try:
        benchmark_of(metric)
    except ValueError as e:
        raise InputError(f"--metric: {e}") from None
    result = fixres_command(weights, resolve_data(data), sizes=_sizes(sizes) if sizes else None, metric=metric,
                            held_out=held_out, batch_size=batch_size, out_dir=out,
                            device=torch.device(device) if device else default_device())
    console.print(f"curve: {result['csv']}, {result['png']}")


@app.command()
@friendly
def ablate(
    folder: Annotated[Path, typer.Argument(metavar="FOLDER",
        help="a folder of recipes, e.g. pipelines/table1 (or table1, shipped)")],
    data: DataOpt = "toy",
    out: Annotated[Path | None, typer.Option(help="default: runs/ablate-<folder name>")] = None,
    set_: SetOpt = None, override: OverrideOpt = None, device: str | None = None,
    seeds: Annotated[int, typer.Option(help="train each row with seeds 0..N-1 and report mean ± sd and the "
                                       "paired difference from the first row (1: the recipe's own seed)")] = 1,
    overwrite: Annotated[bool, typer.Option(help="replace rows that hold runs of another recipe")] = False,
    benchmark: Annotated[list[str] | None, typer.Option(
        help="also score each run's final model on this Brain-Score benchmark: a column each, the paper's "
        "figure beside ours where it has one (repeatable; needs the benchmark's data)")] = None,
    toy_settings: Annotated[bool, typer.Option(
        help="with --data toy and no --override: each row with its recipe's toy override (as train does)")] = True,
):
    """Train every recipe of a folder (resuming unfinished ones) and write a paper-style table:
    OUT/ablation.md and OUT/ablation.json."""
    import torch

    from fasttricks.data.sources import resolve_data
    from fasttricks.training.ablate import ablate as run_ablation

    out = out or Path("runs") / f"ablate-{folder.name}"
    run_ablation(folder, resolve_data(data), out, overrides=override or [], sets=set_ or [],
                 device=torch.device(device) if device else None, seeds=seeds, overwrite=overwrite,
                 benchmarks=benchmark or [], toy=data == "toy" and toy_settings)
    console.print((out / "ablation.md").read_text())
    console.print(f"wrote {out / 'ablation.md'} and {out / 'ablation.json'}")


@app.command()
@friendly
def plot(
    runs: Annotated[list[Path], typer.Argument(metavar="RUN", help="run folders (several: overlaid)")],
    out: Annotated[Path | None, typer.Option(help="PNG to write; default RUN/curves.png of the first run")] = None,
):
    """One PNG of the curves across stages: train loss, lr, resolution, val and val_clutter top-1,
    robust top-1 (final model), images/s."""
    from fasttricks.runs.plots import CURVES_NAME
    from fasttricks.runs.plots import plot as plot_runs

    console.print(f"wrote {plot_runs(runs, out or runs[0] / CURVES_NAME)}")


@app.command()
@friendly
def status(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="a run folder")],
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object instead of lines")] = False,
):
    """Where a run stands: stage, epoch and step, images/s, the ETA of the stage and the run (from the
    recipe's schedule and the measured time per epoch at each resolution), the last metrics, and
    whether a process is still writing it."""
    from fasttricks.runs.status import describe, run_status

    result = run_status(run)
    if as_json:
        print(json.dumps(result))
    else:
        for line in describe(result):
            console.print(line, soft_wrap=True)


brainscore_app = typer.Typer(no_args_is_help=True, help="Export a run as a Brain-Score model plugin; "
                             "activations and scores through brainscore_vision.")
app.add_typer(brainscore_app, name="brainscore")
RunArg = Annotated[Path, typer.Argument(metavar="RUN", help="a run folder, a checkpoint folder or a weights file")]


@brainscore_app.command("export")
@friendly
def brainscore_export(
    source: RunArg,
    out: Annotated[Path, typer.Option(help="the plugin folder to write")],
    identifier: Annotated[str | None, typer.Option(
        help="model identifier (the resolution is appended); default: recipe, model, run, resolution")] = None,
    region: Annotated[list[str] | None, typer.Option(
        help="REGION=LAYER over the default region map, e.g. --region V1=blocks.3.0 (repeatable)")] = None,
    region_map: Annotated[bool, typer.Option(
        help="write region_layer_map/ID.json (EfficientNet-B1: the 2022 winners' map; others: the same relative "
        "depths); --no-region-map leaves layer selection to Brain-Score, which needs its data")] = True,
    size: Annotated[str | None, typer.Option(
        help="test size RESIZE/CROP, e.g. 324/288 (the 2022 entries'); default: the model's (FixRes' choice "
        "when it made one)")] = None,
    overwrite: bool = False,
):
    """Write a brainscore_vision model plugin (model.py, __init__.py, weights, requirements.txt, test.py)."""
    from fasttricks.brainscore.export import export

    config = export(source, out, identifier=identifier, regions=region or [], region_map=region_map,
                    overwrite=overwrite, size=_pair(size) if size else None)
    console.print(f"[green]{out}[/]: {config['identifier']} · {config['arch']} · resize {config['resize']} / "
                  f"crop {config['crop']} · {len(config['layers'])} layers · read-out "
                  f"{config['behavioral_readout_layer']}")
    console.print(f"  region map: {config['region_layer_map'] or 'none'} ({config['region_layer_map_source']})")


@brainscore_app.command("activations")
@friendly
def brainscore_activations(
    source: RunArg,
    images: Annotated[list[Path], typer.Option("--images", help="image files or folders (repeatable)")],
    out: Annotated[Path, typer.Option(help=".npz to write: one array per layer, plus stimulus_paths")],
    layers: Annotated[list[str] | None, typer.Option("--layers", help="layer names (repeatable); default: "
                                                     "the behavioural read-out")] = None,
):
    """Activations for local images through brainscore_vision's PytorchWrapper (offline)."""
    from fasttricks.brainscore.local import activations

    shapes = activations(source, images, layers, out)
    for layer, shape in shapes.items():
        console.print(f"  {layer:<24} {shape}")
    console.print(f"wrote {out}")


@brainscore_app.command("score")
@friendly
def brainscore_score(
    source: RunArg,
    benchmark: Annotated[list[str], typer.Option(
        help="e.g. FreemanZiemba2013public.V1-pls, Rajalingham2018public-i2n, MajajHong2015public.IT-pls "
        "(repeatable with --checkpoints)")],
    region: Annotated[list[str] | None, typer.Option(
        help="REGION=LAYER for the region map the export uses, e.g. --region V1=blocks.3.0 (repeatable)")] = None,
    checkpoints: Annotated[str | None, typer.Option(
        help="all, last or epochs of the run (3,5,10): score those checkpoints of the run folder into "
        "RUN/brainscore/scores.jsonl, each (weights, benchmark) once, as `brainscore follow` does")] = None,
):
    """Score the run's export on a brainscore_vision benchmark (downloads its data on first use)."""
    if checkpoints is not None:
        from fasttricks.brainscore.follow import choose, load_all, score_pending

        chosen = choose(checkpoints)
        records = score_pending(source, load_all(benchmark), chosen)
        console.print(f"{len(records)} new score(s) in {source / 'brainscore' / 'scores.jsonl'}")
        return
    from fasttricks.brainscore.local import score

    if len(benchmark) != 1:
        raise InputError("--benchmark once, or several with --checkpoints")
    record = score(source, benchmark[0], region or [])
    console.print(f"{record['identifier']} on {benchmark[0]}: [bold]{record['score']:.4f}[/]")


@brainscore_app.command("follow")
@friendly
def brainscore_follow(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="a run folder, being trained or finished")],
    benchmark: Annotated[list[str], typer.Option(help="public benchmark, e.g. Rajalingham2018public-i2n "
                                                 "(repeatable)")],
    device: Annotated[str, typer.Option(
        help="cpu, or cuda:N for a GPU the training does not use: the only device this process sees")] = "cpu",
    once: Annotated[bool, typer.Option(help="score what is there now, then exit")] = False,
    poll: Annotated[float, typer.Option(help="seconds between looks at the run folder")] = 30.0,
):
    """Score every checkpoint of a run, and its final model, as they appear, beside the training
    (the trainer never waits for it): RUN/brainscore/scores.jsonl, one record per (checkpoint,
    benchmark), each scored once. Leaves when the run's lock is released and all are scored."""
    os.environ["CUDA_VISIBLE_DEVICES"] = "" if device == "cpu" else device.removeprefix("cuda:")
    from fasttricks.brainscore.follow import follow

    records = follow(run, benchmark, once=once, poll=poll)
    console.print(f"{len(records)} new score(s) in {run / 'brainscore' / 'scores.jsonl'}")


@brainscore_app.command("fetch")
@friendly
def brainscore_fetch(
    benchmark: Annotated[list[str], typer.Argument(metavar="BENCHMARK...", help="benchmark identifiers")],
):
    """Load benchmarks once, so that their data land in BRAINIO_HOME: copy that folder to a cluster
    without network (and set BRAINIO_HOME there)."""
    from fasttricks.brainscore.follow import load_all

    load_all(benchmark)
    home = os.environ.get("BRAINIO_HOME", str(Path.home() / ".brainio"))
    console.print(f"loaded {', '.join(benchmark)}; their data are in BRAINIO_HOME ({home})", soft_wrap=True)


def _print_summary(summary: dict) -> None:
    if "stopped_after_epochs" in summary:
        console.print(f"[yellow]stopped after {summary['stopped_after_epochs']} epoch(s); "
                      f"continue with --resume --out {summary['run']}")
        return
    console.rule("[bold]done")
    for split in ("val", "val_clutter"):
        if f"{split}_top1" in summary:
            top1, top5 = summary[f"{split}_top1"], summary[f"{split}_top5"]
            robust = (f"  robust top-1 {summary[f'{split}_robust_top1']:6.2f}% ({summary['robust_attack']})"
                      if f"{split}_robust_top1" in summary else "")
            console.print(f"  {split:<12} top-1 {top1:6.2f}%  top-5 {top5:6.2f}%{robust}")
    console.print(f"  test size    resize {summary['test_resize']} / crop {summary['test_crop']}"
                  + (" (FixRes: fixres.png)" if "fixres" in summary else ""))
    console.print(f"  run folder   {summary['run']}")
    console.print(f"  weights      {summary['final_weights']}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
