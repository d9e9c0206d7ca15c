"""The run folder: what a training run leaves behind, and only the main process writes it.

``config.yaml`` (resolved recipe), ``environment.json`` (git commit, package versions, device),
``metrics.jsonl`` (one object per epoch), ``checkpoints/``, ``final.safetensors``, ``summary.json``.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import shutil
import subprocess
from collections.abc import Callable
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import torch
import yaml

from fasttricks import recipes
from fasttricks.atomic import make_folder, write_json, write_text
from fasttricks.errors import UserError
from fasttricks.progress import console

PACKAGES = ("fasttricks", "torch", "torchvision", "ffcv", "numba", "numpy", "timm", "kornia", "robustness",
            "brainscore-vision")


class RunFolderError(UserError, FileExistsError):
    pass


LOCK_NAME = ".lock"
# What a run that failed before its first checkpoint may leave, and a retry may take over: the
# logging folders too (TensorBoard's and W&B's are made when the run starts).
RUN_FILES = ("config.yaml", "environment.json", "metrics.jsonl", "checkpoints", "tb", "wandb", LOCK_NAME)


def saved_recipe(out: Path) -> recipes.Recipe:
    """The resolved recipe a run folder was started with (``config.yaml``)."""
    config = out / "config.yaml"
    if not config.is_file():
        raise RunFolderError(f"{out} holds no run (no config.yaml): nothing to resume; start it without --resume")
    return recipes.validate(yaml.safe_load(config.read_text()), source=str(config))


def is_run(out: Path) -> bool:
    """A folder holds a run once it has a checkpoint or a final model. One that failed before its
    first checkpoint (config.yaml, environment.json only) is not one: a retry takes it over."""
    from fasttricks.runs.checkpoint import list_checkpoints

    return (out / "final.safetensors").is_file() or bool(list_checkpoints(out))


def recipe_differences(old: recipes.Recipe, new: recipes.Recipe) -> list[str]:
    """``key: old -> new`` for every leaf that differs (dotted keys, stage lists by index)."""
    out: list[str] = []

    def walk(a, b, path):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in dict.fromkeys([*a, *b]):
                walk(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(
                isinstance(x, dict) for x in a + b):
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                walk(x, y, f"{path}.{i}")
        elif a != b:
            out.append(f"{path}: {a!r} -> {b!r}")

    walk(old.model_dump(mode="json"), new.model_dump(mode="json"), "")
    return out


def prepare(out: Path, recipe: recipes.Recipe, *, resume: bool, overwrite: bool,
            data_dir: str | os.PathLike | None = None) -> recipes.Recipe:
    """Create (or re-open, with ``resume``) the run folder; returns the recipe the run uses.

    A resumed run continues with the recipe saved in its folder; a different one is an error
    naming the keys that differ, since the result would be neither run."""
    if resume and is_run(out):
        saved = saved_recipe(out)
        changed = recipe_differences(saved, recipe)
        if changed:
            raise RunFolderError(f"{out} was started with another recipe; these keys differ (saved -> given): "
                                 + "; ".join(changed[:8]) + (" ..." if len(changed) > 8 else "")
                                 + ". Resume with --resume --out alone (the saved recipe), or choose a new --out")
        return saved
    contents = [p for p in out.iterdir() if p.name != LOCK_NAME] if out.is_dir() else []
    if contents and not resume and is_run(out) and not overwrite:
        raise RunFolderError(f"{out} already holds a run; pass --resume to continue it or "
                             f"--overwrite to replace it")
    foreign = [p.name for p in contents if p.name not in RUN_FILES]
    if foreign and not overwrite:  # with --resume too: a folder without a checkpoint is started again
        raise RunFolderError(f"{out} holds files that are not a run's ({', '.join(sorted(foreign)[:5])}); "
                             f"choose another --out, or pass --overwrite to replace them")
    if resume and not is_run(out):  # a run that failed before its first checkpoint: start it again
        console.print(f"[yellow]{out} holds no checkpoint: starting the run from the beginning")
    for p in contents:  # a replaced run, or one that never reached its first checkpoint
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    make_folder(out)
    write_text(out / "config.yaml", recipes.dump(recipe))
    write_json(out / "environment.json", {**environment(), "data": str(Path(data_dir).resolve()) if data_dir else None})
    return recipe


def recorded_data(out: Path) -> Path | None:
    """The data folder a run was trained on (``environment.json``; None for runs of earlier versions)."""
    path = out / "environment.json"
    data = json.loads(path.read_text()).get("data") if path.is_file() else None
    return Path(data) if data else None


def data_for_resume(out: Path, given: Path | None) -> Path | None:
    """The data folder ``--resume`` trains on: the one the run recorded. Another one given is refused
    (the run would continue on other images, and other class ids if they differ); None when neither
    is known."""
    recorded = recorded_data(out)
    if given is not None and recorded is not None and Path(given).resolve() != recorded:
        raise RunFolderError(f"{out} was trained on --data {recorded}, not {given}: resume it with --data {recorded} "
                             f"(or without --data), or start a new run in another --out")
    return given if given is not None else recorded


def read_summary(out: Path) -> dict | None:
    """summary.json, None when the run has not written one."""
    path = out / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def evaluation_pending(out: Path) -> bool:
    """The final model is written and its final evaluation did not end (training/finish.py)."""
    summary = read_summary(out)
    pending = summary is not None and summary.get("final_evaluation") == "pending"
    return pending and (out / "final.safetensors").is_file()


def check_resumable(out: Path) -> None:
    """``--resume`` needs a run folder (a started run's config.yaml); checked before anything is written."""
    if not (out / "config.yaml").is_file():
        raise RunFolderError(f"{out} holds no run to resume (no {out / 'config.yaml'}); start it without --resume")


@contextmanager
def lock(out: Path):
    """Hold ``out/.lock`` for the duration: a second process writing the same run folder is
    refused with the owner's pid. The lock is an ``flock``, which the kernel drops when its owner
    dies, so a lock file left by a killed run is stale and simply taken over. The owner removes
    the file when it ends, so a process that opened it just before may lock the removed file:
    it checks, after locking, that the file it holds is still the one at ``.lock``."""
    make_folder(out)
    path = out / LOCK_NAME
    with _locked(path, out) as f:
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # while still held: a finished run leaves no lock file
            fcntl.flock(f, fcntl.LOCK_UN)


def _locked(path: Path, out: Path):
    """``path`` opened and exclusively locked, the file at ``path`` now (not a removed one)."""
    while True:
        f = open(path, "a+")  # noqa: SIM115 (returned open, held by the caller's with)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "unknown"
            f.close()
            raise RunFolderError(f"{out} is being written by another process (pid {owner}, {path}); "
                                 f"wait for it to end, or choose another --out") from None
        try:
            current = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return f
        f.close()  # its owner removed it between our open and our lock: take the one in place now


def recipe_for_train(name: str | None, overrides: list, sets: list[str], *, out: Path | None, resume: bool,
                     toy: bool) -> tuple[recipes.Recipe, Path]:
    """The recipe and run folder a ``train`` command means. ``--resume`` without ``--recipe`` takes
    the recipe saved in the run folder (``--set``/``--override`` then apply on top of it, and
    ``prepare`` refuses them if they change it). With ``toy`` and no override, the recipe's toy
    override is applied, said in one line."""
    if resume and name is None:
        if out is None:
            raise RunFolderError("--resume needs --out RUN (the run folder to continue)")
        raw = saved_recipe(out).model_dump(mode="json")
        return recipes.apply_overrides(raw, overrides, sets, source=str(out / "config.yaml")), out
    name = name or "baseline"
    if toy and not overrides:
        overrides = [recipes.toy_override(recipes.load_recipe(name))]
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, before the process group exists
            console.print(f"--data toy: applying {overrides[0]} (a tiny model and budget for a CPU; "
                          f"--no-toy-settings trains the recipe as written)", soft_wrap=True)
    recipe = recipes.load_recipe(name, overrides, sets)
    return recipe, out or Path("runs") / recipe.name


def environment() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"git_commit": _git_commit(), "python": platform.python_version(), "packages": versions,
            "machine": platform.machine(), "cpus": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def append_metrics(out: Path, row: dict) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def truncate_metrics(out: Path, keep: Callable[[dict], bool]) -> None:
    """Keep the rows ``keep`` accepts: a resumed run rewrites what came after its checkpoint."""
    rows = [r for r in read_metrics(out) if keep(r)]
    write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def writer_pid(run: Path) -> int | None:
    """The pid of the process writing ``run`` (it holds RUN/.lock), or None."""
    path = run / LOCK_NAME
    if not path.is_file():
        return None
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)  # granted only when no writer holds it
        except BlockingIOError:
            text = f.read().strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(f, fcntl.LOCK_UN)
    return None  # a lock file left by a killed run
