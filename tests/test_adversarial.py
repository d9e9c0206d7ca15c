"""PGD: stays in its ε-ball and in [0, 1], raises the loss, equals a loop written on robustness'
own attack steps, and leaves the weights' gradients alone."""

import pytest
import torch
import torch.nn.functional as F
from robustness.attack_steps import L2Step, LinfStep

from fasttricks.models.factory import create_model
from fasttricks.recipes import AdversarialConfig, ModelConfig
from fasttricks.robust.pgd import attack_generator, parse_attack, pgd

LINF = AdversarialConfig(norm="linf", eps=8 / 255, step_size=2 / 255, steps=5)
L2 = AdversarialConfig(norm="l2", eps=0.5, step_size=0.2, steps=5)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model(ModelConfig(arch="test_efficientnet"), 10).eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)


def _norms(delta, norm):
    flat = delta.reshape(delta.shape[0], -1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


@pytest.mark.parametrize("cfg", [LINF, L2], ids=["linf", "l2"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_stays_in_the_ball_and_the_unit_cube_and_raises_the_loss(model, batch, cfg, channels_last):
    x, y = batch
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    adv = pgd(model, x, y, cfg, generator=torch.Generator().manual_seed(0))
    assert (_norms(adv - x, cfg.norm) <= cfg.eps * (1 + 1e-5) + 1e-6).all()
    assert adv.min() >= 0 and adv.max() <= 1
    noise = pgd(model, x, y, cfg.model_copy(update={"steps": 0}), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean, random, attacked = (F.cross_entropy(model(v), y).item() for v in (x, noise, adv))
    # random weights give near-uniform outputs (loss ~ ln 10): the gain is small but must be real
    assert attacked > clean + 0.02 and attacked > random + 0.02
    assert adv.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("cfg,step_cls", [(LINF, LinfStep), (L2, L2Step)], ids=["linf", "l2"])
def test_matches_a_loop_written_directly_on_robustness_attack_steps(model, batch, cfg, step_cls):
    x, y = batch
    cfg = cfg.model_copy(update={"random_start": False})
    ours = pgd(model, x, y, cfg)
    step = step_cls(x, cfg.eps, cfg.step_size)  # robustness with float ε, NCHW-contiguous input
    ref = x.clone()
    for _ in range(cfg.steps):
        ref = ref.clone().detach().requires_grad_(True)
        loss = F.cross_entropy(model(ref), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, [ref])
        with torch.no_grad():
            ref = step.project(step.step(ref, g))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_channels_last_gives_the_same_examples(model, batch):
    x, y = batch
    a = pgd(model, x, y, L2, generator=torch.Generator().manual_seed(3))
    b = pgd(model, x.contiguous(memory_format=torch.channels_last), y, L2, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_weight_gradients_and_training_mode_are_left_alone(batch):
    torch.manual_seed(0)
    model = create_model(ModelConfig(arch="test_efficientnet"), 10).train()
    x, y = batch
    marker = {n: torch.full_like(p, 0.5) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = marker[n].clone()
    stats = {n: b.clone() for n, b in model.named_buffers()}
    pgd(model, x, y, LINF, generator=torch.Generator().manual_seed(0))
    assert model.training
    assert all(torch.equal(p.grad, marker[n]) for n, p in model.named_parameters())
    assert all(torch.equal(b, stats[n]) for n, b in model.named_buffers())  # eval mode: BN stats untouched


def test_random_start_is_a_function_of_seed_epoch_and_step(model, batch):
    x, y = batch
    cfg = LINF.model_copy(update={"steps": 1})
    cpu = torch.device("cpu")
    a = pgd(model, x, y, cfg, generator=attack_generator(cpu, 0, 1, 2))
    b = pgd(model, x, y, cfg, generator=attack_generator(cpu, 0, 1, 2))
    c = pgd(model, x, y, cfg, generator=attack_generator(cpu, 0, 1, 3))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_attack_specs_parse_with_madrys_step_rule():
    cfg = parse_attack("linf:8/255:20")
    assert cfg.norm == "linf" and cfg.eps == pytest.approx(8 / 255) and cfg.steps == 20
    assert cfg.step_size == pytest.approx(2.5 * (8 / 255) / 20)
    with pytest.raises(ValueError, match="norm:eps:steps"):
        parse_attack("linf-8")
    with pytest.raises(ValueError, match="norm:eps:steps"):
        parse_attack("l3:1:2")
    with pytest.raises(ValueError, match="at least 1 step"):
        parse_attack("linf:8/255:0")


@pytest.mark.gpu
def test_bf16_attack_on_cuda_stays_in_the_ball_and_raises_the_loss(batch):
    torch.manual_seed(0)
    model = create_model(ModelConfig(arch="test_efficientnet"), 10).cuda().eval()
    x, y = (t.cuda() for t in batch)
    x = x.contiguous(memory_format=torch.channels_last)
    adv = pgd(model, x, y, LINF, generator=attack_generator(x.device, 0, 0, 0))
    assert (_norms(adv - x, "linf") <= LINF.eps + 1e-6).all()
    with torch.no_grad():
        assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y)


def test_robust_evaluation_draws_its_random_starts_from_its_own_seed_not_the_global_rng(monkeypatch):
    from fasttricks.evaluation import evaluate

    torch.manual_seed(0)
    model = create_model(ModelConfig(arch="test_efficientnet"), 10).eval()
    g = torch.Generator().manual_seed(3)
    batches = [(torch.rand(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(3)]
    attack = AdversarialConfig(eps="8/255", step_size="2/255", steps=2, random_start=True)
    attacked = []

    def recording_pgd(*args, **kwargs):
        attacked.append(pgd(*args, **kwargs))
        return attacked[-1]

    monkeypatch.setattr(evaluate, "pgd", recording_pgd)
    runs = []
    for global_seed in (1, 2):  # a different global stream: the evaluation must not depend on it
        torch.manual_seed(global_seed)
        attacked.clear()
        runs.append((evaluate.accuracy(model, batches, torch.device("cpu"), attack), list(attacked)))
    (first, images_a), (second, images_b) = runs
    assert first == second and all(torch.equal(a, b) for a, b in zip(images_a, images_b, strict=True))
    assert not torch.equal(images_a[0], images_a[1][:16])  # each batch its own starts (not one reused noise)


def _uniform_like(x, seed):
    """What the attacks draw for a start: uniform in [-1, 1], in NCHW order, from a seeded generator."""
    return torch.empty(x.shape).uniform_(-1, 1, generator=torch.Generator().manual_seed(seed))


def _input_grad(model, x, y):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), [x])
    return g


def test_n_fgsm_is_the_formula_worked_by_hand(model, batch):
    """de Jorge et al.: x0 = clip(x + U[-k·eps, k·eps]), x_adv = clip(x0 + alpha·sign(grad at x0)),
    no projection back to the eps-ball; defaults k = 2, alpha = eps, one step."""
    x, y = batch
    cfg = AdversarialConfig(method="n_fgsm", eps="8/255")
    assert (cfg.steps, cfg.noise_factor, cfg.step_size) == (1, 2.0, pytest.approx(8 / 255))
    ours = pgd(model, x, y, cfg, generator=torch.Generator().manual_seed(5), use_autocast=False)
    x0 = torch.clamp(x + _uniform_like(x, 5) * 2 * 8 / 255, 0, 1)
    expected = torch.clamp(x0 + 8 / 255 * _input_grad(model, x0, y).sign(), 0, 1)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    assert (ours - x).abs().amax() > 8 / 255 + 1e-4  # beyond the ball: no projection, as the method says
    assert (ours - x).abs().amax() <= 3 * 8 / 255 + 1e-6  # |noise| + alpha at most


def test_pgd_with_one_step_of_1_25_eps_from_a_random_start_is_wongs_fgsm_rs(model, batch):
    """Wong, Rice & Kolter 2020: delta ~ U[-eps, eps] (x + delta clipped to [0, 1]); delta += alpha·sign(grad);
    delta clipped to [-eps, eps] and x + delta to [0, 1]; alpha = 1.25·eps. The recipe snippet:
    adversarial: {eps: 8/255, steps: 1} (the step then follows the FGSM-RS rule)."""
    x, y = batch
    cfg = AdversarialConfig(eps="8/255", steps=1)
    assert cfg.step_size == pytest.approx(1.25 * 8 / 255) and cfg.random_start
    ours = pgd(model, x, y, cfg, generator=torch.Generator().manual_seed(9), use_autocast=False)
    eps = 8 / 255
    start = torch.clamp(x + _uniform_like(x, 9) * eps, 0, 1)
    delta = start - x + 1.25 * eps * _input_grad(model, start, y).sign()
    expected = torch.clamp(x + torch.clamp(delta, -eps, eps), 0, 1)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_n_fgsm_is_refused_where_it_is_not_defined():
    with pytest.raises(ValueError, match="defined for norm linf"):
        AdversarialConfig(method="n_fgsm", norm="l2", eps=3.0)
    with pytest.raises(ValueError, match="takes one step"):
        AdversarialConfig(method="n_fgsm", steps=3)


def test_the_models_mode_comes_back_even_when_the_attack_fails(batch, monkeypatch):
    from fasttricks.robust import pgd as adversarial

    torch.manual_seed(0)
    net = create_model(ModelConfig(arch="test_efficientnet"), 10).train()

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(adversarial, "_attack", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        pgd(net, *batch, AdversarialConfig(eps="8/255", steps=2))
    assert net.training and all(p.requires_grad for p in net.parameters())  # train mode, weights trainable
