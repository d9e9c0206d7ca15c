"""A run folder written by an earlier fasttricks (tests/fixtures/run-f38f2b2, made at f38f2b2 before
the package was regrouped) resumes and evaluates with today's code; the run's state is saved and
restored whole."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fasttricks.cli import app
from fasttricks.runs.checkpoint import Position
from fasttricks.training.state import RunState

FIXTURE = Path(__file__).parent / "fixtures" / "run-f38f2b2"


@pytest.fixture
def old_run(tmp_path, toy_data):
    """The fixture copied, its recorded data folder pointed at this session's identical toy set."""
    out = tmp_path / "old"
    shutil.copytree(FIXTURE, out)
    env = json.loads((out / "environment.json").read_text())
    (out / "environment.json").write_text(json.dumps({**env, "data": str(Path(toy_data).resolve())}))
    return out


def _same_processor(ours: Path, theirs: Path) -> bool:
    """Float results differ between processors: the fixture's first stage equals ours to the bit only
    on a processor like the one that wrote it."""
    a, b = (load_file(str(p / "checkpoints" / "s0-e002" / "model.safetensors")) for p in (ours, theirs))
    return all(torch.equal(a[k], b[k]) for k in a)


def test_the_state_of_a_f38f2b2_checkpoint_is_read_whole(old_run):
    """What a resume continues from, checked by meaning, on any processor: the position, the frozen
    modules, Adam's moments and step count for every parameter the stage trains (after as many steps
    as the epoch recorded), and the RNG stream, restored into a fresh optimizer as saved."""
    from fasttricks.models.factory import create_model
    from fasttricks.models.freezing import freeze
    from fasttricks.recipes import load_recipe
    from fasttricks.training.step import create_optimizer

    weights, state = RunState.load(old_run / "checkpoints" / "s1-e001")
    assert state.position == Position(1, 1)
    rows = [json.loads(line) for line in (old_run / "metrics.jsonl").read_text().splitlines()]
    steps = next(r["steps"] for r in rows if (r["stage"], r["epoch"]) == ("behaviour", 1))
    recipe = load_recipe(old_run / "config.yaml")
    model = create_model(recipe.model, state.info["num_classes"])
    model.net.load_state_dict(weights)
    freeze(model.net, state.info["frozen"])
    assert state.info["frozen"] and all(not p.requires_grad for n, p in model.net.named_parameters()
                                        if n.startswith(state.info["frozen"][0] + "."))
    optimizer = create_optimizer(model, recipe.stages[1].optimizer)
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    state.restore_into(optimizer, None)
    assert len(optimizer.state) == len(trained) > 0  # a moment for every trained parameter
    for p in trained:
        moments = optimizer.state[p]
        assert int(moments["step"]) == steps
        assert moments["exp_avg"].shape == p.shape and moments["exp_avg"].abs().sum() > 0
    assert len(state.rng_by_rank) == 1
    assert torch.equal(torch.get_rng_state(), state.rng_by_rank[0]["torch"])  # restored as saved


def test_a_run_folder_of_f38f2b2_resumes_to_the_end_of_an_uninterrupted_run(old_run, winner_run):
    """Resumed with today's code, the fixture ends as the run does, on any processor; where this
    processor computes the fixture's first stage to the bit (the one that wrote it), it ends with the
    weights of the session's uninterrupted run to the bit too. Elsewhere float differences since the
    first step make that comparison meaningless, and the state's wholeness is checked by meaning
    (the test above)."""
    result = CliRunner().invoke(app, ["train", "--resume", "--out", str(old_run)])
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.output and "s1-e001" in result.output
    rows = [json.loads(line) for line in (old_run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"], r.get("averaged")) for r in rows] == [
        ("adversarial", 1, None), ("adversarial", 2, None), ("behaviour", 1, None), ("behaviour", 2, None),
        ("behaviour", 3, None), ("behaviour", 3, "epochs 2,3")]
    fresh, _ = winner_run
    ours, theirs = load_file(str(fresh / "final.safetensors")), load_file(str(old_run / "final.safetensors"))
    assert ours.keys() == theirs.keys()
    if _same_processor(fresh, old_run):  # then to the bit, every tensor
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    summary = json.loads((old_run / "summary.json").read_text())
    assert summary["robust_attack"] == "linf:2/255:2" and "test_crop" in summary


def test_a_checkpoint_of_f38f2b2_evaluates_with_its_recorded_classes_and_test_size(old_run, toy_data):
    result = CliRunner().invoke(app, ["eval", str(old_run / "checkpoints" / "s1-e001"), "--data", str(toy_data)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output.strip().splitlines()[-1])
    assert (metrics["resize"], metrics["crop"]) == (48, 40)  # the recipe's val sizes, recorded in the checkpoint
    recorded = json.loads((old_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["val"]["top1"] == recorded["val_top1"]  # what the run measured after that epoch


def test_every_field_of_the_runs_state_survives_a_checkpoint(tmp_path):
    net = torch.nn.Linear(3, 2)
    values = {"optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
              "ema": {"weight": torch.ones(2, 3), "bias": torch.zeros(2)},
              "rng_by_rank": [{"torch": torch.get_rng_state()}], "loss_sum": torch.tensor(3.5, dtype=torch.float64),
              "seen": 1234, "seconds": 5.5}
    names = {f.name for f in dataclasses.fields(RunState)} - {"position", "info"}
    assert names == values.keys(), "a new field of RunState needs a value here"
    state = RunState(Position(1, 2, 3), {"arch": "x", "frozen": ["a"], "guard": {"0": {"best": 0.5}}}, **values)
    state.save(tmp_path, net)
    weights, back = RunState.load(tmp_path / "checkpoints" / Position(1, 2, 3).name())
    assert back.position == state.position and back.info == state.info
    for name, value in values.items():
        got = getattr(back, name)
        if isinstance(value, torch.Tensor):
            assert torch.equal(got, value), name
        elif name == "ema":
            assert all(torch.equal(got[k], v) for k, v in value.items()), name
        elif name == "rng_by_rank":
            assert torch.equal(got[0]["torch"], value[0]["torch"]), name
        else:
            assert got == value, name
    assert torch.equal(weights["weight"], net.weight.detach())
