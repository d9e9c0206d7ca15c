"""model.compile: on by default on CUDA only; a compiled PGD backward computes the input gradient and
no weight gradient; recompilation only for a new resolution (never for a new ε or step size); the
compiled training step gives eager's result."""

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

from fasttricks.models.factory import create_model
from fasttricks.recipes import AdversarialConfig, ModelConfig, OptimizerConfig, StageConfig, load_recipe
from fasttricks.recipes.schedules import resolution_at
from fasttricks.robust.pgd import pgd
from fasttricks.runtime.devices import compile_enabled
from fasttricks.training.step import create_optimizer, training_step

CPU = torch.device("cpu")
ATTACK = AdversarialConfig(eps=8 / 255, step_size=2 / 255, steps=2)


def _model(seed=0):
    torch.manual_seed(seed)
    return create_model(ModelConfig(arch="test_efficientnet"), 10)


def _batch(n=4, res=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, res, res, generator=g), torch.randint(0, 10, (n,), generator=g)


def _recording_backend():
    """An AOTAutograd backend (after a dynamo reset) and the list it fills: for each backward graph
    it compiles, how many gradients the graph returns."""
    torch._dynamo.reset()
    backward_outputs = []

    def record_backward(gm, _):
        backward_outputs.append(sum(1 for n in gm.graph.find_nodes(op="output") for o in n.args[0] if o is not None))
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward), bw_compiler=record_backward), \
        backward_outputs


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_compile_is_on_by_default_on_cuda_only_and_a_recipe_can_force_it():
    assert load_recipe("winner").model.compile is None
    assert compile_enabled(None, torch.device("cuda")) and not compile_enabled(None, CPU)
    assert compile_enabled(True, CPU) and not compile_enabled(False, torch.device("cuda"))


def test_compiled_attack_backward_computes_the_input_gradient_only():
    """The backward graphs AOTAutograd compiles during the attack return one gradient (the
    input's); the training step's backward returns the weights' too."""
    backend, backward_outputs = _recording_backend()
    model = _model()
    compiled = torch.compile(model, backend=backend)
    x, y = _batch()
    trainable = sum(1 for p in model.parameters() if p.requires_grad)
    pgd(compiled, x, y, ATTACK, generator=torch.Generator().manual_seed(0))
    assert backward_outputs == [1]
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())
    stage = StageConfig(optimizer=OptimizerConfig(name="sgd", lr=0.01), adversarial=ATTACK)
    training_step(compiled, x, y, create_optimizer(model, stage.optimizer), nn.CrossEntropyLoss(), stage)
    assert backward_outputs[-1] == trainable  # the step's own backward: every weight


def test_recompiles_only_for_a_new_resolution_never_for_a_new_eps_or_step():
    """aot_eager: dynamo's guards and recompilations are the backend's business-free part."""
    torch._dynamo.reset()
    model = _model()
    compiled = torch.compile(model, backend="aot_eager")
    stage = StageConfig(optimizer=OptimizerConfig(name="sgd", lr=0.01), adversarial=ATTACK)
    optimizer = create_optimizer(model, stage.optimizer)
    weaker = stage.model_copy(update={"adversarial": AdversarialConfig(eps=2 / 255, step_size=1 / 255, steps=3)})
    added = []
    for res in (32, 40, 48):
        before = _graphs()
        x, y = _batch(res=res)
        for s in (stage, stage, weaker):
            training_step(compiled, x, y, optimizer, nn.CrossEntropyLoss(), s, generator=torch.Generator())
        added.append(_graphs() - before)
    # one graph per mode (the attack: eval, weights without gradients; the step: train) at the first
    # resolution, at most that at each new one, none for a new ε, step size or number of steps
    assert added[0] == 2 and all(n <= 2 for n in added[1:]), added


