"""Data: the toy set (``toy``), ImageFolder → .beton compilation (``beton``, ``manifest``, ``checksums``),
class lists, seeded crops and the FFCV loaders (``loader``). Imports errors/atomic/progress and runtime."""
