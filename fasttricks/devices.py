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
