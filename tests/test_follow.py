"""Brain-Score beside training: `brainscore follow` scores each checkpoint and the final model once,
into RUN/brainscore/scores.jsonl only; a killed follower restarted loses and repeats nothing; the
scores are drawn beside the curves and shown by status. Stand-in benchmarks (tests/fake_benchmarks.py)
run the export's own activations model: no benchmark data can be downloaded here."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fasttricks.brainscore import follow as follow_mod
from fasttricks.brainscore.export import sha1
from fasttricks.brainscore.follow import follow
from fasttricks.cli import app
from fasttricks.recipes import load_recipe
from fasttricks.runs.scores import read_scores
from fasttricks.training.loop import train

TESTS = Path(__file__).resolve().parent
SETS = ["stages.0.epochs=2", "stages.0.resolution={min: 32, max: 32}", "data.val_resize=40", "data.val_crop=32"]
BENCH = "StandIn.readout"


@pytest.fixture(scope="module")
def finished_run(toy_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "r"
    train(load_recipe("baseline", ["overrides/toy"], SETS), toy_data, out, show_progress=False)
    return out


@pytest.fixture
def stand_in(monkeypatch, tmp_path):
    import brainscore_vision
    from fake_benchmarks import ReadoutBenchmark, stimulus_set

    # a stimulus set of its own per test: brainscore caches activations per (model, stimulus set)
    bench = ReadoutBenchmark(stimulus_set(tmp_path / "stimuli", f"fasttricks-follow-{tmp_path.name}"))
    monkeypatch.setattr(brainscore_vision, "load_benchmark", lambda name: bench)
    return bench


def _copy(run, tmp_path):
    import shutil

    shutil.copytree(run, tmp_path / run.name)
    return tmp_path / run.name


def _listing(run):
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}


def test_follow_once_scores_every_checkpoint_and_the_final_model_once_and_writes_nothing_else(
        finished_run, tmp_path, stand_in):
    run = _copy(finished_run, tmp_path)
    before = _listing(run)
    records = follow(run, [BENCH], once=True)
    assert [r["checkpoint"] for r in records] == ["s0-e001", "s0-e002", "final"]
    files = {"s0-e001": run / "checkpoints/s0-e001/model.safetensors",
             "s0-e002": run / "checkpoints/s0-e002/model.safetensors", "final": run / "final.safetensors"}
    assert all(r["weights_sha1"] == sha1(files[r["checkpoint"]]) and r["error"] is None for r in records)
    assert [(r["stage"], r["epoch"]) for r in records] == [(0, 1), (0, 2), (None, None)]
    assert records[0]["score"] != records[1]["score"]  # the weights differ, and so does what they compute
    # the final model is the last epoch's (no averaging here): its record repeats that score, unscored
    assert records[2]["same_weights_as"] == "s0-e002" and records[2]["score"] == records[1]["score"]
    assert read_scores(run) == records and records[0]["brainscore_vision"]
    after = _listing(run)
    assert {k: v for k, v in after.items() if k != "brainscore/scores.jsonl"} == before  # the run untouched
    assert follow(run, [BENCH], once=True) == []  # each (sha1, benchmark) once


def test_a_killed_follower_restarted_loses_and_repeats_nothing(finished_run, tmp_path, stand_in, monkeypatch):
    run = _copy(finished_run, tmp_path)
    real, calls = follow_mod.score_target, []

    def killed_at_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # kill -INT, in the middle of a score
        return real(*args, **kwargs)

    monkeypatch.setattr(follow_mod, "score_target", killed_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        follow(run, [BENCH], once=True)
    assert [r["checkpoint"] for r in read_scores(run)] == ["s0-e001"]
    monkeypatch.setattr(follow_mod, "score_target", real)
    assert [r["checkpoint"] for r in follow(run, [BENCH], once=True)] == ["s0-e002", "final"]
    assert [r["checkpoint"] for r in read_scores(run)] == ["s0-e001", "s0-e002", "final"]


def test_a_checkpoint_deleted_before_its_turn_is_skipped_and_named(finished_run, tmp_path, stand_in, capsys):
    import shutil

    run = _copy(finished_run, tmp_path)
    real = follow_mod.targets
    targets = real(run)
    shutil.rmtree(run / "checkpoints" / "s0-e001")  # gone between the listing and its turn
    follow_mod.targets = lambda r: targets
    try:
        records = follow(run, [BENCH], once=True)
    finally:
        follow_mod.targets = real
    assert [r["checkpoint"] for r in records] == ["s0-e002", "final"]
    assert "s0-e001: deleted before its turn, skipped" in capsys.readouterr().err


def test_the_scores_are_a_panel_of_the_curves_and_a_line_of_status(finished_run, tmp_path, stand_in, monkeypatch):
    import matplotlib.pyplot as plt

    from fasttricks.runs.plots import curves, plot
    from fasttricks.runs.status import describe, run_status

    run = _copy(finished_run, tmp_path)
    records = follow(run, [BENCH], once=True)
    points = curves(run)[f"brainscore:{BENCH}"]
    assert points == [(1.0, records[0]["score"]), (2.0, records[1]["score"]), (2.0, records[2]["score"])]
    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    plot([run], tmp_path / "c.png")
    [panel] = [ax for ax in figures[0].axes if ax.get_title().startswith("Brain-Score")]
    assert [line.get_label() for line in panel.get_lines()] == [f"r: {BENCH}"]
    assert f"  Brain-Score {BENCH}: {records[-1]['score']:.4f} (final)" in describe(run_status(run))


def test_score_checkpoints_after_the_fact_uses_the_same_records(finished_run, tmp_path, stand_in):
    run = _copy(finished_run, tmp_path)
    result = CliRunner().invoke(app, ["brainscore", "score", str(run), "--benchmark", BENCH, "--checkpoints", "2"])
    assert result.exit_code == 0, result.output
    assert [r["checkpoint"] for r in read_scores(run)] == ["s0-e002"]
    CliRunner().invoke(app, ["brainscore", "score", str(run), "--benchmark", BENCH, "--checkpoints", "all"])
    assert [r["checkpoint"] for r in read_scores(run)] == ["s0-e002", "s0-e001", "final"]  # e002 not again


def test_a_benchmark_that_cannot_load_stops_the_follower_at_its_start_with_nothing_written(finished_run, tmp_path,
                                                                                           monkeypatch):
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # offline
    monkeypatch.setenv("BRAINIO_HOME", str(tmp_path / "brainio"))
    run = _copy(finished_run, tmp_path)
    result = CliRunner().invoke(app, ["brainscore", "follow", str(run), "--benchmark", "Rajalingham2018public-i2n"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "Rajalingham2018public-i2n" in text and "BRAINIO_HOME" in text
    assert not (run / "brainscore").exists()


FOLLOWER = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
import brainscore_vision, fake_benchmarks
stimuli = fake_benchmarks.stimulus_set(Path({stimuli!r}), "fasttricks-follow-live")
bench = fake_benchmarks.ReadoutBenchmark(stimuli)
brainscore_vision.load_benchmark = lambda name: bench
from fasttricks.cli import app
app(["brainscore", "follow", {run!r}, "--benchmark", {bench!r}, "--poll", "0.5"])
"""


