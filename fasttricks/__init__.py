"""fasttricks: the 2022 Brain-Score winning training recipe, fast (FFCV + GPU augmentation)."""

__version__ = "0.1.0"
