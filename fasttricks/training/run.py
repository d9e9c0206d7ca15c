"""What every part of a training run shares (``Run``), built once per call of ``train``: the recipe,
the run folder, the model and its compiled twin, the validation loaders, the tracker, the interrupt
flag and the run's description of its model (``info``)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import timm.layers
import timm.utils
import torch
from torch import nn

from fasttricks.augment import stage_augmentation
from fasttricks.data.loader import TrainLoader, beton_paths
from fasttricks.evaluation.evaluate import val_loaders
from fasttricks.models import freezing
from fasttricks.models.factory import Classifier, create_model
from fasttricks.models.weights import WriteFault
from fasttricks.progress import console
from fasttricks.recipes import Recipe, RecipeError, StageConfig
from fasttricks.recipes.schedules import resolution_at
from fasttricks.runs import folder
from fasttricks.runs.checkpoint import Position, list_checkpoints
from fasttricks.runtime import distributed
from fasttricks.runtime.devices import compile_enabled
from fasttricks.runtime.distributed import dist_info
from fasttricks.training.compiled import make_room
from fasttricks.training.interrupts import InterruptFlag
from fasttricks.training.state import RunState, ema_weights, rng_by_rank
from fasttricks.training.tracking import Tracker


@dataclass
class Run:
    """What every part of a training run shares."""

    recipe: Recipe
    out: Path
    device: torch.device
    model: Classifier
    train_model: nn.Module  # the model, or its torch.compile wrapper
    # What final.safetensors records about the model (architecture, classes, frozen modules, training
    # resolution, guard decisions, test size); part of the RunState saved with every checkpoint.
    info: dict
    val_loaders: dict
    train_beton: Path
    is_main: bool
    show_progress: bool
    interrupt: InterruptFlag
    tracker: Tracker
    epochs_before: list[int] = field(default_factory=list)  # global epoch index of each stage's start
    last_row: dict | None = None  # the newest metrics row, the same on every rank (rank 0 alone writes the file)
    epoch_times: dict = field(default_factory=dict)  # (stage, resolution) -> measured seconds of its epochs
    guard_loaders: dict = field(default_factory=dict)  # the guard's images by count, built once (guard.py)

    @classmethod
    def create(cls, recipe: Recipe, data_dir: Path, classes: list[str], out: Path, device: torch.device,
               interrupt: InterruptFlag, tracker: Tracker, show_progress: bool) -> Run:
        """The model (the same initial weights on every rank), its description and the val loaders."""
        rank, world = dist_info()
        torch.manual_seed(recipe.seed)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        model = create_model(recipe.model, len(classes))
        if rank > 0:  # then a stream of its own for dropout and drop-path (rank 0 keeps one process's)
            torch.manual_seed(recipe.seed + rank)
        if recipe.model.sync_batchnorm and world > 1:
            if device.type != "cuda":
                raise RecipeError("model.sync_batchnorm: true needs GPUs (SyncBatchNorm has no CPU collective); "
                                  "set it false to normalise over each process's share")
            model.net = timm.layers.convert_sync_batchnorm(model.net)
        model = model.to(device).to(memory_format=torch.channels_last)
        info = {"arch": recipe.model.arch, "num_classes": len(classes), "classes": classes,
                "mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist(),
                "val_resize": recipe.data.val_resize, "val_crop": recipe.data.val_crop, "recipe": recipe.name,
                "data": Path(data_dir).name, "pretrained": recipe.model.pretrained_name(),
                "training_data": _training_data(data_dir),
                "batch_norm": distributed.batch_norm_scope(model.net, recipe.model.sync_batchnorm,
                                                           {st.name: st.batch_size for st in recipe.stages}, world)}
        loaders = val_loaders(data_dir, resize=recipe.data.val_resize, crop=recipe.data.val_crop,
                              batch_size=recipe.data.val_batch_size, device=device, workers=recipe.data.workers,
                              distributed=world > 1)  # every rank evaluates its shard
        train_model = model
        if compile_enabled(recipe.model.compile, device):
            make_room(recipe)  # every graph of every stage's schedule, or dynamo would go eager past 8
            train_model = torch.compile(model)
        return cls(recipe, out, device, model, train_model, info, loaders, beton_paths(data_dir)["train"],
                   rank == 0, show_progress, interrupt, tracker, recipe.stage_starts())

    def say(self, text: str) -> None:
        """A line on the console, from rank 0 alone and only when progress is shown."""
        if self.is_main and self.show_progress:
            console.print(text, soft_wrap=True)

    def train_loader(self, stage: StageConfig, epoch: int) -> TrainLoader:
        data = self.recipe.data
        return TrainLoader(self.train_beton, batch_size=distributed.per_process_batch(stage.batch_size),
                           resolution=resolution_at(stage.resolution, epoch), seed=self.recipe.seed,
                           device=self.device, workers=data.workers, order=data.order, os_cache=data.os_cache,
                           distributed=dist_info()[1] > 1, scale=data.crop_scale, ratio=data.crop_ratio)

    def augmentation(self, stage: StageConfig) -> nn.Module | None:
        """The stage's augmentation, its heavy part compiled where the model is."""
        return stage_augmentation(stage, self.device, compile_enabled(self.recipe.model.compile, self.device),
                                  self.recipe.data.pixel_scale)

    def freeze_for(self, stage: StageConfig) -> None:
        """Freezing belongs to a stage: undo the previous stage's, apply this one's, record it."""
        freezing.unfreeze(self.model.net)
        frozen = freezing.resolve(self.model.net, stage.freeze)
        freezing.freeze(self.model.net, frozen)
        self.info["frozen"] = frozen
        if frozen:
            self.say(f"{stage.name}: frozen {len(frozen)} modules ({frozen[0]} … {frozen[-1]})")

    def record(self, s: int, epoch: int, row: dict) -> None:
        """A metrics row of stage ``s`` after its ``epoch``-th epoch: kept, tracked, and (rank 0) written."""
        self.last_row = row
        self.tracker.epoch(self.epochs_before[s] + epoch, row)
        if self.is_main:
            folder.append_metrics(self.out, row)

    def save(self, position: Position, optimizer: torch.optim.Optimizer | None = None,
             ema: timm.utils.ModelEmaV3 | None = None, **mid_epoch) -> Path | None:
        """Checkpoint the run's whole state at ``position``; every rank calls it (the RNG streams are
        gathered), rank 0 writes. ``mid_epoch``: the epoch's running sums when it stops inside one."""
        state = RunState(position, self.info, optimizer.state_dict() if optimizer else None, ema_weights(ema),
                         rng_by_rank(), **mid_epoch)
        if not self.is_main:
            return None
        with kept_on_write_fault(self.out):
            return state.save(self.out, self.model.net)


