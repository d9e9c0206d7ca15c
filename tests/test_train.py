"""Training runs on the toy set, on the CPU: it learns, it resumes to the last digit, it stops
cleanly on Ctrl-C and on a non-finite loss, and it leaves the files it promises."""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fasttricks.cli import app
from fasttricks.recipes import PIPELINES, load_recipe
from fasttricks.training import loop as train_mod
from fasttricks.training.interrupts import Interrupted, TrainingDiverged
from fasttricks.training.loop import train

TOY = PIPELINES / "overrides" / "toy.yaml"
TIMING = {"images_per_s", "seconds", "guard_seconds"}


def _recipe(epochs=4, *sets):
    return load_recipe("baseline", [TOY], [f"stages.0.epochs={epochs}", "stages.0.resolution.start_ramp=1",
                                           "stages.0.resolution.end_ramp=3", "data.val_resize=48",
                                           "data.val_crop=40", *sets])


def _rows(run):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _same_weights(a, b):
    wa, wb = load_file(str(a)), load_file(str(b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def full_run(toy_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "full"
    summary = train(_recipe(), toy_data, out, show_progress=False)
    return out, summary


def test_a_run_leaves_every_promised_file(full_run):
    out, summary = full_run
    for name in ("config.yaml", "environment.json", "metrics.jsonl", "final.safetensors", "summary.json"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"s0-e00{i}" for i in range(1, 5)]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert [r["resolution"] for r in rows] == [40, 40, 48, 56]  # ramp from epoch 1 to 3, multiples of 8
    for key in ("stage", "lr", "train_loss", "val_top1", "val_clutter_top1", "images_per_s", "seconds"):
        assert key in rows[0]
    saved = json.loads((out / "summary.json").read_text())
    assert saved == summary and saved["val_top1"] == rows[-1]["val_top1"]
    from importlib import metadata  # the run records the versions it ran with

    assert json.loads((out / "environment.json").read_text())["packages"]["ffcv"] == metadata.version("ffcv")


def test_resume_after_stopping_ends_exactly_where_the_uninterrupted_run_ends(full_run, toy_data, tmp_path):
    out, _ = full_run
    part = train(_recipe(), toy_data, tmp_path / "r", stop_after=2, show_progress=False)
    assert part["stopped_after_epochs"] == 2 and not (tmp_path / "r" / "final.safetensors").exists()
    train(_recipe(), toy_data, tmp_path / "r", resume=True, show_progress=False)
    assert _rows(tmp_path / "r") == _rows(out)
    assert _same_weights(tmp_path / "r" / "final.safetensors", out / "final.safetensors")


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 75)], ids=["Ctrl-C", "SIGTERM"])
def test_ctrl_c_or_sigterm_saves_mid_epoch_and_resume_matches_the_uninterrupted_run(full_run, toy_data, tmp_path,
                                                                                    monkeypatch, signum, code):
    out, _ = full_run
    calls = {"n": 0}
    real_step = train_mod.training_step

    def step_then_signal(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:  # inside epoch 2 (6 steps of 64 per epoch)
            os.kill(os.getpid(), signum)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "training_step", step_then_signal)
    with pytest.raises(Interrupted, match="--resume") as e:
        train(_recipe(), toy_data, tmp_path / "r", show_progress=False)
    assert e.value.exit_code == code
    assert (tmp_path / "r" / "checkpoints" / "s0-e001-step000003").is_dir()
    monkeypatch.setattr(train_mod, "training_step", real_step)
    train(_recipe(), toy_data, tmp_path / "r", resume=True, show_progress=False)
    assert _rows(tmp_path / "r") == _rows(out)
    assert _same_weights(tmp_path / "r" / "final.safetensors", out / "final.safetensors")


