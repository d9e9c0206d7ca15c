"""Two processes on the CPU (gloo): disjoint shards that cover the epoch; a DDP step on two
half-batches equals one step on the whole batch, attack and frozen layers included, with one
all-reduce pass per step; torchrun training writes from rank 0 only and resumes exactly."""

import json
import os
import socket
import subprocess
import sys

import ddp_workers
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from fasttricks.recipes import PIPELINES


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_see_disjoint_samples_that_cover_the_epoch(toy_data, tmp_path):
    mp.spawn(ddp_workers.loader_order, args=(2, _free_port(), str(toy_data / "train.beton"), str(tmp_path)),
             nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    a, b = (set(r["order"]) for r in ranks)
    assert not a & b and a | b == set(range(400))  # 400 images, 200 per rank
    assert ranks[0]["images"] == ranks[1]["images"] == 200


def test_a_ddp_step_on_two_halves_equals_one_step_on_the_whole_batch(tmp_path):
    ddp_workers.reference_steps(str(tmp_path))
    mp.spawn(ddp_workers.ddp_steps, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    initial, *_, reference = torch.load(tmp_path / "reference.pt", weights_only=True)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert all(ddp["identical_after_each_step"])
    for k, v in reference.items():
        torch.testing.assert_close(ddp["weights"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.equal(ddp["weights"]["classifier.weight"], initial["classifier.weight"])  # it trained
    assert torch.equal(ddp["weights"]["conv_stem.weight"], initial["conv_stem.weight"])  # frozen stayed
    # PGD's two input-gradient passes trigger no all-reduce: the same bucket count as a plain step
    assert ddp["plain_step_allreduces"] >= 1
    assert ddp["pgd_step_allreduces"] == [ddp["plain_step_allreduces"]] * 3
    assert ddp["n_fgsm_step_allreduces"] == ddp["plain_step_allreduces"]  # one all-reduce pass per step


def test_under_ddp_each_process_normalises_its_own_share_as_the_docs_say(tmp_path):
    """runtime/distributed.py: batch norm in train mode normalises over each process's share. A DDP
    step on two halves equals one process's step whose batch norms see each half apart (the mean of
    the halves' losses), and differs from normalising over the whole batch."""
    from fasttricks.training.step import create_optimizer

    mp.spawn(ddp_workers.train_mode_step, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    ddp = torch.load(tmp_path / "train_mode.pt", weights_only=True)
    stage = ddp_workers._stage()
    after = {}
    for how in ("halves apart", "whole batch"):
        model, images, labels = ddp_workers._model_and_batch()
        model.train()
        optimizer = create_optimizer(model, stage.optimizer)
        ce = torch.nn.CrossEntropyLoss()
        if how == "halves apart":
            loss = (ce(model(images[:4]), labels[:4]) + ce(model(images[4:]), labels[4:])) / 2
        else:
            loss = ce(model(images), labels)
        loss.backward()
        optimizer.step()
        after[how] = model.net.state_dict()
    for k, v in ddp.items():
        torch.testing.assert_close(v, after["halves apart"][k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.allclose(v, after["whole batch"][k], atol=1e-5) for k, v in ddp.items())


def test_a_sam_step_under_ddp_all_reduces_once_and_perturbs_along_each_ranks_own_gradient(tmp_path):
    mp.spawn(ddp_workers.sam_steps, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    ddp = torch.load(tmp_path / "sam.pt", weights_only=True)
    assert ddp["plain_step_allreduces"] >= 1
    assert ddp["sam_step_allreduces"] == ddp["plain_step_allreduces"]  # the first pass is not all-reduced
    # worked by hand in one process: each half's own gradient g_r gives its perturbation
    # e_r = rho g_r / ||g_r||; the update is SGD's first step on the mean of the gradients at w + e_r
    model, images, labels = ddp_workers._model_and_batch()
    params = {n: p for n, p in model.net.named_parameters() if p.requires_grad}
    rho, lr = ddp_workers.SAM_STAGE["optimizer"]["sam"]["rho"], ddp_workers.SAM_STAGE["optimizer"]["lr"]

    def grads(x, y):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        return dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))

    second = []
    for r in (0, 1):
        x, y = images[r * 4:r * 4 + 4], labels[r * 4:r * 4 + 4]
        g = grads(x, y)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v) for v in g.values()]))
        with torch.no_grad():
            for n, p in params.items():
                p.add_(g[n] * rho / (norm + 1e-12))
        second.append(grads(x, y))
        with torch.no_grad():
            for n, p in params.items():
                p.sub_(g[n] * rho / (norm + 1e-12))
    for n, p in params.items():
        expected = p.detach() - lr * (second[0][n] + second[1][n]) / 2
        torch.testing.assert_close(ddp["weights"][n], expected, rtol=1e-5, atol=1e-6, msg=n)


def test_batch_norm_recalibration_on_two_ranks_takes_half_the_batches_each_and_gives_one_processs_statistics(
        toy_data, tmp_path):
    beton = str(toy_data / "train.beton")
    mp.spawn(ddp_workers.calibrate, args=(2, _free_port(), beton, str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    one, forwarded = ddp_workers.calibrated_statistics(beton)
    assert forwarded == 4 and [r["forwarded"] for r in ranks] == [2, 2]  # each rank its share of the 4
    for r in ranks:
        assert r["stats"]["seen"] == one["seen"] == 128
        for k, v in one.items():
            torch.testing.assert_close(torch.tensor(r["stats"][k]), torch.tensor(v), rtol=1e-5, atol=1e-6, msg=k)


def test_sync_batch_norm_recalibration_on_uneven_shares_starts_no_collective_and_gives_one_processs_statistics(
        toy_data, tmp_path):
    """3 batches on 2 ranks: rank 0 forwards 2, rank 1 one (100 on 8 ranks: 13 or 12). A
    SyncBatchNorm's all-reduce per forward would meet the other rank's combining all-reduce (a hang
    on NCCL); the batch norms run on each rank alone and the one all-reduce at the end combines them."""
    beton = str(toy_data / "train.beton")
    mp.spawn(ddp_workers.calibrate, args=(2, _free_port(), beton, str(tmp_path), 3, True), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    one, forwarded = ddp_workers.calibrated_statistics(beton, 3)
    assert forwarded == 3 and [r["forwarded"] for r in ranks] == [2, 1]
    assert [r["collectives"] for r in ranks] == [0, 0]
    for r in ranks:
        assert r["stats"]["seen"] == one["seen"] == 96
        for k, v in one.items():
            torch.testing.assert_close(torch.tensor(r["stats"][k]), torch.tensor(v), rtol=1e-5, atol=1e-6, msg=k)


def test_a_compiled_step_under_ddp_is_compile_around_ddp_around_the_model(tmp_path):
    mp.spawn(ddp_workers.step_modules, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    built = json.loads((tmp_path / "modules.json").read_text())
    assert built["compiled"] == ["OptimizedModule", "DistributedDataParallel", True]  # PyTorch's order
    assert built["eager"] == ["DistributedDataParallel", True]


def _torchrun(data, out, *extra):
    """The winner recipe, tiny: PGD stage, then frozen first half + augmentation + F-CutMix with
    weight averaging, then FixRes and robust evaluation, on two CPU processes."""
    sets = ["data.val_resize=48", "data.val_crop=40", "data.workers=1", "stages.0.epochs=1", "stages.1.epochs=2",
            "stages.0.resolution={min: 32, max: 32}", "stages.1.resolution={min: 40, max: 40}",
            "stages.1.average.last=2", "stages.1.average.bn_batches=2", "evaluation.attack.steps=2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "fasttricks", "train", "--recipe", "winner", "--data", str(data),
           "--override", str(PIPELINES / "overrides" / "toy-winner.yaml"), "--out", str(out),
           *(a for kv in sets for a in ("--set", kv)), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def torchrun_run(toy_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "full"
    _torchrun(toy_data, out)
    return out


def test_torchrun_training_writes_the_run_from_rank_zero_only(torchrun_run):
    out = torchrun_run
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml", "curves.png",  # no .lock left
                                                    "environment.json", "final.safetensors", "fixres.csv", "fixres.png",
                                                    "metrics.jsonl", "summary.json"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["s0-e001", "s1-e001", "s1-e002",
                                                                      "s1-e002-avg"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage_index"], r["epoch"], "averaged" in r) for r in rows] == [
        (0, 1, False), (1, 1, False), (1, 2, False), (1, 2, True)]
    summary = json.loads((out / "summary.json").read_text())
    assert {"val_top1", "val_clutter_top1", "val_robust_top1", "fixres", "test_crop"} <= summary.keys()
    frozen_after_stage_1 = load_file(str(out / "checkpoints" / "s0-e001" / "model.safetensors"))
    final = load_file(str(out / "final.safetensors"))
    assert torch.equal(final["conv_stem.weight"], frozen_after_stage_1["conv_stem.weight"])
    assert torch.equal(final["bn1.running_mean"], frozen_after_stage_1["bn1.running_mean"])
    # each rank's own random stream (dropout, drop-path), saved for each rank to continue
    state = torch.load(out / "checkpoints" / "s1-e001" / "state.pt", weights_only=True)
    streams = [r["torch"] for r in state["rng_by_rank"]]
    assert len(streams) == 2 and not torch.equal(streams[0], streams[1])


def test_torchrun_resume_in_stage_two_ends_where_the_uninterrupted_run_ends(torchrun_run, toy_data, tmp_path):
    part = _torchrun(toy_data, tmp_path / "r", "--stop-after", "2")
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == ["s0-e001", "s1-e001"]
    # only rank 0 speaks: the override's line and the stop's, once each
    assert part.stderr.count("also changes the experiment") == 1 and part.stderr.count("stopped after 2") == 1
    _torchrun(toy_data, tmp_path / "r", "--resume")
    a, b = load_file(str(torchrun_run / "final.safetensors")), load_file(str(tmp_path / "r" / "final.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "r" / "fixres.csv").read_text() == (torchrun_run / "fixres.csv").read_text()


def test_a_non_finite_loss_on_one_rank_stops_every_rank_with_the_same_message(toy_data, tmp_path):
    mp.spawn(ddp_workers.diverge_on_rank_one, args=(2, _free_port(), str(toy_data), str(tmp_path / "r")), nprocs=2)
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert messages[0] == messages[1]
    assert "non-finite loss in stage 'train', epoch 1, step 3" in messages[0]
    assert not (tmp_path / "r" / "checkpoints").exists() or not any((tmp_path / "r" / "checkpoints").iterdir())


def test_sigterm_on_one_rank_stops_every_rank_after_the_same_step_and_rank_zero_saves(toy_data, tmp_path):
    mp.spawn(ddp_workers.sigterm_on_rank_one, args=(2, _free_port(), str(toy_data), str(tmp_path / "r")), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # 200 images per rank, 32 per step: 6 steps an epoch; the ranks agree at the epoch's last step
    assert ranks[0]["steps"] == ranks[1]["steps"] == 6
    assert ranks[0]["exit_code"] == ranks[1]["exit_code"] == 75
    assert "saved" in ranks[0]["message"] and ranks[1]["message"] == ""  # rank 0 speaks for the run
    assert [p.name for p in (tmp_path / "r" / "checkpoints").iterdir()] == ["s0-e000-step000006"]


def test_sharded_evaluation_on_two_ranks_gives_the_numbers_of_one_process(toy_data, tmp_path):
    from fasttricks.evaluation.evaluate import evaluate_splits, val_loaders
    from fasttricks.models.factory import create_model
    from fasttricks.recipes import ModelConfig

    mp.spawn(ddp_workers.sharded_accuracy, args=(2, _free_port(), str(toy_data), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    torch.manual_seed(0)
    model = create_model(ModelConfig(arch="test_efficientnet"), 10).eval()
    one = evaluate_splits(model, val_loaders(toy_data, resize=48, crop=40, batch_size=32, device=torch.device("cpu"),
                                             workers=1), torch.device("cpu"))
    attack, linear = ddp_workers.robust_eval_attack(), ddp_workers.pixel_classifier()
    robust = {b: evaluate_splits(linear, val_loaders(toy_data, resize=48, crop=40, batch_size=b, workers=1,
                                                     device=torch.device("cpu")), torch.device("cpu"), attack)
              for b in (32, 7)}

    def figures(m: dict) -> tuple:
        return m["robust_top1"], m["robust_top5"]

    # the starts move predictions, so a start that depended on the batch would show
    assert any(figures(robust[32][s]) != (robust[32][s]["top1"], robust[32][s]["top5"]) for s in robust[32])
    for split in ("val", "val_clutter"):
        # robust accuracy: each image's random start is its own, on 1 or 2 processes, at any batch size
        assert {tuple(r["results"][split]["robust"]) for r in ranks} == {figures(robust[b][split]) for b in robust}
        assert len({figures(robust[b][split]) for b in robust}) == 1
        assert ranks[0]["shard"][split] + ranks[1]["shard"][split] == one[split]["images"] == 100  # disjoint halves
        assert ranks[0]["shard"][split] == 50
        for r in ranks:
            assert r["results"][split]["images"] == one[split]["images"]
            assert r["results"][split]["top1"] == pytest.approx(one[split]["top1"])
            assert r["results"][split]["top5"] == pytest.approx(one[split]["top5"])
