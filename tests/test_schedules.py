import pytest

from fasttricks.recipes import ResolutionConfig, ScheduleConfig
from fasttricks.recipes.schedules import lr_factor, resolution_at


def test_warmup_then_linear_decay_to_the_final_factor():
    cfg = ScheduleConfig(name="linear", warmup_epochs=2, warmup_factor=0.1, final_factor=0.0)
    assert lr_factor(cfg, 0, 10) == pytest.approx(0.1)
    assert lr_factor(cfg, 1, 10) == pytest.approx(0.55)
    assert lr_factor(cfg, 2, 10) == pytest.approx(1.0)
    assert lr_factor(cfg, 6, 10) == pytest.approx(0.5)
    assert lr_factor(cfg, 10, 10) == pytest.approx(0.0)


def test_cosine_and_step_and_constant():
    cos = ScheduleConfig(name="cosine", final_factor=0.1)
    assert lr_factor(cos, 0, 4) == pytest.approx(1.0)
    assert lr_factor(cos, 2, 4) == pytest.approx(0.55)
    assert lr_factor(cos, 4, 4) == pytest.approx(0.1)
    step = ScheduleConfig(name="step", step_epochs=[2, 4], gamma=0.5)
    assert [lr_factor(step, e, 6) for e in (0, 2, 3.9, 4, 5)] == [1, 0.5, 0.5, 0.25, 0.25]
    assert lr_factor(ScheduleConfig(name="constant"), 3, 4) == 1.0


def test_progressive_resolution_ramps_and_rounds_like_ffcv():
    cfg = ResolutionConfig(min=160, max=192, start_ramp=2, end_ramp=6, multiple=32)
    assert [resolution_at(cfg, e) for e in range(8)] == [160, 160, 160, 160, 192, 192, 192, 192]
    fine = ResolutionConfig(min=160, max=192, start_ramp=2, end_ramp=6, multiple=8)
    assert [resolution_at(fine, e) for e in range(8)] == [160, 160, 160, 168, 176, 184, 192, 192]


def test_rounding_never_leaves_the_range_and_a_flat_schedule_is_constant():
    assert resolution_at(ResolutionConfig(min=240, max=240, multiple=32), 0) == 240
    assert {resolution_at(ResolutionConfig(min=56, max=56, multiple=8), e) for e in range(5)} == {56}
