"""Progress bars and console output, in one place so every command looks the same."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def _console() -> Console:
    """stderr; when it is not a terminal (a Slurm log, a pipe), whole lines: no wrapping at 80
    columns inside a record or a path, and tables as wide as their rows."""
    c = Console(stderr=True)
    if not c.is_terminal:
        c = Console(stderr=True, soft_wrap=True, width=None if "COLUMNS" in os.environ else 200)
    return c


console = _console()
PLAIN_EVERY_S = 10.0  # without a terminal: a progress line at least this often (and at each logging point)


@contextmanager
def progress_bar(description: str, total: int, *, enabled: bool = True, extra: str = "",
                 **fields) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n, **fields)``; ``extra`` is a format string over ``task.fields``, whose
    first values are ``fields``."""
    if not enabled:
        yield lambda n=1, **fields: None
        return
    if not console.is_terminal:
        yield _plain_lines(description, total, extra, fields)
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    if extra:
        columns.append(TextColumn(extra))
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, **fields)

        def advance(n: int = 1, **fields) -> None:
            progress.update(task, advance=n, **fields)

        yield advance


def _plain_lines(description: str, total: int, extra: str, fields: dict) -> Callable[..., None]:
    """``advance`` for output that is not a terminal: one whole line per update that brings new
    fields (a training logging point), at the end, and otherwise at most every PLAIN_EVERY_S seconds."""
    state = {"done": 0, "fields": dict(fields), "last": time.monotonic(), "start": time.monotonic()}

    def advance(n: int = 1, **new_fields) -> None:
        state["done"] += n
        state["fields"].update(new_fields)
        now = time.monotonic()
        if not (new_fields or state["done"] >= total or now - state["last"] >= PLAIN_EVERY_S):
            return
        state["last"] = now
        task = SimpleNamespace(fields=state["fields"])
        line = f"{description} {state['done']}/{total} {now - state['start']:.0f}s"
        console.print(line + (" · " + extra.format(task=task) if extra else ""), markup=False, highlight=False)

    return advance
