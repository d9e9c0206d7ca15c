"""PGD adversarial examples (Madry et al. 2017) in [0, 1] pixel space, for training and evaluation.

The step and projection math is MadryLab ``robustness``'s (``robustness.attack_steps``); we
subclass its steps only where they cannot serve us: its L2 step takes norms with ``.view``
(which fails on channels_last tensors) and projects with ``renorm`` (which needs a Python float
ε, a recompile trigger under ``torch.compile``), and both random starts draw from the global RNG
(ours take a generator, so the start is a function of the run's seed and step).

The loop: gradients for the input only. ``torch.autograd.grad`` alone keeps the weights' ``.grad``
untouched, but a compiled backward graph would still compute every weight gradient and throw
them away, so the weights stop requiring gradients during the attack (one more compiled graph per
resolution, then none). The model in eval mode by default (dropout and drop-path off, batch-norm
statistics untouched), bf16 autocast on CUDA, ε and step size as device tensors, no host sync.
The last iterate is returned (robustness' ``use_best`` bookkeeping costs a forward per step).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from robustness.attack_steps import L2Step, LinfStep
from torch import nn

from fasttricks.errors import InputError
from fasttricks.recipes import AdversarialConfig, AutoAttackConfig
from fasttricks.robust.noise import Generators, noise_like
from fasttricks.runtime.devices import autocast
from fasttricks.runtime.seeding import ATTACK, EVAL_ATTACK, stream_seed


def image_generators(device: torch.device, image_ids, stream: int = EVAL_ATTACK) -> list[torch.Generator]:
    """One generator per image, seeded by the image's index in its split: a robust accuracy then
    depends neither on the batch size nor on how the split is sharded over processes."""
    return [torch.Generator(device).manual_seed(stream_seed(0, 0, int(i), stream)) for i in image_ids]


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each sample, shaped to broadcast (works on any memory format)."""
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1).reshape(-1, *[1] * (t.dim() - 1))


class LinfPGDStep(LinfStep):
    """robustness' L∞ step and projection; random start uniform in the ε-box from ``generator``."""

    def random_perturb(self, x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        return torch.clamp(x + noise_like(x, "uniform", generator) * self.eps, 0, 1)


class L2PGDStep(L2Step):
    """robustness' L2 step (move α along g/‖g‖) and projection (onto the ε-ball, then [0, 1]),
    with per-sample norms by ``reshape`` and tensor ε; random start on the ε-sphere."""

    def project(self, x: torch.Tensor) -> torch.Tensor:
        diff = x - self.orig_input
        scale = torch.clamp(self.eps / (_per_sample_norm(diff) + 1e-12), max=1.0)
        return torch.clamp(self.orig_input + diff * scale, 0, 1)

    def step(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return x + g / (_per_sample_norm(g) + 1e-10) * self.step_size

    def random_perturb(self, x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        direction = noise_like(x, "normal", generator)
        return torch.clamp(x + self.eps * direction / (_per_sample_norm(direction) + 1e-10), 0, 1)


STEPS = {"linf": LinfPGDStep, "l2": L2PGDStep}


def pgd(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, cfg: AdversarialConfig, *,
        generator: Generators = None, use_autocast: bool = True) -> torch.Tensor:
    """Adversarial versions of ``images`` (in [0, 1]) that raise ``model``'s cross-entropy on
    ``targets`` (class indices or soft targets): PGD within ``cfg``'s ε-ball around ``images``, or
    N-FGSM when ``cfg.method`` says so (``n_fgsm.py``; it leaves the ball by design). The model's
    mode is restored whatever happens inside (an out-of-memory error, Ctrl-C)."""
    was_training = model.training
    if cfg.eval_mode:
        model.eval()
    try:
        with input_gradients_only(model):
            if cfg.method == "n_fgsm":
                from fasttricks.robust.n_fgsm import n_fgsm

                return n_fgsm(model, images, targets, cfg, generator, use_autocast)
            return _attack(model, images, targets, cfg, generator, use_autocast)
    finally:
        model.train(was_training)


@contextmanager
def input_gradients_only(model: nn.Module):
    """The weights stop requiring gradients inside the block (frozen ones stay frozen after it)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def _attack(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, cfg: AdversarialConfig,
            generator: Generators, use_autocast: bool) -> torch.Tensor:
    # fills, not torch.tensor(x, device): a copy from host memory waits for the device
    eps = torch.full((), cfg.eps, device=images.device, dtype=images.dtype)
    step_size = torch.full((), cfg.step_size, device=images.device, dtype=images.dtype)
    attack = STEPS[cfg.norm](images.detach(), eps, step_size)
    x = attack.random_perturb(images.detach(), generator) if cfg.random_start else images.detach().clone()
    for _ in range(cfg.steps):
        x.requires_grad_(True)
        with autocast(images.device) if use_autocast else nullcontext():
            loss = F.cross_entropy(model(x).float(), targets, reduction="sum")
        (grad,) = torch.autograd.grad(loss, [x])
        with torch.no_grad():
            x = attack.project(attack.step(x, grad))
    return x.detach()


def attack_generator(device: torch.device, seed: int, epoch: int, step: int, rank: int = 0) -> torch.Generator:
    """The random-start stream of one training step: a function of (seed, epoch, step, rank)."""
    g = torch.Generator(device=device)
    g.manual_seed(stream_seed(seed, epoch, step, ATTACK, rank))
    return g


def describe_eps(cfg: AdversarialConfig) -> str:
    """ε as people write it: ``8/255`` for L∞ (pixel levels), ``3`` for L2."""
    return f"{cfg.eps * 255:.4g}/255" if cfg.norm == "linf" else f"{cfg.eps:.4g}"


def parse_attack(spec: str) -> AdversarialConfig | AutoAttackConfig:
    """``norm:eps:steps`` (e.g. ``linf:8/255:20``, ``l2:3.0:20``): PGD with step size 2.5·ε/steps
    (Madry et al.'s rule), random start, as the evaluation standard uses. ``autoattack:norm:eps``
    (e.g. ``autoattack:linf:4/255``): AutoAttack's standard version (fasttricks/robust/autoattack.py)."""
    if spec.startswith("autoattack"):
        try:
            _, norm, eps = spec.split(":")
            return AutoAttackConfig(norm=norm, eps=eps)
        except ValueError as e:
            raise InputError(f"--attack expects autoattack:norm:eps such as autoattack:linf:4/255, not {spec!r} "
                             f"({e})") from None
    try:
        norm, eps, steps = spec.split(":")
        cfg = AdversarialConfig(norm=norm, eps=eps, steps=int(steps), step_size=0.0)
    except ValueError as e:
        raise InputError(f"--attack expects norm:eps:steps such as linf:8/255:20, not {spec!r} ({e})") from None
    if cfg.steps < 1:
        raise InputError(f"--attack {spec!r}: an evaluation attack takes at least 1 step (PGD-10: "
                         f"{norm}:{eps}:10)")
    return cfg.model_copy(update={"step_size": 2.5 * cfg.eps / cfg.steps})