def test_a_run_trained_with_the_follower_beside_it_has_every_checkpoint_scored_once(toy_data, tmp_path):
    run = tmp_path / "live"
    code = FOLLOWER.format(tests=str(TESTS), stimuli=str(tmp_path / "stimuli"), run=str(run), bench=BENCH)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    follower = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env)  # started before the run exists, as beside a queued job
    try:
        train(load_recipe("baseline", ["overrides/toy"], [*SETS, "stages.0.epochs=3"]), toy_data, run,
              show_progress=False)
        output, _ = follower.communicate(timeout=300)  # it leaves by itself once the lock is released
    finally:
        follower.kill()
    assert follower.returncode == 0, output
    records = read_scores(run)
    assert [r["checkpoint"] for r in records] == ["s0-e001", "s0-e002", "s0-e003", "final"]
    weights = [run / "checkpoints" / f"s0-e00{e}" / "model.safetensors" for e in (1, 2, 3)]
    weights.append(run / "final.safetensors")
    assert [r["weights_sha1"] for r in records] == [sha1(w) for w in weights]
    assert sorted(p.name for p in run.iterdir()) == ["brainscore", "checkpoints", "config.yaml", "curves.png",
                                                     "environment.json", "final.safetensors", "metrics.jsonl",
                                                     "summary.json"]
    assert [p.name for p in (run / "brainscore").iterdir()] == ["scores.jsonl"]


