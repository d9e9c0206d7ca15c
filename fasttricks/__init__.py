"""fasttricks: the 2022 Brain-Score winning training recipe, fast (FFCV + GPU augmentation).

The packages stand in layers, each importing only those below it (tests/test_architecture.py):
errors/atomic/progress, runtime, recipes, data, models, augment, robust, runs, brainscore,
evaluation, training, and cli.py on top."""
