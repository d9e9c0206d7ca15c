"""The attacked evaluation fits the device's memory (fasttricks/evaluation/memory.py): chunks sized
from a memory budget, halved on an out-of-memory error with the same result; and a run writes its
final model before the final evaluation, which ``--resume`` completes without training again."""

import json

import torch
from torch import nn

from fasttricks.evaluation.evaluate import accuracy
from fasttricks.evaluation.memory import Chunks, images_for_budget
from fasttricks.models.factory import create_model
from fasttricks.recipes import AdversarialConfig, ModelConfig, load_recipe
from fasttricks.training import finish
from fasttricks.training.loop import train

MB, GB = 1e6, 1e9
ATTACK = AdversarialConfig(eps="4/255", step_size="1/255", steps=2)


def test_the_budget_picks_fewer_images_at_larger_test_sizes():
    """#36's figures: ~135 MB per 240-px image for EfficientNet-B1 under PGD with input gradients,
    growing with the pixels; a validation batch of 256 on an 80 GB GPU with 78 GB free."""
    per_image = {size: 135 * MB * (size / 240) ** 2 for size in (240, 288, 384, 416)}
    picked = {size: images_for_budget(b, 78 * GB, 256) for size, b in per_image.items()}
    assert picked == {240: 256, 288: 256, 384: 157, 416: 134}
    assert all(n * per_image[s] <= 0.7 * 78 * GB for s, n in picked.items())
    assert images_for_budget(per_image[240], 0.05 * GB, 256) == 1  # never none


class RunsOutAboveFour(nn.Module):
    """A model whose forward with gradients fails as CUDA does when more than 4 images are asked."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.refused = 0

    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad and x.shape[0] > 4:
            self.refused += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 34.00 GiB")
        return self.net(x)


def test_an_attack_that_runs_out_of_memory_retries_in_halves_and_gives_the_same_accuracy():
    torch.manual_seed(0)
    model = create_model(ModelConfig(arch="test_efficientnet"), 10).eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(2)]
    cpu = torch.device("cpu")
    whole = accuracy(model, batches, cpu, ATTACK)
    said = []
    chunks = Chunks(say=said.append)
    small = RunsOutAboveFour(model)
    chunked = accuracy(small, batches, cpu, ATTACK, chunks)
    assert chunked == whole  # each image's start is seeded by its index: chunking changes nothing
    assert chunks.picked == [16, 8, 4] and small.refused == 2  # the budget's (the whole batch on the CPU), halved
    assert len(said) == 2 and "retrying with 4 images at a time" in said[-1]


def _recipe():
    return load_recipe("baseline", ["overrides/toy"], [
        "stages.0.epochs=2", "stages.0.resolution={min: 32, max: 32}", "data.val_resize=40", "data.val_crop=32",
        "evaluation.attack={eps: 2/255, step_size: 1/255, steps: 1}"])


def test_the_final_model_is_written_before_the_final_evaluation_and_resume_completes_it(toy_data, tmp_path,
                                                                                          monkeypatch):
    real = finish._final_accuracy

    def lost(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")  # not an OOM: not retried

    monkeypatch.setattr(finish, "_final_accuracy", lost)
    out = tmp_path / "r"
    try:
        train(_recipe(), toy_data, out, show_progress=False)
    except RuntimeError:
        pass
    else:
        raise AssertionError("the evaluation's failure should end the call")
    pending = json.loads((out / "summary.json").read_text())
    assert pending["final_evaluation"] == "pending" and (out / "final.safetensors").is_file()
    weights = (out / "final.safetensors").read_bytes()
    metrics, checkpoints = (out / "metrics.jsonl").read_text(), sorted(p.name for p in (out / "checkpoints").iterdir())

    from fasttricks.runs.status import describe, run_status

    status = run_status(out)
    assert not status["finished"] and status["evaluation_pending"]
    assert any("finishes it without training" in line for line in describe(status))
    monkeypatch.setattr(finish, "_final_accuracy", real)
    calls = []
    monkeypatch.setattr("fasttricks.training.loop._run_epoch", lambda *a, **k: calls.append(a))
    done = train(_recipe(), toy_data, out, resume=True, show_progress=False)
    assert calls == []  # nothing trained again
    assert done["final_evaluation"] == "done" and "val_robust_top1" in done
    assert json.loads((out / "summary.json").read_text()) == done
    assert (out / "final.safetensors").read_bytes() == weights
    assert (out / "metrics.jsonl").read_text() == metrics
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == checkpoints
    assert run_status(out)["finished"] and not run_status(out)["evaluation_pending"]
