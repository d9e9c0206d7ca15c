"""``RUN/brainscore/scores.jsonl``: the Brain-Score records a follower appends beside training (one
JSON line each, fsynced) and what status, plots and ablate read back from it."""

from __future__ import annotations

import json
import os
from pathlib import Path

SCORES = Path("brainscore") / "scores.jsonl"


BRAINSCORE = "brainscore:"  # the prefix of a benchmark's metric in curves and ablate's columns


def read_scores(run: Path) -> list[dict]:
    path = run / SCORES
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_score(run: Path, record: dict) -> None:
    path = run / SCORES
    path.parent.mkdir(exist_ok=True)
    with open(path, "a") as f:  # one line a record, flushed: a reader never sees half of one
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def epoch_of(record: dict, starts: list[int], total: int) -> int:
    """A record's epoch of the whole run (the final model: the last epoch)."""
    return total if record["stage"] is None else starts[record["stage"]] + record["epoch"]


def last_scores(run: Path) -> dict[str, dict]:
    """The newest score of each benchmark (for ``status``)."""
    latest: dict[str, dict] = {}
    for record in read_scores(run):
        if record["error"] is None:
            latest[record["benchmark"]] = record
    return latest
