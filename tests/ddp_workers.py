"""Per-process bodies of the two-process tests (test_distributed.py), run with
torch.multiprocessing on the CPU with gloo. Each writes what it saw to a JSON or .pt file."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks


def _join(rank: int, world: int, port: int) -> None:
    import datetime

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    timeout = datetime.timedelta(seconds=float(os.environ.get("FASTTRICKS_TEST_DIST_TIMEOUT_S", "1800")))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)


def loader_order(rank: int, world: int, port: int, beton: str, out: str) -> None:
    """The samples this rank's training loader visits in epoch 3, and the batches it yields."""
    from fasttricks.data.loader import TrainLoader

    _join(rank, world, port)
    try:
        loader = TrainLoader(beton, batch_size=20, resolution=32, seed=0, device=torch.device("cpu"), workers=1,
                             distributed=True)
        order = loader.order.sample_order(3).tolist()
        images = sum(x.shape[0] for x, _ in loader.epoch(3, 32))
        Path(out, f"rank{rank}.json").write_text(json.dumps({"order": order, "images": images}))
        dist.barrier()  # both done talking before either tears the group down (gloo aborts otherwise)
    finally:
        dist.destroy_process_group()


def _model_and_batch():
    from fasttricks.models.factory import create_model
    from fasttricks.models.freezing import first_half, freeze
    from fasttricks.recipes import ModelConfig

    torch.manual_seed(0)
    model = create_model(ModelConfig(arch="test_efficientnet"), 10)
    freeze(model.net, first_half(model.net))
    model.eval()  # batch norms on running statistics: a sample's loss does not depend on its batch
    g = torch.Generator().manual_seed(1)
    return model, torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)


def _stage():
    from fasttricks.recipes import StageConfig

    return StageConfig(batch_size=8, label_smoothing=0.0, optimizer={"name": "sgd", "lr": 0.5, "weight_decay": 0.0},
                       adversarial={"norm": "linf", "eps": "8/255", "step_size": "4/255", "steps": 2,
                                    "random_start": False})


STATISTICS = ("running_mean", "running_var", "num_batches_tracked")  # what a forward, not the step, changes


