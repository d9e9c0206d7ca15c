"""Write-then-rename: a file is either complete or absent, never half-written."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fasttricks.errors import OutputUnusable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_folder(path: str | os.PathLike) -> Path:
    """``path`` as a folder, with its parents; a path that cannot be one (a file there or above it,
    no permission) is a ``OutputUnusable`` naming it, never a traceback."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputUnusable(f"{path} is a file, not a folder: choose another output path") from None
    except NotADirectoryError:
        above = next((p for p in path.parents if p.is_file()), path.parent)
        raise OutputUnusable(f"{path} cannot be a folder: {above} is a file") from None
    except PermissionError:
        raise OutputUnusable(f"{path}: no permission to create this folder") from None
    except OSError as e:  # a read-only file system, a name too long...
        raise OutputUnusable(f"{path}: cannot create this folder ({e.strerror or e})") from None
    return path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it becomes ``path`` (with the usual
    permissions, not mkstemp's private 0600), on any exception it is removed."""
    path = Path(path)
    if path.is_dir():
        raise OutputUnusable(f"{path} is a folder, not a file: choose another output path")
    make_folder(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
