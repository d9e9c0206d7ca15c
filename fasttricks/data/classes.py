"""Class ids: one list for the whole data folder. A label is an index into the train split's
class list; every other split is compiled against that list (``build-beton --classes-from``), and
a folder whose splits disagree, or a model trained on other classes, is refused: a shifted label
would turn every accuracy figure into a wrong number without an error."""

from __future__ import annotations

import os
from pathlib import Path

from fasttricks.data.manifest import BuildError, check_beton


class ClassListError(BuildError):
    """Two class lists that should be one; the message names the classes that differ."""


def _difference(a: list[str], b: list[str]) -> str:
    missing, extra = [c for c in a if c not in set(b)], [c for c in b if c not in set(a)]
    parts = []
    if missing:
        parts.append(f"lacks {_names(missing)}")
    if extra:
        parts.append(f"adds {_names(extra)}")
    if not parts:
        first = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
        parts.append(f"numbers them in another order (id {first}: {a[first]!r} against {b[first]!r})")
    return ", ".join(parts)


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return f"{len(names)} class(es): {shown}" + (" ..." if len(names) > limit else "")


def checked_manifests(data_dir: str | os.PathLike) -> dict[str, dict]:
    """Each split's manifest, read once, after checking that every beton is whole and that every
    split uses the train split's class list."""
    from fasttricks.data.loader import beton_paths

    paths = beton_paths(data_dir)
    manifests = {split: check_beton(path) for split, path in paths.items()}
    classes = manifests["train"]["classes"]
    for split, manifest in manifests.items():
        if manifest["classes"] != classes:
            raise ClassListError(
                f"{Path(data_dir)}: {paths[split].name} does not use train.beton's class ids: it "
                f"{_difference(classes, manifest['classes'])}. Rebuild it with `fasttricks build-beton SRC "
                f"{paths[split]} --classes-from {paths['train']} --overwrite`")
    return manifests


def data_classes(data_dir: str | os.PathLike) -> list[str]:
    """The train split's class list, after the checks of ``checked_manifests``."""
    return checked_manifests(data_dir)["train"]["classes"]


def check_model_classes(model_classes: list[str], weights: str | os.PathLike, data: list[str],
                        data_dir: str | os.PathLike) -> None:
    """Refuse to evaluate a model on data of other classes (its accuracy would be meaningless)."""
    if list(model_classes) != list(data):
        raise ClassListError(f"{weights} was trained on {len(model_classes)} classes ({_names(model_classes)}) "
                             f"but {data_dir} has {len(data)} ({_names(data)}): its data "
                             f"{_difference(list(model_classes), list(data))}; evaluate it on the data it was "
                             f"trained on")
