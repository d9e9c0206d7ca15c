"""benchmarks/gpu_suite.py: the table states every goal against its measured figure, a missing
figure as not measured (never as met), and the GPU tests it runs are all of them."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402


def test_the_table_compares_each_figure_with_its_goal_and_never_passes_a_missing_one():
    figures = {
        "train step": {"results": [{"row": "behaviour", "saturation": 0.96},
                                   {"row": "compile", "images_per_s_compiled": 812.5},
                                   {"row": "projection", "recipe": "winner", "hours": 9.4},
                                   {"row": "projection", "recipe": "winner-fast", "hours": 7.3}]},
        "augmentation": {"images_per_s_batched_compiled": None},
    }
    status = [{"part": "train step", "rc": 0, "seconds": 200.0}, {"part": "augmentation", "rc": "timeout",
                                                                  "seconds": 75.0}]
    md = gpu_suite.table(status, figures, "NVIDIA H100 80GB HBM3", "7 passed")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("| ")}
    assert rows["behaviour-stage saturation with augmentation"].endswith("| 0.96 | yes |")
    assert rows["PGD-3 EfficientNet-B1 at 240, compiled (img/s)"].endswith("| 812.5 | no |")
    assert rows["projected winner recipe on ImageNet (h)"].endswith("| 9.4 | yes |")  # a ceiling: ≤ 10
    assert rows["projected winner-fast recipe on ImageNet (h)"].endswith("| 7.3 | no |")  # each recipe's own row
    assert rows["heavy aug + F-CutMix at 224, compiled (img/s)"].endswith("| not measured | – |")
    assert "| augmentation | timeout | 75.0 |" in md and "NVIDIA H100 80GB HBM3" in md


def test_the_suite_runs_every_test_module_that_holds_gpu_tests():
    listed = set(gpu_suite.gpu_test_files())
    expected = {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py")
                if any(line.startswith("@pytest.mark.gpu") for line in p.read_text().splitlines())}
    assert listed == expected and "tests/test_syncguard.py" in listed
