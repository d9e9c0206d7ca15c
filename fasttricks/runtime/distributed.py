"""Several processes: torchrun starts them, PyTorch DDP keeps their weights equal. No launcher of
our own: ``torchrun --nproc-per-node N -m fasttricks train ...`` (or ``srun torchrun ...``).

Rules, and why:
- The recipe's ``batch_size`` is the global batch; each process takes ``batch_size / world``. The
  learning rate belongs to that global batch, so adding GPUs changes neither; ``optimizer.reference_batch``
  scales it linearly when the batch itself changes (Goyal et al.).
- Batch norm in train mode normalises over each process's share (32 images of 256 on 8 GPUs), as
  timm's and FFCV's ImageNet training do by default (SyncBatchNorm's collective per layer costs
  time, and the per-GPU batch of 32 is Goyal et al.'s). So a network with batch norm trains a
  slightly different experiment on 1 and on 8 GPUs: ``model.sync_batchnorm: true`` normalises over
  the global batch instead (GPUs only). The choice and the images each norm sees are in the run's
  info (``batch_norm``, also in summary.json) and on ``--dry-run``; a network without batch norm
  (LayerNorm, GroupNorm) trains the same run on any number of GPUs up to floating point.
- The PGD attack runs on the unwrapped module: its ``torch.autograd.grad`` asks for input
  gradients only, so DDP's parameter hooks never fire during the attack and the step all-reduces
  each gradient bucket once (DDP does not support ``autograd.grad`` through the wrapper).
- Rank 0 alone writes the run folder. Everything else is every rank's work: evaluation runs on
  disjoint shards whose counts are all-reduced (N processes take ~1/N of the time and give the
  numbers of one), the FixRes sweep and fine-tuning and the weight averaging run on every rank
  from the same inputs, then rank 0's weights are broadcast. So nothing one rank runs alone can
  start a collective (a SyncBatchNorm in train mode all-gathers), and no rank idles in a barrier.
- A stop (Ctrl-C, a non-finite loss) is agreed at the logging points, so every rank stops after
  the same step with the same message.
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from fasttricks.errors import InputError


def dist_info() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched() -> bool:
    """Started by torchrun (or srun + torchrun) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def process_group(device: torch.device | None):
    """Join torchrun's process group for the duration (NCCL on GPUs, gloo on CPUs); yields this
    process's device (``cuda:LOCAL_RANK`` on GPUs). Without torchrun, yields ``device`` unchanged."""
    if not launched() or dist.is_initialized():
        yield device
        return
    use_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    # Ranks wait for rank 0 while it writes checkpoints and plots; a generous timeout keeps a slow
    # shared filesystem from aborting them. FASTTRICKS_DIST_TIMEOUT_MIN sets it (default 60).
    minutes = float(os.environ.get("FASTTRICKS_DIST_TIMEOUT_MIN", "60"))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=minutes))
    try:
        yield device
        dist.barrier()  # all ranks done talking before any tears the group down (gloo aborts otherwise)
    finally:
        dist.destroy_process_group()


def default_workers() -> int:
    """Decode threads when the recipe says 0: the cores this process may use, divided among the
    processes torchrun started on this node (each would otherwise take every core)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cores // max(local, 1))


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over every rank (in place; unchanged with one process)."""
    if dist_info()[1] > 1:
        dist.all_reduce(t)
    return t


def earliest_step(first_bad: torch.Tensor) -> int:
    """The smallest non-negative ``first_bad`` over ranks, -1 when no rank has one: every rank then
    sees the same answer at the same logging point and stops together."""
    if dist_info()[1] == 1:
        return int(first_bad.item())
    never = torch.iinfo(torch.long).max
    t = torch.where(first_bad < 0, torch.full_like(first_bad, never), first_bad).reshape(1).clone()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    value = int(t.item())
    return -1 if value == never else value


