"""The run folder's rules (fasttricks/runs/folder.py): a folder without a checkpoint is no run and is
taken over, a resumed run keeps its recipe and names what differs, one process writes a folder at
a time, and `train`'s defaults on the toy set run in CPU-minutes."""

import json
import multiprocessing as mp
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fasttricks.cli import app
from fasttricks.recipes import load_recipe
from fasttricks.runs import folder
from fasttricks.runs.folder import RunFolderError, prepare, recipe_for_train


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
    for resume in (False, True):  # --resume in a folder without checkpoint deletes nothing either
        with pytest.raises(RunFolderError, match="notes.txt"):
            prepare(out, load_recipe("baseline"), resume=resume, overwrite=False)
        assert (out / "notes.txt").read_text() == "mine"


def test_a_retry_of_a_run_that_failed_with_logging_on_takes_its_folder_over(tmp_path):
    out = tmp_path / "r"
    _started_then_failed(out)
    (out / "tb").mkdir()  # what the logging left before the failure
    (out / "tb" / "events.out.tfevents.1").write_text("")
    (out / "wandb").mkdir()
    recipe = load_recipe("baseline", sets=["stages.0.epochs=3"])
    assert prepare(out, recipe, resume=False, overwrite=False) == recipe
    assert {p.name for p in out.iterdir()} == {"config.yaml", "environment.json"}


def test_resume_in_a_folder_with_no_run_is_refused_and_writes_nothing(tmp_path, toy_data):
    out = tmp_path / "nothing"
    result = CliRunner().invoke(app, ["train", "--recipe", "baseline", "--resume", "--out", str(out),
                                      "--data", str(toy_data)])
    assert result.exit_code == 2 and "holds no run to resume" in result.output
    assert not out.exists()
    result = CliRunner().invoke(app, ["train", "--resume", "--out", str(out), "--data", str(toy_data)])
    assert result.exit_code == 2 and "no config.yaml" in result.output and not out.exists()


def _hold_lock(out, ready, release):
    with folder.lock(out):
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
        with pytest.raises(RunFolderError, match=rf"another process \(pid {owner.pid}"), folder.lock(out):
            pass
    finally:
        release.set()
        owner.join(30)
    assert not (out / ".lock").exists()  # released with the run
    # a lock file left by a killed run (a dead pid, no flock held) is stale and is taken over
    (out / ".lock").write_text("999999")
    with folder.lock(out):
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


