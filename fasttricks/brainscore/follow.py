"""Brain-Score beside training: every checkpoint of a run, and its final model, scored on public
benchmarks by a process of its own (``fasttricks brainscore follow``), or after the fact
(``brainscore score RUN --checkpoints``).

Scoring inside the trainer would stall its GPU, and under DDP every rank; so the follower only
reads the run folder, and the trainer never waits for it. It writes one file there,
``RUN/brainscore/scores.jsonl`` (and, when the run logs to TensorBoard, its own event file in
``RUN/tb/``), a record per (checkpoint, benchmark): stage, epoch, step, the
weights' sha1, the score or the error, the benchmark and brainscore_vision's version. Exports go
to a temporary folder outside the run. Each (sha1, benchmark) pair is scored once, so a follower
killed and started again neither loses nor repeats a score. It leaves when the run's lock is
released and every checkpoint has its scores."""

from __future__ import annotations

import datetime
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from fasttricks.progress import console
from fasttricks.runs.checkpoint import Position, list_checkpoints
from fasttricks.runs.scores import append_score, epoch_of, read_scores


@dataclass(frozen=True)
class Target:
    """A model of the run to score: a checkpoint (its position) or the final one (position None)."""

    name: str
    weights: Path
    position: Position | None


def targets(run: Path) -> list[Target]:
    """The run's checkpoints in order, then its final model when it exists."""
    found = [Target(path.name, path / "model.safetensors", position) for position, path in list_checkpoints(run)]
    if (run / "final.safetensors").is_file():
        found.append(Target("final", run / "final.safetensors", None))
    return found


def score_target(run: Path, target: Target, digest: str, benchmark: str, loaded) -> dict:
    """One record: the target (its weights' sha1 ``digest``) exported to a temporary folder and
    scored in this process."""
    from fasttricks.brainscore.export import export
    from fasttricks.brainscore.local import commitment

    record = _describe(target, digest, benchmark)
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="fasttricks-follow-") as tmp:
            folder = Path(tmp) / "plugin"
            export(target.weights, folder, identifier=f"{run.resolve().name}-{target.name}")
            result = loaded(commitment(folder))
        record["score"] = float(np.asarray(result).ravel()[0])
    except Exception as e:  # a benchmark failing on one model is a record, not the end of the follower
        record["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    record["seconds"] = round(time.perf_counter() - start, 2)
    record["date"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return record


def _describe(target: Target, digest: str, benchmark: str) -> dict:
    """A record's fields before its score."""
    record = {"checkpoint": target.name, "stage": None, "epoch": None, "step": None, "averaged": False,
              "weights_sha1": digest, "benchmark": benchmark, "score": None, "error": None,
              "brainscore_vision": metadata.version("brainscore-vision"),
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    if target.position is not None:
        p = target.position
        record.update(stage=p.stage, epoch=p.epoch, step=p.step, averaged=p.averaged)
    return record


def load_all(benchmarks: list[str]) -> dict:
    """Every benchmark loaded before anything is scored: one that cannot load stops here, with
    nothing written (``BrainScoreError``: its name, the cache folders, how to pre-fetch)."""
    from fasttricks.brainscore.local import load_benchmark

    return {b: load_benchmark(b) for b in benchmarks}


class _Events:
    """The follower's own TensorBoard event file in ``RUN/tb/`` (when the run logs there): a scalar
    ``brainscore/<benchmark>`` per scored model, at its epoch of the whole run. The file is opened
    at the first score, so a follower polling a run with nothing new writes none."""

    def __init__(self, run: Path):
        from fasttricks.runs.folder import saved_recipe

        recipe = saved_recipe(run)
        self._run, self._writer, self._on = run, None, recipe.logging.tensorboard
        self._starts, self._total = recipe.stage_starts(), recipe.total_epochs()

    def add(self, record: dict) -> None:
        if not self._on or record["error"] is not None or record.get("step"):
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self._run / "tb"), filename_suffix=".brainscore")
        x = epoch_of(record, self._starts, self._total)
        self._writer.add_scalar(f"brainscore/{record['benchmark']}", record["score"], x)
        self._writer.flush()


Chooser = Callable[[Path, list[Target]], list[Target]]  # (run, its targets) -> those to score


def score_pending(run: Path, loaded: dict, chosen: Chooser = lambda run, found: found) -> list[dict]:
    """Score every (target, benchmark) pair not in scores.jsonl yet; returns the new records. Weights
    already scored under another name (a final model equal to its last checkpoint) get a record
    that repeats that score without scoring again. A checkpoint deleted before its turn is skipped
    and named."""
    from fasttricks.brainscore.export import sha1

    events = _Events(run)
    previous = read_scores(run)
    scored = {(r["weights_sha1"], r["benchmark"]): r for r in previous if r["error"] is None}
    named = {(r["checkpoint"], r["weights_sha1"], r["benchmark"]) for r in previous}
    new = []
    for target in chosen(run, targets(run)):
        try:
            digest = sha1(target.weights)
        except FileNotFoundError:
            _skipped(target)
            continue
        for benchmark, bench in loaded.items():
            if (target.name, digest, benchmark) in named:
                continue
            if (digest, benchmark) in scored:
                record = {**_describe(target, digest, benchmark), "score": scored[digest, benchmark]["score"],
                          "same_weights_as": scored[digest, benchmark]["checkpoint"]}
            elif not target.weights.is_file():
                _skipped(target)
                break
            else:
                record = score_target(run, target, digest, benchmark, bench)
            append_score(run, record)
            events.add(record)
            named.add((target.name, digest, benchmark))
            if record["error"] is None:
                scored[digest, benchmark] = record
            new.append(record)
            what = f"{record['score']:.4f}" if record["error"] is None else f"error: {record['error']}"
            console.print(f"{run.name} {target.name} · {benchmark}: {what}", soft_wrap=True)
    return new


def _skipped(target: Target) -> None:
    console.print(f"[yellow]{target.name}: deleted before its turn, skipped", soft_wrap=True)


def follow(run: Path, benchmarks: list[str], *, once: bool = False, poll: float = 30.0) -> list[dict]:
    """Score the run's checkpoints as they appear until its writer is gone and all are scored
    (``once``: what is there now, then return)."""
    from fasttricks.runs.folder import saved_recipe, writer_pid

    loaded = load_all(benchmarks)
    while not once and not (run / "config.yaml").is_file():  # started beside a job that has not begun yet
        time.sleep(poll)
    saved_recipe(run)  # a run folder, or a clear error
    records = []
    while True:
        writing = writer_pid(run) is not None  # read first: a checkpoint saved before the end is then seen
        records += score_pending(run, loaded)
        if once or not writing:
            return records
        time.sleep(poll)


def choose(spec: str) -> Chooser:
    """``all``, ``last`` (the final model, else the newest checkpoint) or epochs of the whole run
    (``3,5,10``: the checkpoints at those epochs, counted across stages)."""
    if spec == "all":
        return lambda run, found: found
    if spec == "last":
        return lambda run, found: found[-1:]
    try:
        wanted = {int(e) for e in spec.split(",")}
    except ValueError:
        from fasttricks.errors import InputError

        raise InputError(f"--checkpoints expects all, last or epochs such as 3,5,10, not {spec!r}") from None

    def at_epochs(run: Path, found: list[Target]) -> list[Target]:
        from fasttricks.runs.folder import saved_recipe

        starts = saved_recipe(run).stage_starts()
        return [t for t in found if t.position is not None and t.position.step == 0 and not t.position.averaged
                and starts[t.position.stage] + t.position.epoch in wanted]
    return at_epochs