def test_the_compiled_training_step_equals_eager():
    """Inductor on the CPU (about a minute of compilation on 2 cores): PGD-2 + one SGD step."""
    torch._dynamo.reset()
    stage = StageConfig(optimizer=OptimizerConfig(name="sgd", lr=0.05), adversarial=ATTACK)
    x, y = _batch(n=8)
    results = []
    for compile_it in (False, True):
        model = _model(seed=1)
        step_model = torch.compile(model) if compile_it else model
        optimizer = create_optimizer(model, stage.optimizer)
        loss = training_step(step_model, x, y, optimizer, nn.CrossEntropyLoss(), stage,
                             generator=torch.Generator().manual_seed(0))
        results.append((loss, [p.detach().clone() for p in model.parameters()]))
    (eager_loss, eager_weights), (compiled_loss, compiled_weights) = results
    torch.testing.assert_close(compiled_loss, eager_loss, atol=1e-4, rtol=1e-4)
    moved = max((a - b).abs().max() for a, b in zip(eager_weights, [p.detach() for p in _model(1).parameters()],
                                                     strict=True))
    assert moved > 1e-4  # the step did change the weights
    for a, b in zip(compiled_weights, eager_weights, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


@pytest.mark.gpu
def test_cuda_compiled_training_step_matches_eager_within_bf16_tolerance():
    torch._dynamo.reset()
    stage = StageConfig(optimizer=OptimizerConfig(name="sgd", lr=0.05), adversarial=ATTACK)
    x, y = (t.cuda() for t in _batch(n=16, res=64))
    losses = []
    for compile_it in (False, True):
        model = _model(seed=1).cuda().to(memory_format=torch.channels_last)
        step_model = torch.compile(model) if compile_it else model
        optimizer = create_optimizer(model, stage.optimizer)
        losses.append(training_step(step_model, x, y, optimizer, nn.CrossEntropyLoss(), stage,
                                    generator=torch.Generator("cuda").manual_seed(0)))
    torch.testing.assert_close(losses[1], losses[0], atol=2e-2, rtol=2e-2)  # bf16 autocast both ways


def test_compiled_n_fgsm_equals_eager_takes_the_input_gradient_only_and_never_recompiles_for_eps():
    """N-FGSM under torch.compile: the example eager gives, one gradient (the input's) out of its
    backward graph, and no new graph for another ε (ε, α and the noise width are tensors)."""
    backend, backward_outputs = _recording_backend()
    model = _model()
    compiled = torch.compile(model, backend=backend)
    x, y = _batch()
    cfg = AdversarialConfig(method="n_fgsm", eps=8 / 255)
    eager = pgd(model, x, y, cfg, generator=torch.Generator().manual_seed(0))
    ours = pgd(compiled, x, y, cfg, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours, eager)
    assert not torch.equal(ours, x) and backward_outputs == [1]
    assert all(p.grad is None for p in model.parameters())
    graphs = _graphs()
    pgd(compiled, x, y, AdversarialConfig(method="n_fgsm", eps=2 / 255), generator=torch.Generator().manual_seed(1))
    assert _graphs() == graphs and backward_outputs == [1]


@pytest.mark.parametrize("name,dynamic,arch", [
    ("winner", None, "test_efficientnet"), ("submissions-2022/cutmix-augmix-sam", None, "test_efficientnet"),
    ("winner", False, "test_efficientnet"), ("winner-convnext", None, "test_convnext"),
    ("winner-vit", None, "test_vit")])
def test_a_recipe_stays_compiled_for_its_whole_schedule(name, dynamic, arch):
    """Every stage's steps at every resolution of its schedule (a quarter of the size: the graphs
    depend on how many sizes, not which), through the compiled model as a run calls it, with
    dynamo's limit as the run sets it (training/compiled.py). A step that would run eagerly fails:
    past the recompile limit (fail_on_recompile_limit_hit) or at a graph break. With static shapes
    (``dynamic=False``, a graph per resolution: the plan's worst case) the winner needs 9 graphs,
    one more than dynamo's default allows. ConvNeXt and the ViT (its position embedding resized at
    each size) on their families' tiny models. (winner-fast's schedule is the winner's, cut in two.)"""
    from torch._dynamo.utils import counters

    from fasttricks.training.compiled import limit_for, make_room, planned_graphs

    recipe = load_recipe(name)
    torch._dynamo.reset()
    counters.clear()
    # dynamo's defaults (pytest's differ), restored after
    with torch._dynamo.config.patch(recompile_limit=8, accumulated_recompile_limit=256,
                                    fail_on_recompile_limit_hit=True):
        assert make_room(recipe) == limit_for(recipe) >= 8
        _walk_schedule(recipe, dynamic, arch)
    assert not counters["graph_break"], dict(counters["graph_break"])
    planned = sum(len(g) for g in planned_graphs(recipe).values())
    assert _graphs() <= planned  # the plan is an upper bound: the limit it sets holds every graph


def _walk_schedule(recipe, dynamic: bool | None = None, arch: str = "test_efficientnet"):
    from fasttricks.models import freezing
    from fasttricks.training.step import criterion_for

    torch.manual_seed(0)
    model = create_model(ModelConfig(arch=arch), 10)
    compiled = torch.compile(model, backend="aot_eager", dynamic=dynamic)
    for stage in recipe.stages:
        freezing.unfreeze(model.net)
        freezing.freeze(model.net, freezing.resolve(model.net, stage.freeze))
        optimizer = create_optimizer(model, stage.optimizer)
        attacks = [stage] if stage.adversarial is None or stage.adversarial.guard is None else \
            [stage, stage.model_copy(update={"adversarial": stage.adversarial.fallback()})]  # after a collapse
        for res in dict.fromkeys(resolution_at(stage.resolution, e) for e in range(stage.epochs)):
            x, y = _batch(n=2, res=max(16, res // 4 // 16 * 16))  # a quarter, on the ViT's 16-px grid
            for s in attacks:
                training_step(compiled, x, y, optimizer, criterion_for(s), s, generator=torch.Generator(),
                              attack_model=compiled)
