"""Shared fixtures: a small toy data set compiled once per session, device parametrisation."""

from __future__ import annotations

import os
import tempfile

# brainscore's activation cache reads its folder once, when brainscore is first imported: a
# session's scores must neither read nor leave entries in the user's ~/.result_caching.
os.environ["RESULTCACHING_HOME"] = tempfile.mkdtemp(prefix="fasttricks-tests-result-caching-")

import pytest  # noqa: E402
import torch  # noqa: E402
from toy_runs import small_winner  # noqa: E402

from fasttricks.data.sources import ensure_toy_data  # noqa: E402
from fasttricks.data.toy import ToyOptions  # noqa: E402

SMALL_TOY = ToyOptions(seed=0, size=48, train_per_class=40, val_per_class=10, clutter_per_class=10)
# 400 training images are enough to test mechanics but a model only memorises them; learning
# needs the 1,600 of the default set (at 48 px to stay quick).
LEARNING_TOY = ToyOptions(seed=0, size=48, train_per_class=160, val_per_class=10, clutter_per_class=10)


# `make test` runs the suite on two processes, a module to each in turn (pytest-xdist, --dist loadfile);
# the slowest modules go first, so that the two finish together rather than one waiting on the last
# long module (measured with --durations; tests/README.md).
SLOWEST_FIRST = ("test_winner.py", "test_train.py", "test_distributed.py", "test_compile.py", "test_autoattack.py",
                 "test_syncguard.py", "test_fast_at.py", "test_run_format.py", "test_backbones.py", "test_follow.py",
                 "test_guard.py", "test_fixres.py", "test_loader.py", "test_watch.py", "test_runs.py", "test_memory.py",
                 "test_sam.py", "test_heavy.py")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers on two cores: one thread each, not two apiece competing
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module keeps its order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    """Folder with train/val/val_clutter betons of a small toy set (400 training images)."""
    return ensure_toy_data(SMALL_TOY, root=tmp_path_factory.mktemp("cache"), show_progress=False)


@pytest.fixture(scope="session")
def toy_data_learning(tmp_path_factory):
    return ensure_toy_data(LEARNING_TOY, root=tmp_path_factory.mktemp("cache"), show_progress=False)


@pytest.fixture(scope="session")
def winner_run(toy_data, tmp_path_factory):
    """The small winner trained once for the session, uninterrupted: (run folder, summary)."""
    from fasttricks.training.loop import train

    out = tmp_path_factory.mktemp("runs") / "winner"
    return out, train(small_winner(), toy_data, out, show_progress=False)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # `--data toy` inside a test must never write to the user's cache.
    monkeypatch.setenv("FASTTRICKS_CACHE", str(tmp_path_factory.getbasetemp() / "fasttricks-cache"))


@pytest.fixture
def cpu():
    return torch.device("cpu")


def pytest_sessionfinish(session, exitstatus):
    import shutil

    shutil.rmtree(os.environ["RESULTCACHING_HOME"], ignore_errors=True)
