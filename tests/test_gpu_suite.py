"""benchmarks/gpu_suite.py and projection.py: the table states every goal against its measured
figure, a missing figure as not measured (never as met); the GPU tests it runs are all of them;
its time limits keep `make bench-gpu` inside 8 minutes and `make gpu-tests` inside the lease; the
projection's arithmetic."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402
import projection  # noqa: E402


def _steps(rates: dict[tuple[str, str], float], res: int = 240) -> list[dict]:
    return [{"row": "step", "method": m, "mode": mode, "res": res, "images_per_s": v} for (m, mode), v in rates.items()]


def _rows(md: str) -> dict[str, str]:
    return {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("| ")}


def test_the_table_compares_each_figure_with_its_goal_and_never_passes_a_missing_one():
    figures = {
        "train step": {"results": [{"row": "behaviour", "saturation": 0.96},
                                   {"row": "pgd", "pgd_steps": 3, "saturation": 0.9},
                                   *_steps({("pgd-3", "compiled"): 812.5, ("pgd-3", "eager"): 665.0})]},
        "augmentation": {"images_per_s_batched_compiled": None},
        "projection": {"projection": {"eager": {"winner": {"hours": 9.4}, "winner-pretrained": {"hours": 5.2}},
                                      "compiled": {"winner-fast": {"hours": 6.1}}}},
    }
    status = [{"part": "train step", "rc": 0, "seconds": 200.0}, {"part": "augmentation", "rc": "timeout",
                                                                  "seconds": 60.0}]
    rows = _rows(gpu_suite.table(status, figures, "NVIDIA H200", "7 passed"))
    assert rows["loader saturation, behaviour stage (fed + augmented / synthetic)"].endswith("| 0.96 | yes |")
    assert rows["loader saturation, robust stage (PGD-3, fed + augmented / synthetic)"].endswith("| 0.9 | no |")
    assert rows["PGD-3 step, compiled (img/s)"].endswith("| >= 1,000 | 812.5 | no |")
    assert rows["PGD-3 step, eager (img/s)"].endswith("| – | 665.0 | – |")  # a figure without a goal
    assert rows["projected winner on ImageNet, eager rates (h)"].endswith("| <= 10 | 9.4 | yes |")  # a ceiling
    assert rows["projected winner-pretrained on ImageNet, eager rates (h)"].endswith("| <= 5 | 5.2 | no |")
    assert rows["projected winner-fast on ImageNet, compiled rates (h)"].endswith("| <= 7 | 6.1 | yes |")
    assert rows["projected winner-fast on ImageNet, eager rates (h)"].endswith("| not measured | – |")
    assert rows["heavy aug + F-CutMix, compiled (img/s)"].endswith("| not measured | – |")
    assert rows["augmentation"].endswith("| timeout | 60.0 |")


def test_the_suite_fails_when_a_part_fails_or_a_figure_is_missing_never_for_a_missed_goal():
    figures = {"train step": {"results": [{"row": "pgd", "pgd_steps": 3, "saturation": 0.5},
                                          {"row": "behaviour", "saturation": 0.5},
                                          *_steps({(m, mode): 1.0 for m in ("plain", "pgd-3", "n-fgsm")
                                                   for mode in ("eager", "compiled")}),
                                          *[{"row": "backbone_step", "recipe": r, "method": m, "images_per_s": 1.0}
                                            for r in ("winner-convnext", "winner-vit") for m in ("plain", "pgd-3")]]},
               "augmentation": {"images_per_s_batched_compiled": 1.0, "images_per_s_batched_on_device": 1.0},
               "projection": {"projection": {mode: {r: {"hours": 99.0} for r in (
                   "winner", "winner-fast", "winner-pretrained", "winner-convnext", "winner-vit")}
                   for mode in ("eager", "compiled")}}}
    ran = [{"part": p, "rc": 0} for p in ("train step", "augmentation", "projection", "gpu tests")]
    assert gpu_suite.verdict(figures, ran) is None  # every goal missed, every figure there: status 0
    del figures["augmentation"]
    said = gpu_suite.verdict(figures, ran)
    assert said.startswith("gpu_suite: 2 figure(s) not measured") and "heavy aug + F-CutMix, compiled" in said
    assert gpu_suite.verdict(figures, ran, complete=False) is None  # --only: the parts asked for
    ran[-1]["rc"] = 2  # a GPU test module that does not import
    assert gpu_suite.verdict(figures, ran, complete=False) == "gpu_suite: 1 part(s) failed: gpu tests (exit 2)"


def test_the_suite_runs_every_test_module_that_holds_gpu_tests():
    listed = set(gpu_suite.gpu_test_files())
    expected = {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py")
                if any(line.startswith("@pytest.mark.gpu") for line in p.read_text().splitlines())}
    assert listed == expected and "tests/test_syncguard.py" in listed


def test_the_gpu_budgets_fit_one_call_of_eight_minutes_and_the_tests_call_fits_the_lease(tmp_path):
    """The docstring's promise: each part's limit comes from what it starts, compiles and runs; the
    figures' parts with the bundle's install fit 8 minutes even when each runs to its limit; the
    GPU tests' own call (7 compiled toy runs) fits the same lease; the cheapest figures come first."""
    size = gpu_suite.SIZES["gpu"]
    limits = size["limits"]
    names = [name for name, _, _ in gpu_suite.parts("NVIDIA-H200", tmp_path, size)]
    assert names == list(limits) == gpu_suite.SUITES["figures"] + gpu_suite.SUITES["tests"]
    assert gpu_suite.budget_problems(limits) == []
    assert gpu_suite.INSTALL_S + sum(limits[n] for n in gpu_suite.SUITES["figures"]) <= 8 * 60
    assert names[:2] == ["eager steps", "projection (eager)"]  # three step figures and three hours, first
    assert limits["compiled steps"] >= gpu_suite.START_S + 2 * gpu_suite.COMPILE_S  # two cold graphs
    assert limits["gpu tests"] >= 7 * gpu_suite.TOY_RUN_S
    too_long = gpu_suite.budget_problems({**limits, "gpu tests": 420, "augmentation": 200})
    assert len(too_long) == 2 and "over its 480 s" in too_long[0] and "over the lease's 900 s" in too_long[1]
    eager = next(cmd for name, cmd, _ in gpu_suite.parts("t", tmp_path, size) if name == "eager steps")
    assert eager[eager.index("--res") + 1] == "240" and "efficientnet_b1" in eager
    assert eager[eager.index("--rows") + 1] == "steps_eager,backbones" and "--append" not in eager  # a fresh file


