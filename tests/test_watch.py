"""Watching a long run: `fasttricks plot` (fasttricks/runs/plots.py) and `fasttricks status`
(fasttricks/runs/status.py), on a stopped run and on the same run finished."""

import json
import shutil

import pytest
from PIL import Image
from typer.testing import CliRunner

from fasttricks.cli import app
from fasttricks.recipes import load_recipe
from fasttricks.recipes.schedules import resolution_at
from fasttricks.runs.folder import read_metrics
from fasttricks.runs.plots import curves
from fasttricks.runs.status import run_status
from fasttricks.training.loop import train

SETS = ["stages.0.epochs=3", "stages.0.resolution={min: 32, max: 40, start_ramp: 1, end_ramp: 2, multiple: 8}",
        "data.val_resize=48", "data.val_crop=40"]


@pytest.fixture(scope="module")
def stopped_and_finished(toy_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("watch")
    recipe = load_recipe("baseline", ["overrides/toy"], SETS)
    train(recipe, toy_data, root / "run", stop_after=2, show_progress=False)
    shutil.copytree(root / "run", root / "stopped")
    train(recipe, toy_data, root / "run", resume=True, show_progress=False)
    return root / "stopped", root / "run"


def test_status_of_a_stopped_run_estimates_the_rest_from_the_measured_epochs(stopped_and_finished):
    stopped, _ = stopped_and_finished
    s = run_status(stopped)
    assert (s["finished"], s["writer_pid"], s["stage"], s["epoch"], s["of_epochs"]) == (False, None, "train", 2, 3)
    rows = read_metrics(stopped)
    # the last epoch runs at 40 px, not measured yet: the 32-px epochs' mean time scaled by pixel count
    assert [r["resolution"] for r in rows] == [32, 32]
    expected = (rows[0]["seconds"] + rows[1]["seconds"]) / 2 * (40 / 32) ** 2
    assert s["eta_run_s"] == pytest.approx(expected) and s["eta_stage_s"] == s["eta_run_s"]
    assert s["last_metrics"]["val_top1"] == rows[-1]["val_top1"]
    out = CliRunner().invoke(app, ["status", str(stopped)])
    assert out.exit_code == 0 and "stopped (no process writes it)" in out.output and "epoch 2/3" in out.output


def test_status_of_a_finished_run_and_of_a_run_being_written(stopped_and_finished):
    from fasttricks.runs import folder

    _, finished = stopped_and_finished
    s = run_status(finished)
    assert s["finished"] and s["eta_run_s"] is None and s["summary"]["val_top1"] == s["last_metrics"]["val_top1"]
    with folder.lock(finished):  # as a training process holds it
        assert run_status(finished)["writer_pid"] > 0
    result = CliRunner().invoke(app, ["status", str(finished), "--json"])
    assert json.loads(result.output)["finished"] is True


def test_plot_draws_the_curves_of_metrics_jsonl_across_stages(stopped_and_finished, tmp_path):
    stopped, finished = stopped_and_finished
    rows = read_metrics(finished)
    data = curves(finished)
    assert data["val_top1"] == [(r["epoch"], r["val_top1"]) for r in rows]
    assert data["resolution"] == [(1, 32), (2, 32), (3, 40)] and [y for _, y in data["lr"]] == [r["lr"] for r in rows]
    assert (finished / "curves.png").is_file()  # written by the run itself at the end of its stage
    result = CliRunner().invoke(app, ["plot", str(finished), str(stopped), "--out", str(tmp_path / "both.png")])
    assert result.exit_code == 0, result.output
    width, height = Image.open(tmp_path / "both.png").size
    assert width > 1000 and height > 500  # a grid of panels


def test_the_learning_rate_panel_is_logarithmic(stopped_and_finished, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from fasttricks.runs.plots import plot

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    plot([stopped_and_finished[1]], tmp_path / "c.png")
    [lr] = [ax for ax in figures[0].axes if ax.get_title() == "learning rate"]
    assert lr.get_yscale() == "log"  # 1e-3 beside 0.1 must not look like zero


def test_tensorboard_events_read_back_with_tensorboards_own_reader(toy_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = load_recipe("baseline", ["overrides/toy"], [*SETS, "stages.0.epochs=2", "logging.tensorboard=true"])
    train(recipe, toy_data, tmp_path / "r", show_progress=False)
    events = EventAccumulator(str(tmp_path / "r" / "tb"))
    events.Reload()
    rows = read_metrics(tmp_path / "r")
    assert [e.value for e in events.Scalars("epoch/val_top1")] == pytest.approx([r["val_top1"] for r in rows])
    assert [e.step for e in events.Scalars("epoch/val_top1")] == [1, 2]
    assert len(events.Scalars("train/loss")) == 2  # a logging point at each epoch's last step (6 steps < 20)


def test_a_tracker_that_is_not_installed_is_refused_with_the_recipe(monkeypatch):
    import importlib.util

    from fasttricks.recipes import RecipeError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(RecipeError, match="logging.wandb: true needs the wandb package"):
        load_recipe("baseline", sets=["logging.wandb=true"])


def test_the_progress_lines_run_eta_counts_every_remaining_epoch_at_its_resolution():
    from fasttricks.training.epoch_log import run_eta

    recipe = load_recipe("winner")  # 40 epochs 160 -> 240, then 5 at 240
    # half of epoch 0 done at 160 px, 10 min per 160-px epoch; stage 2 never measured yet
    eta = run_eta(recipe, {(0, 160): [600.0]}, 0, 0, 160, 0.5, 300.0)
    assert eta.endswith("+ behaviour")  # said, not guessed
    later = [resolution_at(recipe.stages[0].resolution, e) for e in range(1, 40)]
    expected = 0.5 * 600 + sum(600 * (r / 160) ** 2 for r in later)  # scaled by pixel count
    assert eta.startswith(f"{expected / 3600:.1f} h")
