"""`fasttricks show-augs` (fasttricks/augment/preview.py): the grid is written, and a stage with
nothing to show says so and where to look instead."""

from PIL import Image
from typer.testing import CliRunner

from fasttricks.cli import app

SMALL = ["--set", "data.workers=1", "--override", "overrides/toy-winner.yaml"]


def test_show_augs_writes_a_grid_of_the_stage_with_augmentation(toy_data, tmp_path):
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(app, ["show-augs", "--recipe", "winner", "--stage", "1", "--data", str(toy_data),
                                      "--out", str(out), "--n", "4", *SMALL])
    assert result.exit_code == 0, result.output
    width, height = Image.open(out).size
    assert width > height > 100  # two rows of four


def test_a_stage_without_augmentation_says_why_and_names_the_stage_that_has_it(toy_data, tmp_path):
    result = CliRunner().invoke(app, ["show-augs", "--recipe", "winner", "--stage", "0", "--data", str(toy_data),
                                      "--out", str(tmp_path / "g.png"), *SMALL])
    assert result.exit_code == 2 and "has no augmentation or mixing" in result.output and "--stage 1" in result.output
    assert not (tmp_path / "g.png").exists()
