"""``fasttricks status RUN``: where a run stands, how fast it goes, and when its stage and the whole
run should end, read from the run folder alone (another process may be writing it)."""

from __future__ import annotations

import json
from pathlib import Path

from fasttricks.recipes.schedules import resolution_at
from fasttricks.runs.checkpoint import Position, list_checkpoints
from fasttricks.runs.folder import evaluation_pending, read_metrics, saved_recipe, writer_pid
from fasttricks.runs.scores import last_scores


def epoch_times(rows: list[dict]) -> dict[tuple[int, int], list[float]]:
    """The measured seconds of each epoch, by (stage, resolution)."""
    seen: dict[tuple[int, int], list[float]] = {}
    for r in rows:
        if "averaged" not in r and "seconds" in r:
            seen.setdefault((r["stage_index"], r["resolution"]), []).append(r["seconds"])
    return seen


def mean_times(times: dict[tuple[int, int], list[float]]) -> dict[tuple[int, int], float]:
    return {k: sum(v) / len(v) for k, v in times.items()}


def _estimate(measured: dict[tuple[int, int], float], stage: int, res: int) -> float | None:
    """Seconds for an epoch of ``stage`` at ``res``: measured, or scaled by pixel count from the
    stage's nearest measured resolution (a step's cost grows about with the image area)."""
    if (stage, res) in measured:
        return measured[(stage, res)]
    known = [(r, s) for (st, r), s in measured.items() if st == stage]
    if not known:
        return None
    r, s = min(known, key=lambda rs: abs(rs[0] - res))
    return s * (res / r) ** 2


def remaining_seconds(recipe, measured: dict[tuple[int, int], float], stage: int, epoch: int,
                      part_done: float = 0.0) -> tuple[list[float], list[str]]:
    """Seconds left in each stage from ``epoch`` (0-based, ``part_done`` of it done) of ``stage``
    on, and the stages no estimate exists for yet (nothing of them measured)."""
    remaining, unknown = [], []
    for s, st in enumerate(recipe.stages):
        start = epoch if s == stage else (st.epochs if s < stage else 0)
        seconds = 0.0
        for e in range(start, st.epochs):
            est = _estimate(measured, s, resolution_at(st.resolution, e))
            if est is None:
                unknown.append(st.name)
                break
            seconds += est * (1 - part_done if (s, e) == (stage, start) else 1)
        remaining.append(seconds)
    return remaining, unknown


def run_status(run: Path) -> dict:
    recipe = saved_recipe(run)
    rows = read_metrics(run)
    found = list_checkpoints(run)
    position = found[-1][0] if found else Position(0, 0)
    remaining, unknown = remaining_seconds(recipe, mean_times(epoch_times(rows)), position.stage, position.epoch,
                                           position.step / _steps(rows, position.stage))
    pending = evaluation_pending(run)
    finished = (run / "summary.json").is_file() and not pending
    last = next((r for r in reversed(rows) if any(k.endswith("_top1") for k in r)), {})
    stage = recipe.stages[min(position.stage, len(recipe.stages) - 1)]
    return {
        "run": str(run), "recipe": recipe.name, "finished": finished, "evaluation_pending": pending,
        "writer_pid": writer_pid(run),
        "stage": stage.name, "stage_index": position.stage, "epoch": position.epoch, "of_epochs": stage.epochs,
        "step": position.step, "images_per_s": rows[-1].get("images_per_s") if rows else None,
        "eta_stage_s": None if finished else (None if stage.name in unknown else remaining[position.stage]),
        "eta_run_s": None if finished else (None if unknown else sum(remaining)),
        "not_measured_yet": sorted(set(unknown)),
        "last_metrics": {k: v for k, v in last.items() if k.endswith("_top1") or k in ("epoch", "stage")},
        "summary": json.loads((run / "summary.json").read_text()) if finished else None,
        "brainscore": {b: {"score": r["score"], "checkpoint": r["checkpoint"]} for b, r in last_scores(run).items()},
    }


def _steps(rows: list[dict], stage: int) -> int:
    """Steps per epoch of ``stage``, as its rows record them (a stage with no row yet: 1, so that a
    mid-epoch position there counts its epoch as done; the estimate is then unknown anyway)."""
    counts = [r["steps"] for r in rows if r.get("stage_index") == stage and "steps" in r]
    return max(counts[-1] if counts else 1, 1)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def describe(status: dict) -> list[str]:
    """The status as lines for the terminal."""
    state = ("finished" if status["finished"] else
             f"running (pid {status['writer_pid']})" if status["writer_pid"] else "stopped (no process writes it)")
    lines = [f"{status['run']}: {status['recipe']}, {state}",
             f"  stage {status['stage']} ({status['stage_index'] + 1}), epoch {status['epoch']}/{status['of_epochs']}"
             + (f", step {status['step']}" if status["step"] else "")
             + (f" · {status['images_per_s']:.0f} img/s" if status["images_per_s"] else "")]
    if status.get("evaluation_pending"):
        lines.append(f"  trained, final.safetensors written; its final evaluation did not end: "
                     f"`fasttricks train --resume --out {status['run']}` finishes it without training")
    elif not status["finished"]:
        lines.append(f"  ETA: stage {format_duration(status['eta_stage_s'])}, "
                     f"run {format_duration(status['eta_run_s'])}"
                     + (f" (not measured yet: {', '.join(status['not_measured_yet'])})"
                        if status["not_measured_yet"] else ""))
    if status["last_metrics"]:
        lines.append("  last: " + " · ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in status["last_metrics"].items()))
    for benchmark, last in status.get("brainscore", {}).items():
        lines.append(f"  Brain-Score {benchmark}: {last['score']:.4f} ({last['checkpoint']})")
    return lines
