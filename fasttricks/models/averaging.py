"""Weight averaging: the uniform mean of several checkpoints of one run, or an EMA of the weights,
followed by recomputing the batch-norm statistics that are not frozen.

Averaged weights carry averaged running statistics, which are not the statistics of the averaged
network; SWA (Izmailov et al.) recomputes them on training data. torch's ``swa_utils.update_bn``
does that for *every* batch norm, frozen ones included (it resets them, and a frozen one held in
eval mode would then keep the reset values), so ``recalibrate_batch_norm`` is written here and
leaves the frozen ones alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from fasttricks.errors import InputError, OutputExists
from fasttricks.models.weights import WeightsError, read_info, save_weights, weights_file
from fasttricks.runtime.distributed import dist_info, local_sync_batch_norms, sum_over_ranks


def average_state_dicts(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of floating tensors (accumulated in float64); integer buffers (batch
    counts) are taken from the last state."""
    if not states:
        raise InputError("nothing to average")
    keys = states[0].keys()
    for i, s in enumerate(states[1:], start=1):
        if s.keys() != keys:
            raise WeightsError(f"state {i} has different tensors than state 0 (not the same architecture)")
    out = {}
    for k in keys:
        tensors = [s[k] for s in states]
        if any(t.shape != tensors[0].shape for t in tensors):
            raise WeightsError(f"{k}: shapes differ ({[tuple(t.shape) for t in tensors]})")
        if tensors[0].is_floating_point():
            out[k] = (sum(t.double() for t in tensors) / len(tensors)).to(tensors[0].dtype)
        else:
            out[k] = tensors[-1].clone()
    return out


def average_files(paths: Sequence[str | os.PathLike]) -> tuple[dict[str, torch.Tensor], dict]:
    """Average fasttricks weights files (``final.safetensors`` or checkpoints' ``model.safetensors``)
    of one architecture; returns (state, the last file's info)."""
    paths = [weights_file(p) for p in paths]
    infos = [read_info(p) for p in paths]
    for p, info in zip(paths[1:], infos[1:], strict=True):
        for key in ("arch", "num_classes"):
            if info[key] != infos[0][key]:
                raise WeightsError(f"cannot average {paths[0]} ({key} {infos[0][key]}) with {p} "
                                   f"({key} {info[key]}): not the same architecture")
    return average_state_dicts([load_file(str(p)) for p in paths]), infos[-1]


def batch_norms(net: nn.Module, frozen: Sequence[str] = ()) -> list[nn.modules.batchnorm._BatchNorm]:
    """The batch norms of ``net`` outside the modules named by the ``frozen`` prefixes."""
    def is_frozen(name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in frozen)

    return [m for name, m in net.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not is_frozen(name)]


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, net: nn.Module, batches: Iterable[torch.Tensor],
                           frozen: Sequence[str] = ()) -> int:
    """Recompute the running statistics of ``net``'s batch norms that are not frozen, as the plain
    mean over ``batches`` (momentum None) of a forward pass of ``model`` (which wraps ``net``);
    everything else runs in eval mode. Returns the number of images seen."""
    norms = batch_norms(net, frozen)
    if not norms:
        return 0
    was_training = model.training
    model.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        nn.Module.train(m, True)  # class method: a frozen one's instance override is not reached here
    seen = 0
    try:
        with local_sync_batch_norms(norms):  # ranks forward 13 or 12 of 100 batches on 8: no collective each
            for images in batches:
                model(images)
                seen += images.shape[0]
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
            nn.Module.train(m, False)
        model.train(was_training)
    seen = _combine_over_ranks(norms, seen)
    if seen == 0:
        raise InputError("no batches to recompute the batch-norm statistics from")
    return seen


def _combine_over_ranks(norms: list, seen: int) -> int:
    """Under several processes each rank saw its share of the batches (``calibration_batches``):
    with momentum None a batch norm's statistics are the plain mean over its batches, so the
    global ones are the batch-weighted mean of the ranks', in one all-reduce. Returns the images
    seen by all ranks."""
    if dist_info()[1] == 1:
        return seen
    batches = norms[0].num_batches_tracked.to(torch.float64)
    flat = torch.cat([torch.cat([m.running_mean, m.running_var]).to(torch.float64) * batches for m in norms]
                     + [batches.reshape(1), torch.tensor([float(seen)], device=batches.device, dtype=torch.float64)])
    sum_over_ranks(flat)
    total, seen = int(flat[-2].item()), int(flat[-1].item())
    offset = 0
    for m in norms:
        n = m.running_mean.numel()
        values = flat[offset:offset + 2 * n] / max(total, 1)
        m.running_mean.copy_(values[:n])
        m.running_var.copy_(values[n:])
        m.num_batches_tracked.fill_(total)
        offset += 2 * n
    return seen


def average_command(paths: Sequence[Path], out: Path, *, data_dir: Path | None, bn_batches: int,
                    batch_size: int, device: torch.device, overwrite: bool = False) -> dict:
    """``fasttricks average``: average, recalibrate on ``data_dir``'s training set when given,
    write ``out`` (atomically). Returns a report."""
    from fasttricks.data.loader import beton_paths
    from fasttricks.models.factory import classifier_for

    if len(paths) < 2:
        raise InputError("average needs at least two checkpoints")
    if out.exists() and not overwrite:
        raise OutputExists(f"{out} exists; pass --overwrite to replace it")
    state, info = average_files(paths)
    model = classifier_for(info).to(device)
    model.net.load_state_dict(state)
    report = {"averaged": [str(p) for p in paths], "out": str(out), "bn_images": 0}
    if data_dir is not None and bn_batches > 0:
        from fasttricks.models.weights import check_data_fits

        check_data_fits(info, paths[-1], data_dir)
        res = info.get("train_resolution", info["val_crop"])
        batches = calibration_batches(beton_paths(data_dir)["train"], bn_batches, batch_size, res, seed=0,
                                      device=device)
        report["bn_images"] = recalibrate_batch_norm(model, model.net, batches, info.get("frozen", []))
        report["bn_resolution"] = res
    save_weights(out, model.net, {**info, "averaged_from": report["averaged"]})
    return report


def calibration_batches(train_beton: Path, batches: int, batch_size: int, resolution: int, *, seed: int,
                        device: torch.device, workers: int = 0) -> Iterable[torch.Tensor]:
    """``batches`` training batches (random-resized crops at ``resolution``, no other augmentation:
    the statistics should be those of clean inputs) from a seeded subset of the training set. Under
    several processes each rank gets every world-th of them (the same batches as one process's, so
    ranks may get one batch more than others), and ``recalibrate_batch_norm`` combines the ranks'
    statistics in one all-reduce, running any SyncBatchNorm on its rank alone until then."""
    from fasttricks.data.loader import TrainLoader, sample_indices

    rank, world = dist_info()
    indices = sample_indices(train_beton, batches * batch_size, seed)
    loader = TrainLoader(train_beton, batch_size=min(batch_size, len(indices)), resolution=resolution, seed=seed,
                         device=device, workers=workers, indices=indices)
    for i, (images, _) in enumerate(loader.epoch(0, resolution)):
        if i % world == rank:
            yield images
