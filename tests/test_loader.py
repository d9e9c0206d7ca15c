"""The training loader's reproducibility contract: every crop, flip and order is a function of
(seed, epoch, sample index), whatever the thread count, batch position or resume point."""

import numpy as np
import pytest
import torch

from fasttricks.data import loader as loader_mod
from fasttricks.data.crops import crop_box, sample_key, uniform
from fasttricks.data.loader import SeededBlockOrder, SeededOrder, TrainLoader, ValLoader
from fasttricks.data.manifest import BuildError


def _epoch(beton, *, seed=0, epoch=0, res=32, workers=2, skip=0, batch_size=32):
    loader = TrainLoader(beton, batch_size=batch_size, resolution=res, seed=seed,
                         device=torch.device("cpu"), workers=workers)
    return [(x.clone(), y.clone()) for x, y in loader.epoch(epoch, res, skip_batches=skip)]


def _same(a, b):
    if len(a) != len(b):
        return False
    return all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True))


def test_batches_are_float_channels_last_in_unit_range(toy_data):
    images, labels = _epoch(toy_data / "train.beton")[0]
    assert images.shape == (32, 3, 32, 32) and images.dtype == torch.float32
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0.05
    assert labels.dtype == torch.long and set(labels.tolist()) <= set(range(10))


def test_same_seed_same_batches_whatever_the_thread_count(toy_data):
    beton = toy_data / "train.beton"
    assert _same(_epoch(beton, workers=2), _epoch(beton, workers=1))


def test_seed_and_epoch_each_change_the_crops(toy_data):
    beton = toy_data / "train.beton"
    base = _epoch(beton)
    assert not torch.equal(base[0][0], _epoch(beton, seed=1)[0][0])
    assert not torch.equal(base[0][0], _epoch(beton, epoch=1)[0][0])


def test_a_sample_gets_the_same_crop_whichever_batch_it_falls_in(toy_data):
    """Order changes with the batch size's drop_last trimming, crops must not."""
    beton = toy_data / "train.beton"
    small = _epoch(beton, batch_size=16)
    big = _epoch(beton, batch_size=80)
    flat_small = torch.cat([x for x, _ in small])
    flat_big = torch.cat([x for x, _ in big])
    n = min(len(flat_small), len(flat_big))
    assert torch.equal(flat_small[:n], flat_big[:n])


def test_resuming_mid_epoch_yields_exactly_the_remaining_batches(toy_data):
    beton = toy_data / "train.beton"
    full = _epoch(beton, epoch=5)
    rest = _epoch(beton, epoch=5, skip=3)
    assert _same(full[3:], rest)


def test_progressive_resolution_changes_the_output_size_between_epochs(toy_data):
    loader = TrainLoader(toy_data / "train.beton", batch_size=32, resolution=24, seed=0,
                         device=torch.device("cpu"), workers=1)
    sizes = [next(iter(loader.epoch(e, res)))[0].shape[-1] for e, res in enumerate([24, 40, 32])]
    assert sizes == [24, 40, 32]


def _torchvision_mean_area(h, w, n=4000):
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    img = torch.zeros(3, h, w)
    return np.mean([np.prod(RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))[2:]) / (h * w)
                    for _ in range(n)])


@pytest.mark.parametrize("h,w", [(300, 200), (200, 200)])
def test_crop_boxes_stay_inside_and_match_torchvisions_distribution(h, w):
    log_lo, log_hi = np.log(3 / 4), np.log(4 / 3)
    areas, flips = [], []
    for i in range(4000):
        key = np.uint64(sample_key(7, 2, i))  # from Python, keep it unsigned
        top, left, ch, cw = crop_box(key, h, w, 0.08, 1.0, log_lo, log_hi)
        assert top >= 0 and top + ch <= h and left >= 0 and left + cw <= w and ch > 0 and cw > 0
        areas.append(ch * cw / (h * w))
        flips.append(uniform(key, 40) < 0.5)
    assert min(areas) >= 0.07
    # Same algorithm, other random stream: mean crop area within sampling error (std ~0.2/sqrt(4000)).
    assert abs(np.mean(areas) - _torchvision_mean_area(h, w)) < 0.02
    assert 0.47 < np.mean(flips) < 0.53


def test_uniform_draws_are_pure_functions_of_their_counters():
    def draw(s, e, i):
        return uniform(np.uint64(sample_key(s, e, i)), 0)

    assert draw(1, 2, 3) == draw(1, 2, 3)
    draws = {draw(s, e, i) for s in range(3) for e in range(3) for i in range(50)}
    assert len(draws) == 450


class _FakeLoader:
    def __init__(self, n, batch_size=4, drop_last=False):
        self.indices = np.arange(n, dtype=np.uint64)
        self.seed, self.distributed, self.batch_size, self.drop_last = 0, True, batch_size, drop_last


