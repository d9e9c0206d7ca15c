"""The run folder's rules (fasttricks/runs.py): a folder without a checkpoint is no run and is
taken over, a resumed run keeps its recipe and names what differs, one process writes a folder at
a time, and `train`'s defaults on the toy set run in CPU-minutes."""

import multiprocessing as mp
import os

import pytest
import yaml
from typer.testing import CliRunner

from fasttricks import runs
from fasttricks.cli import app
from fasttricks.recipes import load_recipe
from fasttricks.runs import RunFolderError, prepare, recipe_for_train


def _started_then_failed(out):
    """What a run that failed before its first checkpoint leaves."""
    prepare(out, load_recipe("baseline"), resume=False, overwrite=False)
    assert {p.name for p in out.iterdir()} == {"config.yaml", "environment.json"}


def test_a_folder_without_checkpoint_is_taken_over_by_a_retry_with_another_recipe(tmp_path):
    out = tmp_path / "r"
    _started_then_failed(out)
    other = load_recipe("baseline", sets=["stages.0.epochs=3"])
    assert prepare(out, other, resume=False, overwrite=False) == other
    assert yaml.safe_load((out / "config.yaml").read_text())["stages"][0]["epochs"] == 3
    # and --resume of it starts again with the recipe given, rather than refusing a "change"
    again = load_recipe("baseline", sets=["stages.0.epochs=5"])
    assert prepare(out, again, resume=True, overwrite=False) == again


def test_a_folder_with_files_that_are_not_a_runs_is_not_taken_over(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="notes.txt"):
        prepare(out, load_recipe("baseline"), resume=False, overwrite=False)
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_in_a_folder_with_no_run_is_refused_and_writes_nothing(tmp_path, toy_data):
    out = tmp_path / "nothing"
    result = CliRunner().invoke(app, ["train", "--recipe", "baseline", "--resume", "--out", str(out),
                                      "--data", str(toy_data)])
    assert result.exit_code == 2 and "holds no run to resume" in result.output
    assert not out.exists()
    result = CliRunner().invoke(app, ["train", "--resume", "--out", str(out), "--data", str(toy_data)])
    assert result.exit_code == 2 and "no config.yaml" in result.output and not out.exists()


def _hold_lock(out, ready, release):
    with runs.lock(out):
        ready.set()
        release.wait(30)


def test_a_second_process_on_the_same_folder_is_refused_with_the_owners_pid(tmp_path):
    out = tmp_path / "r"
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    owner = ctx.Process(target=_hold_lock, args=(out, ready, release))
    owner.start()
    try:
        assert ready.wait(30)
        with pytest.raises(RunFolderError, match=rf"another process \(pid {owner.pid}"), runs.lock(out):
            pass
    finally:
        release.set()
        owner.join(30)
    assert not (out / ".lock").exists()  # released with the run
    # a lock file left by a killed run (a dead pid, no flock held) is stale and is taken over
    (out / ".lock").write_text("999999")
    with runs.lock(out):
        assert (out / ".lock").read_text() == str(os.getpid())


def test_toy_data_without_override_applies_the_recipes_toy_settings(capsys):
    recipe, out = recipe_for_train(None, [], [], out=None, resume=False, toy=True)
    assert recipe.name == "baseline" and recipe.model.arch == "test_efficientnet" and out.name == "baseline"
    assert "overrides/toy.yaml" in capsys.readouterr().err  # one line, on the console (stderr)
    winner, _ = recipe_for_train("winner", [], [], out=None, resume=False, toy=True)
    assert winner.stages[0].adversarial.steps == 2 and winner.model.arch == "test_efficientnet"  # toy-winner.yaml
    full, _ = recipe_for_train("winner", [], [], out=None, resume=False, toy=False)
    assert full.model.arch == "efficientnet_b1"
    given, _ = recipe_for_train("baseline", [], ["stages.0.epochs=2"], out=None, resume=False, toy=True)
    assert given.stages[0].epochs == 2 and given.model.arch == "test_efficientnet"  # --set applies on top


def test_batch_larger_than_the_training_set_names_the_key_to_change(toy_data, tmp_path):
    result = CliRunner().invoke(app, ["train", "--data", str(toy_data), "--out", str(tmp_path / "r"),
                                      "--set", "stages.0.batch_size=1000"])
    assert result.exit_code == 2 and "--set stages.0.batch_size=N" in result.output
    assert not (tmp_path / "r").exists()