def test_the_projection_reproduces_the_published_h100_hours_from_the_eager_rates_of_2026_11_22():
    """The older file format (pgd rows, N-FGSM at PGD-1's rate) gives the figures the README
    quotes, and winner-pretrained's under the same rates."""
    report = json.loads(projection.DEFAULT_RATES.read_text())
    augmented = json.loads(projection.DEFAULT_AUGMENTED.read_text())
    hours = {name: r["hours"] for name, r in projection.project(report, augmented)["eager"].items()}
    assert hours["winner"] == pytest.approx(15.36, abs=0.01)
    assert hours["winner-fast"] == pytest.approx(10.80, abs=0.01)
    assert hours["winner-pretrained"] == pytest.approx(4.40, abs=0.01)


def test_the_projection_scales_each_step_rate_by_pixels_and_adds_the_behaviour_stage_at_its_saturation():
    rates = {("plain", "eager"): 2000.0, ("pgd-3", "eager"): 600.0, ("n-fgsm", "eager"): 1200.0}
    report = {"settings": {"res": 240}, "results": [*_steps(rates), {"row": "pgd", "pgd_steps": 3, "saturation": 0.5},
                                                    {"row": "behaviour", "saturation": 0.8}]}
    terms = projection.project(report)["eager"]["winner-pretrained"]["terms"]
    at_192 = next(t for t in terms if t["res"] == 192)
    assert at_192["images_per_s"] == pytest.approx(600 * 0.5 * (240 / 192) ** 2, abs=0.1)  # PGD-3, fed, 192 px
    assert at_192["epochs"] == 3 and at_192["hours"] == pytest.approx(3 * 1_281_167 / at_192["images_per_s"] / 3600,
                                                                      abs=1e-3)
    behaviour = [t for t in terms if t["stage"] == "behaviour"]
    assert len(behaviour) == 1 and behaviour[0]["images_per_s"] == pytest.approx(2000 * 0.8)
    assert sum(t["epochs"] for t in terms if t["stage"] == "robust-finetune") == 8
    fast = projection.project(report)["eager"]["winner-fast"]["terms"]
    assert {t["method"] for t in fast} >= {"N-FGSM", "PGD-3", "guard: PGD-10 on 1024 images"}
    nfgsm_224 = next(t for t in fast if t["method"] == "N-FGSM" and t["res"] == 224)
    assert nfgsm_224["images_per_s"] == pytest.approx(1200 * 0.5 * (240 / 224) ** 2, abs=0.1)
