"""A guard against host-device synchronisation inside a training step, that works on the CPU too.

``torch.cuda.set_sync_debug_mode`` only sees syncs on a GPU. This guard looks at the operators a
step dispatches instead: each one below makes the host wait for the device wherever the tensor
lives (a value read back, a shape that depends on the data, a library check of its own result),
so a step that dispatches none of them on the CPU dispatches none on a GPU. CI runs it on the CPU;
``FASTTRICKS_CHECK_SYNCS=1`` turns it on in any training run, around every step between logging
points (the logging points themselves read the loss back, on purpose).

It also refuses a tensor made from host data inside a step (``torch.tensor``, ``torch.as_tensor``,
``torch.asarray``, ``Tensor.new_tensor``): on the CPU that is a plain constructor, on CUDA a copy
from pageable host memory, which waits for every kernel queued before it. Those calls are seen at
the Python level (the four constructors are replaced for the duration), since no dispatched
operator says where the data came from; what a step needs is made on the device instead
(``torch.full``, arithmetic with Python numbers).

What it cannot see: a read of a CPU tensor that a GPU run would hold on the device (it sees the
operator, not where the tensor would live), and copies to the host (``.cpu()``, ``.tolist()``),
which on the CPU are no operators at all (nor ``torch.from_numpy``, a view of host memory: its
copy to the device is the sync, and on the CPU there is none). On CUDA ``guard`` uses torch's
``set_sync_debug_mode("error")`` instead, which sees those; the GPU tests run every stage kind
under it.
"""

from __future__ import annotations

import os
import traceback
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fasttricks.errors import InputError

SYNCING_OPS = {
    "_local_scalar_dense": "reads a value back to the host (.item(), bool(), int(), float(), a Python if)",
    "is_nonzero": "reads a value back to the host (bool() of a tensor)",
    "equal": "torch.equal returns a host bool",
    "nonzero": "its output shape depends on the data (also boolean-mask indexing)",
    "masked_select": "its output shape depends on the data",
    "unique": "its output shape depends on the data",
    "_unique2": "its output shape depends on the data",
    "unique_dim": "its output shape depends on the data",
    "unique_consecutive": "its output shape depends on the data",
    "_linalg_check_errors": "torch.linalg checks its result on the host (use the *_ex form, or a closed form)",
}


class HostSyncError(RuntimeError):
    """An operator that waits for the device ran where no sync is allowed; the message names it and
    the line of ours that called it."""


# tensors built from host data: on CUDA each is a blocking copy from pageable memory
HOST_DATA = ((torch, "tensor"), (torch, "as_tensor"), (torch, "asarray"), (torch.Tensor, "new_tensor"))


@contextmanager
def _no_host_data():
    """The constructors of HOST_DATA replaced by ones that raise, for the block. By replacement,
    not a TorchFunctionMode: a mode would see every operator of the step and slow it severalfold."""
    def refusing(owner, name):
        label = f"{'Tensor.' if owner is torch.Tensor else 'torch.'}{name}"

        def refuse(*args, **kwargs):
            raise HostSyncError(f"host sync inside a training step: {label} makes a tensor from host data (on CUDA "
                                f"a blocking copy; make it on the device: torch.full, or arithmetic with Python "
                                f"numbers); called from {_caller()}")
        return refuse

    saved = [(owner, name, getattr(owner, name)) for owner, name in HOST_DATA]
    for owner, name, _ in saved:
        setattr(owner, name, refusing(owner, name))
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


class no_host_sync(TorchDispatchMode):  # noqa: N801 (a context manager, named like torch's modes)
    """``with no_host_sync(): ...`` raises ``HostSyncError`` at the first syncing operator, or at the
    first tensor made from host data."""

    def __enter__(self):
        self._host_data = _no_host_data()
        self._host_data.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._host_data.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        why = SYNCING_OPS.get(name)
        if why is None and name in ("index", "index_put", "index_put_") and _boolean_index(args):
            why = "with a boolean mask: the mask's nonzero count sets the shape (use torch.where)"
        if why is not None:
            raise HostSyncError(f"host sync inside a training step: aten.{name} {why}; called from {_caller()}")
        return func(*args, **(kwargs or {}))


def _boolean_index(args) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(getattr(i, "dtype", None) == torch.bool for i in indices)


def _caller() -> str:
    """The innermost frames outside torch: where the sync comes from (ours, or a library's)."""
    frames = [f for f in traceback.extract_stack() if "/torch/" not in f.filename and f.filename != __file__]
    return " <- ".join(f"{f.filename.rsplit('/', 2)[-2:][-1]}:{f.lineno} {f.name}" for f in reversed(frames[-3:]))


def enabled() -> bool:
    return os.environ.get("FASTTRICKS_CHECK_SYNCS", "") not in ("", "0")


@contextmanager
def guard(device: torch.device, compiled: bool = False):
    """The check for ``device``: on CUDA torch's own (``set_sync_debug_mode("error")``), which sees
    every real sync, copies between host and device too; elsewhere ``no_host_sync``, which
    torch.compile cannot trace through (a dispatch mode), so it checks eager steps only."""
    if device.type != "cuda":
        if compiled:
            raise InputError("FASTTRICKS_CHECK_SYNCS=1 on the CPU checks eager steps only: run it with "
                             "--set model.compile=false")
        with no_host_sync():
            yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)
