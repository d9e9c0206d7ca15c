"""Every output path a user names that cannot serve (a file where a folder goes, a folder below a
file, a folder where a file goes) ends the command in one line naming it, exit 2, and nothing is
written (fasttricks/atomic.py's make_folder and atomic_path)."""

import pytest
import torch
from typer.testing import CliRunner

from fasttricks.cli import app
from fasttricks.models.factory import create_model
from fasttricks.models.weights import save_weights
from fasttricks.recipes import ModelConfig


@pytest.fixture
def blocker(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    return path


def _weights(tmp_path, name: str):
    torch.manual_seed(0)
    model = create_model(ModelConfig(arch="test_efficientnet"), 10)
    info = {"arch": "test_efficientnet", "num_classes": 10, "classes": [str(i) for i in range(10)],
            "mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist(), "val_resize": 48,
            "val_crop": 40}
    save_weights(tmp_path / name, model.net, info)
    return str(tmp_path / name)


CASES = {
    "train --out FILE": lambda d, t, b: ["train", "--recipe", "winner", "--data", d,
                                         "--override", "pipelines/overrides/toy-winner.yaml", "--out", str(b)],
    "train --out FILE/run": lambda d, t, b: ["train", "--recipe", "winner", "--data", d, "--override",
                                             "pipelines/overrides/toy-winner.yaml", "--out", str(b / "run")],
    "make-toy FILE": lambda d, t, b: ["make-toy", str(b), "--train-per-class", "1", "--val-per-class", "1"],
    "build-beton SRC FILE/x.beton": lambda d, t, b: ["build-beton", str(t / "images"), str(b / "x.beton")],
    "average --out FILE/x": lambda d, t, b: ["average", _weights(t, "a.safetensors"), _weights(t, "b.safetensors"),
                                             "--out", str(b / "avg.safetensors")],
    "average --out FOLDER": lambda d, t, b: ["average", _weights(t, "a.safetensors"), _weights(t, "b.safetensors"),
                                             "--out", str(t)],
}


@pytest.mark.parametrize("case", CASES)
def test_an_output_path_that_cannot_serve_is_one_line_naming_it_and_exit_2(case, toy_data, tmp_path, blocker):
    (tmp_path / "images" / "cat").mkdir(parents=True)  # build-beton reads its source before it writes
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "cat" / "0.jpg")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(app, CASES[case](str(toy_data), tmp_path, blocker))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    line = result.output.strip().splitlines()[-1]  # (train first prints what the override changes)
    named = str(tmp_path) if case.endswith("FOLDER") else str(blocker)
    assert line.startswith("error:") and named in line, line
    assert blocker.read_text() == "not a folder"
    after = sorted(p.name for p in tmp_path.rglob("*") if not p.name.endswith(".safetensors"))
    assert after == [n for n in before if not n.endswith(".safetensors")]  # nothing half-written