def test_a_run_that_logs_to_tensorboard_gets_the_scores_in_an_event_file_of_the_followers(finished_run, tmp_path,
                                                                                           stand_in):
    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _copy(finished_run, tmp_path)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["logging"]["tensorboard"] = True  # as if trained with logging.tensorboard: true
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    records = follow(run, [BENCH], once=True)
    [events] = [p for p in (run / "tb").iterdir() if p.name.endswith(".brainscore")]
    acc = EventAccumulator(str(events))
    acc.Reload()
    scalars = acc.Scalars(f"brainscore/{BENCH}")
    assert [(s.step, round(s.value, 4)) for s in scalars] == [(x, round(r["score"], 4))
                                                              for x, r in zip((1, 2, 2), records, strict=True)]


def test_ablate_with_a_benchmark_puts_its_column_beside_the_papers_figure(toy_data, tmp_path, stand_in):
    from fasttricks.recipes import PIPELINES
    from fasttricks.training.ablate import ablate

    folder = tmp_path / "rows"
    folder.mkdir()
    base = PIPELINES / "baseline.yaml"
    (folder / "1-plain.yaml").write_text(f"base: {base}\nname: plain\npaper: {{public_behavior: 0.5133}}\n")
    (folder / "2-cutmix.yaml").write_text(f"base: {base}\nname: cutmix\nstages: {{0: {{mixing: {{kind: cutmix}}}}}}\n")
    sets = ["model.arch=test_efficientnet", "data.val_resize=40", "data.val_crop=32", "data.val_batch_size=200",
            "stages.0.epochs=1", "stages.0.batch_size=64", "stages.0.resolution={min: 32, max: 32}"]
    bench = "Rajalingham2018public-i2n"
    result = ablate(folder, toy_data, tmp_path / "out", sets=sets, benchmarks=[bench])
    for row in result["rows"]:
        final = [r for r in read_scores(Path(row["run"])) if r["checkpoint"] == "final"]
        assert row[f"brainscore:{bench}"] == final[0]["score"]  # the final model's, from the run's records
    table = (tmp_path / "out" / "ablation.md").read_text().splitlines()
    assert f"Brain-Score {bench} (paper)" in table[0]
    plain = result["rows"][0][f"brainscore:{bench}"]
    assert table[2].startswith("| 1-plain |") and f"{plain:.4f} (0.5133)" in table[2]
    assert "(0." not in table[3].split("|")[-2]  # no paper figure for a row the paper has none for


def test_fetch_loads_benchmarks_and_says_where_their_data_went(stand_in, tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINIO_HOME", str(tmp_path / "brainio"))
    result = CliRunner().invoke(app, ["brainscore", "fetch", BENCH])
    text = " ".join(result.output.split())
    assert result.exit_code == 0 and f"loaded {BENCH}" in text and f"BRAINIO_HOME ({tmp_path / 'brainio'})" in text


def test_the_follower_sees_only_the_device_it_is_given(finished_run, tmp_path, stand_in, monkeypatch):
    run = _copy(finished_run, tmp_path)
    for device, visible in (("cpu", ""), ("cuda:1", "1")):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
        result = CliRunner().invoke(app, ["brainscore", "follow", str(run), "--benchmark", BENCH, "--once",
                                          "--device", device])
        assert result.exit_code == 0, result.output
        assert os.environ["CUDA_VISIBLE_DEVICES"] == visible  # set before anything touches CUDA
