"""The run folder and every file in it: creation, lock and metrics (``folder``), checkpoints,
Brain-Score records (``scores``), status and ETA, curves. Imports recipes and models."""