def per_process_batch(batch_size: int) -> int:
    _, world = dist_info()
    if batch_size % world:
        raise InputError(f"batch_size {batch_size} (the global batch) does not divide among {world} processes")
    return batch_size // world


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP around ``model`` when there is a process group, else ``model``. Built per stage: DDP
    registers the parameters that require gradients when it is built, and freezing changes them."""
    if dist_info()[1] == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)  # buffers follow rank 0 at each forward


def batch_norm_scope(net: nn.Module, sync: bool, batch_sizes: dict[str, int], world: int) -> dict | None:
    """What the batch norms of ``net`` normalise over in train mode, per stage: ``images`` per norm,
    whether over the global batch (``sync``) or each process's share; None without batch norm."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        return None
    sync = sync and world > 1
    return {"sync": sync, "processes": world,
            "images": {name: batch if sync else batch // world for name, batch in batch_sizes.items()}}


def gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order, on every rank (one process: ``[obj]``)."""
    if dist_info()[1] == 1:
        return [obj]
    out = [None] * dist_info()[1]
    dist.all_gather_object(out, obj)
    return out


def step_module(model: nn.Module, compiled: nn.Module, device: torch.device) -> nn.Module:
    """What a training step calls: ``compiled`` (the model, or its torch.compile wrapper) alone;
    under several processes, DDP around the plain model, compiled around DDP when ``compiled`` is
    compiled. That is PyTorch's order, compile(DDP(model)): dynamo's DDPOptimizer then splits the
    graph at DDP's bucket boundaries, so each bucket's all-reduce overlaps the rest of the backward
    (DDP around a compiled module waits for the whole compiled backward). The attack keeps calling
    ``compiled`` itself: input gradients need no all-reduce."""
    if dist_info()[1] == 1:
        return compiled
    ddp = wrap(model, device)
    return torch.compile(ddp) if compiled is not model else ddp


_OWN_GROUPS: dict = {}


def own_group():
    """A process group of this rank alone, made once per process group by every rank together
    (``new_subgroups`` is collective): a SyncBatchNorm given it normalises locally."""
    key = id(dist.group.WORLD)
    if key not in _OWN_GROUPS:
        _OWN_GROUPS[key], _ = dist.new_subgroups(group_size=1)
    return _OWN_GROUPS[key]


@contextmanager
def local_sync_batch_norms(norms: list[nn.Module]):
    """Inside the block the SyncBatchNorms among ``norms`` start no collective: each runs on this
    rank's own group. For work where ranks forward different numbers of batches and combine their
    results themselves (batch-norm recalibration): a collective per forward would then meet another
    rank's different collective, a hang. Every rank enters the block (making the group is collective)."""
    syncing = [m for m in norms if isinstance(m, nn.SyncBatchNorm)]
    if not syncing or dist_info()[1] == 1:
        yield
        return
    group, previous = own_group(), [m.process_group for m in syncing]
    for m in syncing:
        m.process_group = group
    try:
        yield
    finally:
        for m, g in zip(syncing, previous, strict=True):
            m.process_group = g


def barrier() -> None:
    if dist_info()[1] > 1:
        dist.barrier()


def broadcast_weights(net: nn.Module) -> None:
    """Every tensor of ``net`` (parameters and buffers) from rank 0."""
    if dist_info()[1] == 1:
        return
    with torch.no_grad():
        for tensor in net.state_dict().values():
            dist.broadcast(tensor, 0)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on one (Ctrl-C reaches ranks at different steps)."""
    return bool(any_rank_each([flag], device)[0])


def any_rank_each(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag True on every rank when it is True on one: one all-reduce for all of them."""
    if dist_info()[1] == 1:
        return list(flags)
    t = torch.tensor([int(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def sync_buffers(module: nn.Module) -> None:
    """Rank 0's floating buffers (batch-norm statistics) on every rank, in one collective. DDP
    syncs them at the start of its forward, but the attack runs before that forward, on the
    unwrapped module, whose statistics each rank's last training forward has updated with its own
    batch: without this, ranks would attack with different models (and a resumed run, which loads
    rank 0's statistics everywhere, would differ from an uninterrupted one)."""
    if dist_info()[1] == 1:
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    with torch.no_grad():
        flat = torch.cat([b.reshape(-1) for b in buffers])
        dist.broadcast(flat, 0)
        offset = 0
        for b in buffers:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()