@contextmanager
def kept_on_write_fault(out: Path):
    """A checkpoint or the final model that cannot be written ends the run in one line: the file,
    the system's message, and the last complete checkpoint, which is kept (writes are atomic)."""
    try:
        yield
    except WriteFault as e:
        kept = list_checkpoints(out)
        where = f"the last complete checkpoint, {kept[-1][1]}, is kept" if kept else "no checkpoint was complete yet"
        raise WriteFault(f"{e}; {where}. Free space and continue with --resume") from None


def _training_data(data_dir: Path) -> str:
    """What the model was trained on, as the export's metadata names it: the images' folder (not the
    betons' folder, whose name says nothing) and its size."""
    from fasttricks.data.manifest import read_manifest

    manifest = read_manifest(beton_paths(data_dir)["train"])
    source = Path(manifest.get("source", data_dir))
    name = "toy" if "toy-seed" in str(source) else "/".join(source.parts[-2:])
    return f"{name} ({manifest['images']} images, {len(manifest['classes'])} classes)"


def check_batch_sizes(recipe: Recipe, images: int, world: int) -> None:
    """Every stage's batch divides among the processes and fits the training set (FFCV drops the
    last partial batch, so a larger batch would give epochs of no step)."""
    for i, stage in enumerate(recipe.stages):
        key = f"--set stages.{i}.batch_size=N"
        if stage.batch_size % world:
            raise RecipeError(f"stage {i} ({stage.name}): batch_size {stage.batch_size} (the global batch) does not "
                              f"divide among {world} processes; choose a multiple of {world} with {key}")
        if stage.batch_size // world > images // world:
            raise RecipeError(f"stage {i} ({stage.name}): batch_size {stage.batch_size} is more than the "
                              f"{images} training images ({images // world} per process); lower it with {key}")