@pytest.mark.parametrize("n,world", [(20, 2), (21, 4)])
def test_distributed_shards_are_disjoint_and_cover_the_epoch(monkeypatch, n, world):
    shards = []
    for rank in range(world):
        monkeypatch.setattr(loader_mod, "dist_info", lambda rank=rank: (rank, world))
        shards.append(list(SeededOrder(_FakeLoader(n)).sample_order(epoch=3)))
    assert len({len(s) for s in shards}) == 1  # every rank takes the same number of steps
    flat = [i for s in shards for i in s]
    assert set(flat) == set(range(n))
    assert len(flat) - len(set(flat)) == -n % world  # only the wrap-around padding repeats


def test_val_loader_sees_every_image_once_in_file_order(toy_data):
    loader = ValLoader(toy_data / "val.beton", batch_size=64, resize=48, crop=40, device=torch.device("cpu"),
                       workers=1)
    labels = torch.cat([y for _, y in loader])
    assert labels.tolist() == [c for c in range(10) for _ in range(10)]  # folder by folder
    with pytest.raises(ValueError, match="crop"):
        ValLoader(toy_data / "val.beton", batch_size=8, resize=32, crop=40, device=torch.device("cpu"))


def test_a_val_loader_resized_between_passes_gives_what_a_new_loader_of_that_size_gives(toy_data, cpu):
    loader = ValLoader(toy_data / "val.beton", batch_size=50, resize=48, crop=40, device=cpu, workers=1)
    first = torch.cat([x for x, _ in loader])
    loader.set_size(64, 48)
    resized = torch.cat([x for x, _ in loader])
    fresh = torch.cat([x for x, _ in ValLoader(toy_data / "val.beton", batch_size=50, resize=64, crop=48,
                                               device=cpu, workers=1)])
    assert first.shape[-1] == 40 and resized.shape[-1] == 48
    assert torch.equal(resized, fresh)
    with pytest.raises(ValueError, match="crop"):
        loader.set_size(40, 48)


def test_a_batch_larger_than_the_data_is_a_clear_error(toy_data):
    with pytest.raises(ValueError, match="batch"):
        TrainLoader(toy_data / "val.beton", batch_size=1000, resolution=32, seed=0, device=torch.device("cpu"))


@pytest.mark.gpu
def test_cuda_pipeline_delivers_the_cpu_pipelines_batches_on_the_gpu(toy_data):
    """Decoding happens on the CPU either way; on CUDA the batch is moved by FFCV's ToDevice and
    must arrive with the same pixels, channels_last. (The /255 to float may differ by an ulp
    between devices, so pixels are compared as the uint8 they were decoded to.)"""
    beton = toy_data / "train.beton"
    cuda = TrainLoader(beton, batch_size=32, resolution=32, seed=0, device=torch.device("cuda"), workers=2)
    on_gpu = [(x.clone(), y.clone()) for x, y in cuda.epoch(0, 32)]
    on_cpu = _epoch(beton)
    assert on_gpu[0][0].is_cuda and on_gpu[0][1].is_cuda
    assert on_gpu[0][0].is_contiguous(memory_format=torch.channels_last)
    def pixels(batches):
        return [((x.cpu() * 255).round().to(torch.uint8), y.cpu()) for x, y in batches]

    assert _same(pixels(on_gpu), pixels(on_cpu))


@pytest.mark.parametrize("n,world", [(400, 2), (410, 3)])
def test_the_block_order_shards_whole_blocks_covers_the_epoch_and_is_seeded(monkeypatch, n, world):
    monkeypatch.setattr(SeededBlockOrder, "BLOCK", 20)
    monkeypatch.setattr(SeededBlockOrder, "WINDOW", 3)
    shards = []
    for rank in range(world):
        monkeypatch.setattr(loader_mod, "dist_info", lambda rank=rank: (rank, world))
        order = SeededBlockOrder(_FakeLoader(n))
        shards.append(list(order.sample_order(epoch=3)))
        assert list(order.sample_order(epoch=3)) == shards[-1] != list(order.sample_order(epoch=4))  # seeded
        order.skip = 8
        assert list(order.sample_order(epoch=3)) == shards[-1][8:]  # a resumed epoch: the remaining samples
    assert len({len(s) for s in shards}) == 1  # the same number of steps on every rank
    flat = [i for s in shards for i in s]
    assert set(flat) == set(range(n))
    owners = {}
    for rank, shard in enumerate(shards):  # every block is read by one rank only, padding included
        for i in shard:
            owners.setdefault(i // 20, set()).add(rank)
    assert all(len(r) == 1 for r in owners.values())
    # the padding repeats a rank's own samples: as many as its shard is short of the longest
    longest = max(len(set(s)) for s in shards)
    assert [len(s) - len(set(s)) for s in shards] == [longest - len(set(s)) for s in shards]
    assert shards[0][:20] != sorted(shards[0][:20])  # shuffled within windows


def test_quasi_random_refuses_a_beton_written_in_class_order(toy_data):
    with pytest.raises(BuildError, match="--shuffle"):
        TrainLoader(toy_data / "train.beton", batch_size=8, resolution=32, seed=0, device=torch.device("cpu"),
                    order="quasi_random")