def _betons(toy_data, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for f in toy_data.glob("*.beton*"):
        shutil.copy(f, data / f.name)
    return data


@pytest.mark.parametrize("damage", ["truncate", "empty", "other-manifest"])
def test_a_damaged_beton_is_one_line_naming_it_and_nothing_is_written(toy_data, tmp_path, damage):
    data = _betons(toy_data, tmp_path)
    beton = data / "val.beton"
    if damage == "truncate":
        with open(beton, "r+b") as f:
            f.truncate(beton.stat().st_size // 2)
    elif damage == "empty":
        beton.write_bytes(b"")
    else:  # another beton under this manifest (train's 400 images where val's 100 are listed)
        shutil.copy(data / "train.beton", beton)
        manifest = json.loads((data / "val.beton.json").read_text())
        manifest.pop("beton_bytes")  # as an older manifest: the sample count still tells them apart
        (data / "val.beton.json").write_text(json.dumps(manifest))
    for command in (["train", "--out", str(tmp_path / "r")], ["eval", str(tmp_path / "w.safetensors")]):
        result = CliRunner().invoke(app, [*command, "--data", str(data)])
        assert result.exit_code == 2 and str(beton) in result.output, result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "r").exists()


def test_a_damaged_checkpoint_is_named_on_resume_and_left_as_it_was(toy_data, tmp_path):
    from fasttricks.training.loop import train

    out = tmp_path / "r"
    recipe = load_recipe("baseline", ["overrides/toy"], ["stages.0.epochs=2", "data.val_resize=48", "data.val_crop=40"])
    train(recipe, toy_data, out, stop_after=1, show_progress=False)
    weights = out / "checkpoints" / "s0-e001" / "model.safetensors"
    weights.write_bytes(b"half a file")
    result = CliRunner().invoke(app, ["train", "--resume", "--out", str(out), "--data", str(toy_data)])
    assert result.exit_code == 2 and "s0-e001 is unreadable" in result.output and "move it aside" in result.output
    assert weights.read_bytes() == b"half a file" and (out / "metrics.jsonl").read_text().count("\n") == 1


def test_zero_workers_means_the_nodes_cores_divided_among_its_processes(monkeypatch):
    from fasttricks.runtime.distributed import default_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers() == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun --nproc-per-node 8
    assert default_workers() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert default_workers() == 1


def test_evaluation_every_k_epochs_and_always_at_a_stages_end(toy_data, tmp_path):
    from fasttricks.training.loop import train

    recipe = load_recipe("baseline", ["overrides/toy"], ["stages.0.epochs=5", "evaluation.every=2",
                                                         "data.val_resize=48", "data.val_crop=40",
                                                         "stages.0.resolution={min: 32, max: 32}"])
    summary = train(recipe, toy_data, tmp_path / "r", show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert ["val_top1" in r for r in rows] == [False, True, False, True, True]
    assert summary["val_top1"] == rows[-1]["val_top1"]


def _lock_after_a_pause(out, opened, go, result):
    """Opens .lock, then waits (as a process descheduled between its open and its flock would)."""
    real_open, paused = open, []

    def slow_open(*args, **kwargs):
        f = real_open(*args, **kwargs)
        if not paused:
            paused.append(True)
            opened.set()
            go.wait(30)
        return f

    folder.open = slow_open  # this child's copy of the module only
    try:
        with folder.lock(out):
            result.put("acquired")
    except RunFolderError as e:
        result.put(str(e))


def test_three_processes_racing_for_a_lock_its_owner_removes_get_one_writer(tmp_path):
    out = tmp_path / "r"
    ctx = mp.get_context("fork")
    a_ready, a_release, c_ready, c_release, opened, go = (ctx.Event() for _ in range(6))
    result = ctx.Queue()
    a = ctx.Process(target=_hold_lock, args=(out, a_ready, a_release))
    a.start()
    assert a_ready.wait(30)
    b = ctx.Process(target=_lock_after_a_pause, args=(out, opened, go, result))
    b.start()
    c = ctx.Process(target=_hold_lock, args=(out, c_ready, c_release))
    try:
        assert opened.wait(30)  # B holds A's lock file open, not yet locked
        a_release.set()
        a.join(30)  # A ends: its .lock is removed and unlocked
        c.start()
        assert c_ready.wait(30)  # C creates a new .lock and holds it
        go.set()  # B locks the file it opened: A's removed one
        assert re.search(rf"another process \(pid {c.pid}", result.get(timeout=30))  # refused: C is the writer
    finally:
        go.set()
        c_release.set()
        for p in (a, b, c):
            p.join(30)


def test_a_full_disk_while_checkpointing_ends_in_one_line_and_keeps_the_last_checkpoint(toy_data, tmp_path,
                                                                                        monkeypatch):
    from safetensors import SafetensorError

    from fasttricks.models import weights

    real_save, calls = weights.save_file, []

    def disk_full_on_the_second_checkpoint(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:  # safetensors' own words for ENOSPC
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(weights, "save_file", disk_full_on_the_second_checkpoint)
    out = tmp_path / "r"
    result = CliRunner().invoke(app, ["train", "--data", str(toy_data), "--out", str(out),
                                      "--override", "overrides/toy", "--set", "stages.0.epochs=3",
                                      "--set", "data.val_resize=48",
                                      "--set", "data.val_crop=40"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"could not write {out / 'checkpoints' / 's0-e002'}: Error while serializing: I/O error: No space" in text
    assert f"the last complete checkpoint, {out / 'checkpoints' / 's0-e001'}, is kept" in text
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["s0-e001"]  # no half-written folder
    assert not (out / "final.safetensors").exists()


def test_a_checkpoint_saved_again_at_its_position_is_never_absent(tmp_path, monkeypatch):
    """Between setting the old folder aside and renaming the new one in place, the old one still counts."""
    from fasttricks.models.factory import create_model
    from fasttricks.recipes import ModelConfig
    from fasttricks.runs import checkpoint
    from fasttricks.runs.checkpoint import Position, list_checkpoints, load_checkpoint, save_checkpoint

    net = create_model(ModelConfig(arch="test_efficientnet"), 10).net
    first = save_checkpoint(tmp_path, Position(0, 1), net, {"arch": "test_efficientnet"}, {"n": 1})
    real_replace = os.replace

    def die_before_the_new_one_lands(src, dst):
        if Path(src).parent == tmp_path / "checkpoints" and Path(src).name.startswith(".s0-e001."):
            raise KeyboardInterrupt  # the process ends between the two renames
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", die_before_the_new_one_lands)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, Position(0, 1), net, {"arch": "test_efficientnet"}, {"n": 2})
    assert not first.exists()  # the window: the old folder is aside, the new one not yet in place
    [(position, path)] = list_checkpoints(tmp_path)
    assert position == Position(0, 1) and load_checkpoint(path)[1]["n"] == 1  # the old one, complete
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    assert save_checkpoint(tmp_path, Position(0, 1), net, {"arch": "test_efficientnet"}, {"n": 3}) == first
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["s0-e001"]
    assert load_checkpoint(first)[1]["n"] == 3


def test_bad_input_is_one_line_and_a_bug_keeps_its_traceback(monkeypatch, toy_data):
    from fasttricks.evaluation import evaluate

    runner = CliRunner()
    zero = runner.invoke(app, ["eval", "no-such.safetensors", "--attack", "linf:8/255:0", "--data", str(toy_data)])
    assert zero.exit_code == 2 and "an evaluation attack takes at least 1 step" in " ".join(zero.output.split())
    assert "Traceback" not in zero.output and "ZeroDivisionError" not in zero.output

    def bug(*args, **kwargs):
        raise ValueError("a bug inside fasttricks")

    monkeypatch.setattr(evaluate, "eval_command", bug)
    result = runner.invoke(app, ["eval", "no-such.safetensors", "--data", str(toy_data)])
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)  # not shortened into "error: ..."
    assert "error:" not in result.output


def test_dry_run_prints_the_resolved_plan_and_writes_nothing(toy_data, tmp_path):
    out = tmp_path / "r"
    result = CliRunner().invoke(app, ["train", "--recipe", "winner", "--data", str(toy_data), "--out", str(out),
                                      "--override", "overrides/toy-winner.yaml", "--dry-run"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "name: winner" in text and "arch: test_efficientnet" in text  # the resolved recipe, as saved
    assert "stage 0 'adversarial': epochs 1-20 of 25" in text and "PGD-2 linf ε 2/255 step 1/255" in text
    assert "resolution 40 px x7, 48 px x5, 56 px x8" in text  # the ramp from epoch 4 to 14, rounded to 8
    assert "then: the FixRes test-size sweep" in text
    assert "stage 1 'behaviour': epochs 21-25 of 25" in text and "frozen first_half" in text
    assert f"data train: {toy_data / 'train.beton'} (400 images, 10 classes)" in text
    assert "overrides/toy-winner.yaml also changes the experiment" in text
    assert "compiled on CUDA, not on the CPU (model.compile: null): at most 7 graphs of the model, dynamo's " \
        "recompile limit set to 11" in text
    assert "  adversarial: 40 px attack (eval, input gradients), 40 px step (train), 48 px attack" in text
    assert "  behaviour: 56 px step (train)" in text  # frozen: a graph of its own
    assert not out.exists()


@pytest.mark.parametrize("world,sets,says", [
    ("1", [], "batch norm: over each process's images: adversarial 64, behaviour 64 images per norm (under torchrun"),
    ("8", [], "batch norm: over each process's images: adversarial 8, behaviour 8 images per norm (the stage's "
              "batch over 8 processes"),
    ("8", ["model.sync_batchnorm=true"], "batch norm: over the global batch on 8 processes (SyncBatchNorm): "
                                         "adversarial 64, behaviour 64 images"),
    ("8", ["model.arch=test_vit"], "normalisation: test_vit has no batch norm: the same run on any number"),
])
def test_dry_run_says_what_batch_norm_normalises_over_at_this_launchs_process_count(toy_data, tmp_path, monkeypatch,
                                                                                     world, sets, says):
    monkeypatch.setenv("WORLD_SIZE", world)  # as torchrun sets it; dry-run starts no process group
    args = ["train", "--recipe", "winner", "--data", str(toy_data), "--out", str(tmp_path / "r"),
            "--override", "overrides/toy-winner.yaml", "--dry-run"]
    result = CliRunner().invoke(app, args + [a for s in sets for a in ("--set", s)])
    assert result.exit_code == 0, result.output
    assert says in " ".join(result.output.split())


def test_a_run_records_what_its_batch_norms_normalised_over(winner_run):
    from fasttricks.models.weights import read_info

    out, summary = winner_run
    expected = {"sync": False, "processes": 1, "images": {"adversarial": 64, "behaviour": 64}}
    assert read_info(out / "final.safetensors")["batch_norm"] == summary["batch_norm"] == expected


@pytest.mark.parametrize("bad", ["model.arch=no_such_net", "stages.0.freeze=[no_such_module]"])
def test_a_recipe_refused_at_its_start_leaves_no_run_folder(toy_data, tmp_path, bad):
    out = tmp_path / "r"
    result = CliRunner().invoke(app, ["train", "--data", str(toy_data), "--out", str(out), "--override",
                                      "overrides/toy", "--set", bad])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert not out.exists()


def test_version_and_the_size_build_beton_reports_are_the_images_not_ffcvs_pages(tmp_path):
    from importlib.metadata import version

    from PIL import Image

    runner = CliRunner()
    assert runner.invoke(app, ["--version"]).output.strip() == f"fasttricks {version('fasttricks')}"
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (96, 96), (i * 40, 0, 0)).save(src / f"{i}.png")
    result = runner.invoke(app, ["build-beton", str(tmp_path / "src"), str(tmp_path / "out.beton"),
                                 "--write-mode", "raw", "--workers", "1"])
    text = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    # 96 x 96 x 3 raw bytes per image, not the 8 MB pages FFCV allocates divided by six images
    assert "27.6 kB per image" in text and "images 166 kB" in text and "(FFCV allocates in pages)" in text
