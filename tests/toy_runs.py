"""Toy recipes that several test modules train (the session trains each once: conftest.py)."""

# The winner recipe at the smallest size that still has both stages, averaging, FixRes and a robust
# evaluation (tests/fixtures/run-f38f2b2 was written with these settings).
TOY_WINNER = "overrides/toy-winner.yaml"
SMALL_WINNER = ["data.val_resize=48", "data.val_crop=40", "stages.0.epochs=2", "stages.1.epochs=3",
                "stages.0.resolution={min: 32, max: 40, start_ramp: 0, end_ramp: 1, multiple: 8}",
                "stages.1.resolution={min: 40, max: 40}", "stages.1.average.last=2",
                "stages.1.average.bn_batches=3", "evaluation.attack.steps=2"]


def small_winner(*sets):
    from fasttricks.recipes import load_recipe

    return load_recipe("winner", [TOY_WINNER], [*SMALL_WINNER, *sets])