def test_sigusr1_under_slurm_saves_requeues_the_job_and_exits_75(toy_data, tmp_path, monkeypatch):
    bin_dir, log = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')  # a stand-in for Slurm's
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    real_step, calls = train_mod.training_step, []

    def step_then_usr1(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)  # sbatch --signal=USR1@120
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "training_step", step_then_usr1)
    out = tmp_path / "r"
    result = CliRunner().invoke(app, ["train", "--data", str(toy_data), "--out", str(out), "--override", str(TOY),
                                      "--set", "data.val_resize=48", "--set", "data.val_crop=40"])
    assert result.exit_code == 75, result.output
    assert log.read_text().split() == ["requeue", "4242"]
    text = " ".join(result.output.split())
    assert "Slurm job 4242 requeued" in text and "Continue with --resume" in text
    assert (out / "checkpoints" / "s0-e000-step000002").is_dir()


def test_non_finite_loss_stops_naming_where_and_keeps_the_last_good_checkpoint(toy_data, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_step = train_mod.training_step

    def nan_in_epoch_two(*args, **kwargs):
        calls["n"] += 1
        loss = real_step(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 8 else loss

    monkeypatch.setattr(train_mod, "training_step", nan_in_epoch_two)
    with pytest.raises(TrainingDiverged) as e:
        train(_recipe(), toy_data, tmp_path / "r", show_progress=False)
    assert "'train', epoch 2, step 2" in str(e.value) and "s0-e001" in str(e.value)
    assert [p.name for p in (tmp_path / "r" / "checkpoints").iterdir()] == ["s0-e001"]


@pytest.fixture(scope="module")
def learned_run(toy_data_learning, tmp_path_factory):
    recipe = _recipe(30, "stages.0.resolution.min=32", "stages.0.resolution.max=40",
                     "stages.0.resolution.start_ramp=3", "stages.0.resolution.end_ramp=12")
    out = tmp_path_factory.mktemp("runs") / "learned"
    return out, train(recipe, toy_data_learning, out, show_progress=False)


def test_a_short_toy_run_learns(learned_run):
    _, summary = learned_run
    # 10 classes, chance 10%. Measured on this project's 2-core CPU machines: 78% (about 25 s).
    assert summary["val_top1"] > 45, summary


def test_pgd_fine_tuning_raises_robust_accuracy_over_plain_fine_tuning(learned_run, toy_data_learning, tmp_path):
    """Both continue the learned model for 8 epochs at lr 0.05; one on L-inf PGD examples
    (eps 4/255, 2 steps). Measured: robust top-1 under PGD-10 at 4/255, 52% (PGD) vs 36% (plain);
    clean 75% vs 80%, the usual price."""
    from fasttricks.evaluation.evaluate import eval_command
    from fasttricks.robust.pgd import parse_attack

    start, _ = learned_run
    common = ["stages.0.resolution.min=40", "stages.0.resolution.max=40", "stages.0.optimizer.lr=0.05",
              "stages.0.schedule.warmup_epochs=0", f"stages.0.weights={start / 'final.safetensors'}"]
    robust = {}
    for name, extra in (("plain", []), ("pgd", ["stages.0.adversarial={norm: linf, eps: 4/255, "
                                                "step_size: 2/255, steps: 2}"])):
        train(_recipe(8, *common, *extra), toy_data_learning, tmp_path / name, show_progress=False)
        report = eval_command(tmp_path / name / "final.safetensors", toy_data_learning, crop=None, resize=None,
                              batch_size=100, device=torch.device("cpu"), attack=parse_attack("linf:4/255:10"))
        robust[name] = report["val"]["robust_top1"]
    assert robust["pgd"] > robust["plain"] + 5, robust


def test_cli_refuses_to_overwrite_a_run_and_eval_reproduces_the_summary(full_run, toy_data):
    out, summary = full_run
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--data", str(toy_data), "--out", str(out), "--override", str(TOY)])
    assert result.exit_code == 2 and "--resume" in result.output and "--overwrite" in result.output
    result = runner.invoke(app, ["eval", str(out), "--data", str(toy_data)])  # the run folder means final.safetensors
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert (report["resize"], report["crop"]) == (48, 40)
    assert report["val"]["top1"] == pytest.approx(summary["val_top1"])
    assert report["val_clutter"]["top1"] == pytest.approx(summary["val_clutter_top1"])


def test_a_run_folder_stands_for_its_final_weights_wherever_weights_are_taken(full_run):
    from fasttricks.models.factory import create_model
    from fasttricks.models.weights import weights_file
    from fasttricks.recipes import ModelConfig

    out, _ = full_run
    assert weights_file(out) == out / "final.safetensors"
    assert weights_file(out / "checkpoints" / "s0-e002") == out / "checkpoints" / "s0-e002" / "model.safetensors"
    net = create_model(ModelConfig(arch="test_efficientnet", weights=str(out)), 10).net  # --set model.weights=RUN
    assert _same_state(net.state_dict(), load_file(str(out / "final.safetensors")))


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_a_different_recipe_is_refused(full_run, toy_data):
    out, _ = full_run
    from fasttricks.runs.folder import RunFolderError

    with pytest.raises(RunFolderError, match=r"keys differ.*stages\.0\.optimizer\.lr: 0\.2 -> 0\.01"):
        train(_recipe(4, "stages.0.optimizer.lr=0.01"), toy_data, out, resume=True, show_progress=False)


def test_resume_with_only_the_run_folder_takes_its_saved_recipe(toy_data, tmp_path):
    out = tmp_path / "r"
    part = train(_recipe(), toy_data, out, stop_after=1, show_progress=False)
    assert part["stopped_after_epochs"] == 1
    # the hint the run prints is the whole command: no recipe, --override or --set repeated
    result = CliRunner().invoke(app, ["train", "--resume", "--out", str(out), "--data", str(toy_data)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    result = CliRunner().invoke(app, ["train", "--resume", "--out", str(out), "--data", str(toy_data),
                                      "--set", "stages.0.epochs=9"])
    assert result.exit_code == 2 and "stages.0.epochs: 4 -> 9" in result.output


@pytest.mark.gpu
def test_cuda_run_in_bf16_learns_and_evaluates_like_its_saved_model(toy_data_learning, tmp_path):
    recipe = _recipe(30, "stages.0.resolution.min=32", "stages.0.resolution.max=40",
                     "stages.0.resolution.start_ramp=3", "stages.0.resolution.end_ramp=12")
    summary = train(recipe, toy_data_learning, tmp_path / "r", device=torch.device("cuda"), show_progress=False)
    assert summary["val_top1"] > 45, summary
    from fasttricks.evaluation.evaluate import eval_command

    report = eval_command(tmp_path / "r" / "final.safetensors", toy_data_learning, crop=None, resize=None,
                          batch_size=200, device=torch.device("cuda"))
    assert report["val"]["top1"] == pytest.approx(summary["val_top1"])


def test_stop_after_counts_epochs_across_stages(toy_data, tmp_path):
    recipe = _recipe(1)
    recipe = recipe.model_copy(update={"stages": [recipe.stages[0],
                                                  recipe.stages[0].model_copy(update={"name": "b", "epochs": 3})]})
    train(recipe, toy_data, tmp_path / "r", stop_after=3, show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in rows] == [("train", 1), ("b", 1), ("b", 2)]


def test_two_stage_recipe_freezes_the_first_half_and_records_it(toy_data, tmp_path):
    recipe = _recipe(1, "stages.0.adversarial={norm: linf, eps: 4/255, step_size: 2/255, steps: 1}")
    recipe = recipe.model_copy(update={"stages": [
        recipe.stages[0],
        recipe.stages[0].model_copy(update={"name": "finetune", "adversarial": None, "freeze": "first_half"})]})
    summary = train(recipe, toy_data, tmp_path / "r", show_progress=False)
    from fasttricks.models.weights import read_info

    info = read_info(tmp_path / "r" / "final.safetensors")
    assert info["frozen"][:2] == ["conv_stem", "bn1"] and info["frozen"][-1] == "blocks.1.0"
    stage1 = load_file(str(tmp_path / "r" / "checkpoints" / "s0-e001" / "model.safetensors"))
    final = load_file(str(tmp_path / "r" / "final.safetensors"))
    frozen_keys = [k for k in final if any(k.startswith(p + ".") for p in info["frozen"])]
    assert frozen_keys and all(torch.equal(final[k], stage1[k]) for k in frozen_keys)
    assert not torch.equal(final["classifier.weight"], stage1["classifier.weight"])
    assert "first_half" in (tmp_path / "r" / "config.yaml").read_text()
    assert [r["stage"] for r in map(json.loads, (tmp_path / "r" / "metrics.jsonl").read_text().splitlines())] \
        == ["train", "finetune"] and summary["epochs"] == 2


def test_augmentation_and_mixing_are_part_of_the_reproducible_run(toy_data, tmp_path):
    """Heavy augmentation + Foreground-CutMix draw from a stream seeded per (seed, epoch, step):
    a resumed run equals the uninterrupted one, and the tricks do change training."""
    tricks = ("stages.0.augment={}", "stages.0.mixing={kind: foreground_cutmix, p: 0.5}")
    full = train(_recipe(2, *tricks), toy_data, tmp_path / "full", show_progress=False)
    train(_recipe(2, *tricks), toy_data, tmp_path / "part", stop_after=1, show_progress=False)
    train(_recipe(2, *tricks), toy_data, tmp_path / "part", resume=True, show_progress=False)
    assert _rows(tmp_path / "part") == _rows(tmp_path / "full")
    assert _same_weights(tmp_path / "part" / "final.safetensors", tmp_path / "full" / "final.safetensors")
    plain = train(_recipe(2), toy_data, tmp_path / "plain", show_progress=False)
    assert plain["train_loss"] != full["train_loss"]


def test_resume_without_data_continues_on_the_runs_own_folder_and_another_is_refused(toy_data, tmp_path):
    out = tmp_path / "r"
    runner = CliRunner()
    sets = ["--set", "stages.0.epochs=2", "--set", "data.val_resize=48", "--set", "data.val_crop=40"]
    first = runner.invoke(app, ["train", "--data", str(toy_data), "--out", str(out), "--override", str(TOY),
                                "--stop-after", "1", *sets])
    assert first.exit_code == 0, first.output
    other = tmp_path / "other"
    other.mkdir()
    for name in ("train.beton", "val.beton"):  # the same images under another folder name
        (other / name).symlink_to(toy_data / name)
        (other / f"{name}.json").symlink_to(toy_data / f"{name}.json")
    refused = runner.invoke(app, ["train", "--resume", "--out", str(out), "--data", str(other)])
    assert refused.exit_code == 2 and f"was trained on --data {toy_data.resolve()}" in " ".join(refused.output.split())
    resumed = runner.invoke(app, ["train", "--resume", "--out", str(out)])  # no --data: the run's own, not toy
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / "summary.json").read_text())["epochs"] == 2
    assert [r["epoch"] for r in _rows(out)] == [1, 2]


def test_output_that_is_not_a_terminal_gets_whole_lines(toy_data, tmp_path):
    """A Slurm log: one whole line per logging point and per epoch, nothing cut at 80 columns."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    run = subprocess.run([sys.executable, "-m", "fasttricks", "train", "--data", str(toy_data), "--out",
                          str(tmp_path / "a-run-folder-with-a-name-long-enough-to-wrap-at-eighty-columns"),
                          "--override", str(TOY), "--set", "stages.0.epochs=1", "--set", "data.val_resize=48",
                          "--set", "data.val_crop=40"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    steps = [line for line in lines if line.startswith("train 1/1 @")]
    assert steps and all("loss" in line and "img/s" in line and "run eta" in line for line in steps)
    epochs = [line for line in lines if line.lstrip().startswith("epoch ")]
    assert len(epochs) == 1 and "val_clutter" in epochs[0]  # the record on one line
    assert not any("━" in line for line in lines)  # no bar drawn into the log
    listing = subprocess.run([sys.executable, "-m", "fasttricks", "recipes"], capture_output=True, text=True, env=env)
    assert "submissions-2022/augmix-fcutmix-robust" in listing.stderr + listing.stdout  # names not cut