def train_mode_step(rank: int, world: int, port: int, out: str) -> None:
    """One plain DDP step with batch norms in train mode, each rank its half: the weights after it."""
    from fasttricks.runtime import distributed
    from fasttricks.training.step import create_optimizer, training_step

    _join(rank, world, port)
    try:
        model, images, labels = _model_and_batch()
        model.train()
        half = slice(rank * 4, rank * 4 + 4)
        stage = _stage().model_copy(update={"adversarial": None})
        training_step(distributed.wrap(model, torch.device("cpu")), images[half], labels[half],
                      create_optimizer(model, stage.optimizer), torch.nn.CrossEntropyLoss(), stage)
        if rank == 0:
            torch.save({k: v for k, v in model.net.state_dict().items() if not k.endswith(STATISTICS)},
                       Path(out, "train_mode.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def reference_steps(out: str, steps: int = 3) -> None:
    """One process, the whole batch: the weights at the start and after each step."""
    from fasttricks.training.step import create_optimizer, training_step

    model, images, labels = _model_and_batch()
    stage = _stage()
    optimizer = create_optimizer(model, stage.optimizer)
    history = [{k: v.clone() for k, v in model.net.state_dict().items()}]
    for _ in range(steps):
        training_step(model, images, labels, optimizer, torch.nn.CrossEntropyLoss(), stage)
        history.append({k: v.clone() for k, v in model.net.state_dict().items()})
    torch.save(history, Path(out, "reference.pt"))


def ddp_steps(rank: int, world: int, port: int, out: str, steps: int = 3) -> None:
    """Each rank its half of the batch, DDP, the attack on the unwrapped module: weights after each
    step, and how many gradient buckets were all-reduced in a plain step and in a PGD step."""
    from fasttricks.runtime import distributed
    from fasttricks.training.step import create_optimizer, training_step

    _join(rank, world, port)
    try:
        model, images, labels = _model_and_batch()
        half = slice(rank * 4, rank * 4 + 4)
        images, labels = images[half], labels[half]
        stage = _stage()
        wrapped = distributed.wrap(model, torch.device("cpu"))
        calls = []

        def counting_hook(state, bucket):
            calls.append(1)
            return default_hooks.allreduce_hook(state, bucket)

        wrapped.register_comm_hook(None, counting_hook)
        optimizer = create_optimizer(model, stage.optimizer)
        history, per_step = [], []
        for _ in range(steps):
            before = len(calls)
            training_step(wrapped, images, labels, optimizer, torch.nn.CrossEntropyLoss(), stage, attack_model=model)
            per_step.append(len(calls) - before)
            state = {k: v.clone() for k, v in model.net.state_dict().items()}
            gathered = [None] * world
            dist.all_gather_object(gathered, state)
            history.append(all(all(torch.equal(state[k], other[k]) for k in state) for other in gathered))
        plain = copy.deepcopy(stage)
        plain.adversarial = None
        before = len(calls)
        training_step(wrapped, images, labels, optimizer, torch.nn.CrossEntropyLoss(), plain, attack_model=model)
        plain_calls = len(calls) - before
        one_step = copy.deepcopy(stage)
        one_step.adversarial = {"method": "n_fgsm", "eps": "8/255"}  # N-FGSM: its input gradient is not all-reduced
        before = len(calls)
        training_step(wrapped, images, labels, optimizer, torch.nn.CrossEntropyLoss(), one_step, attack_model=model)
        if rank == 0:
            torch.save({"weights": state, "identical_after_each_step": history, "pgd_step_allreduces": per_step,
                        "plain_step_allreduces": plain_calls, "n_fgsm_step_allreduces": len(calls) - before},
                       Path(out, "ddp.pt"))
        dist.barrier()  # both done talking before either tears the group down (gloo aborts otherwise)
    finally:
        dist.destroy_process_group()


SAM_STAGE = {"batch_size": 8, "label_smoothing": 0.0,
             "optimizer": {"name": "sgd", "lr": 0.5, "weight_decay": 0.0, "sam": {"rho": 0.05}}}


def sam_steps(rank: int, world: int, port: int, out: str) -> None:
    """One SAM step on each rank's half under DDP: the weights after it, and how many gradient
    buckets a SAM step and a plain step all-reduce."""
    from fasttricks.recipes import StageConfig
    from fasttricks.runtime import distributed
    from fasttricks.training.step import create_optimizer, training_step

    _join(rank, world, port)
    try:
        model, images, labels = _model_and_batch()
        half = slice(rank * 4, rank * 4 + 4)
        images, labels = images[half], labels[half]
        stage = StageConfig(**SAM_STAGE)
        wrapped = distributed.wrap(model, torch.device("cpu"))
        calls = []

        def counting_hook(state, bucket):
            calls.append(1)
            return default_hooks.allreduce_hook(state, bucket)

        wrapped.register_comm_hook(None, counting_hook)
        optimizer = create_optimizer(model, stage.optimizer)
        training_step(wrapped, images, labels, optimizer, torch.nn.CrossEntropyLoss(), stage)
        sam_calls = len(calls)
        weights = {n: p.detach().clone() for n, p in model.net.named_parameters()}
        plain = stage.model_copy(update={"optimizer": stage.optimizer.model_copy(update={"sam": None})})
        training_step(wrapped, images, labels, create_optimizer(model, plain.optimizer), torch.nn.CrossEntropyLoss(),
                      plain)
        if rank == 0:
            torch.save({"weights": weights, "sam_step_allreduces": sam_calls,
                        "plain_step_allreduces": len(calls) - sam_calls}, Path(out, "sam.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def calibrate(rank: int, world: int, port: int, beton: str, out: str, batches: int = 4, sync: bool = False) -> None:
    """Batch-norm recalibration on ``batches`` batches of 32 images, each rank its share; with
    ``sync``, every batch norm a (fake, CPU) SyncBatchNorm that counts the collectives it starts."""
    os.environ["FASTTRICKS_TEST_DIST_TIMEOUT_S"] = "30"  # a mismatched collective fails, never hangs the suite
    _join(rank, world, port)
    try:
        if sync:
            torch.nn.SyncBatchNorm.forward = _counting_sync_forward
        stats, forwarded = calibrated_statistics(beton, batches, sync)
        Path(out, f"rank{rank}.json").write_text(json.dumps({"stats": stats, "forwarded": forwarded,
                                                             "collectives": _COLLECTIVES[0]}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


_COLLECTIVES = [0]


def _counting_sync_forward(self, x):
    """SyncBatchNorm's forward as far as its collectives go, for the CPU (the real one refuses CPU
    tensors under a process group): in train mode, on a group of several ranks, one all-reduce per
    forward, counted; then a plain batch norm."""
    group = self.process_group or dist.group.WORLD
    if self.training and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(torch.ones(x.shape[1]), group=group)
        _COLLECTIVES[0] += 1
    return torch.nn.modules.batchnorm._BatchNorm.forward(self, x)


def calibrated_statistics(beton: str, batches: int = 4, sync: bool = False) -> tuple[dict, int]:
    """The recalibrated statistics of a seeded tiny model, and the batches this process forwarded."""
    import timm.layers

    from fasttricks.models.averaging import calibration_batches, recalibrate_batch_norm
    from fasttricks.models.factory import create_model
    from fasttricks.recipes import ModelConfig

    torch.manual_seed(0)
    model = create_model(ModelConfig(arch="test_efficientnet"), 10)
    if sync:
        model.net = timm.layers.convert_sync_batchnorm(model.net)
    chosen = list(calibration_batches(Path(beton), batches, 32, 32, seed=0, device=torch.device("cpu"), workers=1))
    seen = recalibrate_batch_norm(model, model.net, chosen)
    stats = {k: v.tolist() for k, v in model.net.state_dict().items() if "running" in k}
    return {**stats, "seen": seen}, len(chosen)


def step_modules(rank: int, world: int, port: int, out: str) -> None:
    """What distributed.step_module builds, compiled and eager, under two processes."""
    from fasttricks.runtime import distributed

    _join(rank, world, port)
    try:
        model, _, _ = _model_and_batch()
        compiled = torch.compile(model)  # not run: only the wrappers' order is looked at
        step = distributed.step_module(model, compiled, torch.device("cpu"))
        eager = distributed.step_module(model, model, torch.device("cpu"))
        if rank == 0:
            Path(out, "modules.json").write_text(json.dumps({
                "compiled": [type(step).__name__, type(step._orig_mod).__name__, step._orig_mod.module is model],
                "eager": [type(eager).__name__, eager.module is model]}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _toy_training(rank: int, world: int, port: int, data: str, out: str, fault, outcome, result: str) -> None:
    """The toy baseline (2 epochs) on two gloo processes, each training step passed through
    ``fault(real_step, rank, calls)``; ``outcome(run)`` turns the training into what this rank writes
    to ``result`` (``{rank}`` in it)."""
    from fasttricks.recipes import PIPELINES, load_recipe
    from fasttricks.training import loop as train_mod

    _join(rank, world, port)
    try:
        calls = []
        train_mod.training_step = fault(train_mod.training_step, rank, calls)
        recipe = load_recipe("baseline", [PIPELINES / "overrides" / "toy.yaml"],
                             ["stages.0.epochs=2", "data.val_resize=48", "data.val_crop=40", "data.workers=1"])
        text = outcome(lambda: train_mod.train(recipe, data, out, device=torch.device("cpu"), show_progress=False),
                       calls)
        Path(out).parent.joinpath(result.format(rank=rank)).write_text(text)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _nan_at_the_third_step_of_rank_one(real_step, rank, calls):
    def step(*args, **kwargs):
        calls.append(1)
        loss = real_step(*args, **kwargs)
        return loss * float("nan") if rank == 1 and len(calls) == 3 else loss
    return step


def _what_it_raised(run, calls) -> str:
    from fasttricks.training.interrupts import TrainingDiverged

    try:
        run()
        return "finished"
    except TrainingDiverged as e:
        return str(e)


def diverge_on_rank_one(rank: int, world: int, port: int, data: str, out: str) -> None:
    """Train with a loss that turns NaN on rank 1 only, at its third step: what each rank raised."""
    _toy_training(rank, world, port, data, out, _nan_at_the_third_step_of_rank_one, _what_it_raised, "rank{rank}.txt")


def _sigterm_at_the_third_step_of_rank_one(real_step, rank, calls):
    import signal

    def step(*args, **kwargs):
        calls.append(1)
        if rank == 1 and len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args, **kwargs)
    return step


def _how_it_stopped(run, calls) -> str:
    from fasttricks.training.interrupts import Interrupted

    try:
        run()
        stopped = {"finished": True}
    except Interrupted as e:
        stopped = {"message": str(e), "exit_code": e.exit_code}
    return json.dumps({**stopped, "steps": len(calls)})


def sigterm_on_rank_one(rank: int, world: int, port: int, data: str, out: str) -> None:
    """Rank 1 alone gets SIGTERM during its 3rd step; each rank records how it stopped."""
    _toy_training(rank, world, port, data, out, _sigterm_at_the_third_step_of_rank_one, _how_it_stopped,
                  "rank{rank}.json")


def robust_eval_attack():
    """A random start alone, large enough to move predictions: what robust accuracy then reads
    depends on each image's start (a gradient step would bring every figure to 0 here)."""
    from fasttricks.recipes import AdversarialConfig

    return AdversarialConfig(eps="64/255", steps=0, random_start=True)


ROBUST_EVAL = None  # set in the worker (the recipes module imported there)


def pixel_classifier() -> torch.nn.Module:
    """A linear read-out of the pixels (seeded): unlike an untrained network, whose answer hardly
    depends on its input, its predictions move with every image's random start."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 40 * 40, 10)).eval()


def sharded_accuracy(rank: int, world: int, port: int, data: str, out: str) -> None:
    """Each rank evaluates its shard of val and val_clutter; the all-reduced result, and how many
    images this rank's loader gave."""
    from fasttricks.evaluation.evaluate import evaluate_splits, val_loaders
    from fasttricks.models.factory import create_model
    from fasttricks.recipes import ModelConfig

    global ROBUST_EVAL
    ROBUST_EVAL = robust_eval_attack()
    _join(rank, world, port)
    try:
        torch.manual_seed(0)
        model = create_model(ModelConfig(arch="test_efficientnet"), 10).eval()
        loaders = val_loaders(data, resize=48, crop=40, batch_size=32, device=torch.device("cpu"), workers=1,
                              distributed=True)
        shard = {split: sum(y.shape[0] for _, y in loader) for split, loader in loaders.items()}
        results = evaluate_splits(model, loaders, torch.device("cpu"))
        robust = evaluate_splits(pixel_classifier(), loaders, torch.device("cpu"), ROBUST_EVAL)
        for split in results:
            results[split]["robust"] = [robust[split]["robust_top1"], robust[split]["robust_top5"]]
        Path(out, f"rank{rank}.json").write_text(json.dumps({"results": results, "shard": shard}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def trained_readout(data: str) -> torch.nn.Module:
    """``pixel_classifier`` trained (seeded, 20 passes of Adam) on the toy training set at the
    evaluation crop: right on a good part of val, so that an attack has something to break."""
    from fasttricks.data.loader import ValLoader

    model = pixel_classifier().train()
    loader = ValLoader(Path(data) / "train.beton", batch_size=100, resize=48, crop=40, device=torch.device("cpu"),
                       workers=1)
    batches = list(loader)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(20):
        for images, labels in batches:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
    return model.eval()


def sharded_autoattack(rank: int, world: int, port: int, data: str, out: str) -> None:
    """AutoAttack's robust accuracy on val, chunks of 30 dealt over the ranks; the all-reduced
    result and how many images this rank attacked."""
    from fasttricks.evaluation.evaluate import val_loaders
    from fasttricks.recipes import AutoAttackConfig
    from fasttricks.robust import autoattack

    autoattack.CHUNK = 30
    model = trained_readout(data)  # before joining: the same weights on every rank, seeded
    _join(rank, world, port)
    try:
        loader = val_loaders(data, resize=48, crop=40, batch_size=32, device=torch.device("cpu"), workers=1,
                             distributed=True)["val"]
        mine = sum(len(c) for c in autoattack.my_chunks(autoattack.chosen_images(100, None)))
        result = autoattack.robust_top1(model, loader, AutoAttackConfig(eps="2/255"), torch.device("cpu"), 10)
        Path(out, f"aa-rank{rank}.json").write_text(json.dumps({"result": result, "mine": mine}))
        dist.barrier()
    finally:
        dist.destroy_process_group()
