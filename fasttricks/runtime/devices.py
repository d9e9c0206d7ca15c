"""Device choice and numeric precision, shared by training, evaluation and the attack."""

from __future__ import annotations

from contextlib import nullcontext

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device):
    """bf16 autocast on CUDA (no loss scaling needed, and input gradients do not underflow as in
    fp16); full precision on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def compile_enabled(setting: bool | None, device: torch.device) -> bool:
    """``model.compile``: ``None`` means on CUDA and off on the CPU. On the CPU inductor's
    start-up (tens of seconds per graph) outweighs what it saves on the small models run there."""
    return device.type == "cuda" if setting is None else setting
