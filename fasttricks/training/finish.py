"""The ends of a stage and of a run: a stage's weight averaging (checkpoints or EMA, batch norms
recomputed) and curves; after the last stage, FixRes, the final evaluation, final.safetensors and
summary.json."""

from __future__ import annotations

import timm.utils
from safetensors.torch import load_file

from fasttricks.evaluation import fixres
from fasttricks.evaluation.evaluate import as_row, evaluate_splits
from fasttricks.models.averaging import average_files, calibration_batches, recalibrate_batch_norm
from fasttricks.models.factory import patch_size
from fasttricks.models.weights import read_info, save_weights
from fasttricks.progress import console
from fasttricks.recipes import StageConfig
from fasttricks.recipes.schedules import resolution_at
from fasttricks.robust.autoattack import describe as describe_autoattack
from fasttricks.robust.pgd import describe_eps
from fasttricks.runs import folder, plots
from fasttricks.runs.checkpoint import Position
from fasttricks.runtime import distributed
from fasttricks.training.epoch_log import describe_accuracy
from fasttricks.training.run import Run, kept_on_write_fault


def _final_metrics(run: Run) -> dict:
    rows = folder.read_metrics(run.out)
    return rows[-1] if rows else {}


def finish(run: Run, seconds: float) -> dict:
    """After the last stage: the FixRes sweep (when the recipe has one), then the final model and a
    summary of what is done (final.safetensors, summary.json with ``final_evaluation: pending``),
    then the final evaluation at the chosen test size (robust accuracy too when the recipe asks),
    which completes summary.json. The model is on disk before the evaluation that can fail (an
    attack at a large test size is the run's largest use of memory); ``--resume`` then evaluates it
    without training again (``finish_evaluation``)."""
    last = run.last_row or _final_metrics(run)  # (read back when this call trained nothing)
    data = run.recipe.data
    summary = {"run": str(run.out.resolve()), "recipe": run.recipe.name, "model": run.recipe.model.arch,
               "epochs": run.recipe.total_epochs(),
               "final_weights": str((run.out / "final.safetensors").resolve()),
               "val_resize": data.val_resize, "val_crop": data.val_crop,
               "test_resize": data.val_resize, "test_crop": data.val_crop,
               "seconds_this_call": round(seconds, 1), "batch_norm": run.info.get("batch_norm")}
    summary.update({k: v for k, v in last.items() if k.startswith(("val", "train_loss", "images_per_s"))})
    # every rank sweeps, fine-tunes and evaluates (sharded); rank 0 writes
    if run.recipe.fixres is not None:
        summary.update(_fixres(run))
    if any(g.get("fell_back_at_epoch") for g in run.info.get("guard", {}).values()):
        summary["guard"] = run.info["guard"]  # a stage fell back to PGD after a collapse
    summary["metrics_at"] = {"resize": data.val_resize, "crop": data.val_crop}  # where val_* were measured
    summary["final_evaluation"] = "pending" if _needs_final_evaluation(run) else "done"
    if run.is_main:
        with kept_on_write_fault(run.out):
            save_weights(run.out / "final.safetensors", run.model.net, run.info)
            folder.write_json(run.out / "summary.json", summary)
    if summary["final_evaluation"] == "pending":
        try:
            summary = _evaluate_final(run, summary)
        except Exception as e:  # the model is safe: say how to finish, keep the traceback
            if run.is_main:
                console.print(f"[red]the final evaluation failed ({type(e).__name__}); {run.out / 'final.safetensors'} "
                              f"is written: `fasttricks train --resume --out {run.out}` evaluates it without "
                              f"training again", soft_wrap=True)
            raise
    write_curves(run)  # with the final robust accuracy
    return summary


def finish_evaluation(run: Run) -> dict:
    """``--resume`` of a run whose final model was written but whose final evaluation did not end
    (out of memory, a lost node): the evaluation alone, on final.safetensors at its test size."""
    summary = folder.read_summary(run.out)
    weights, info = load_file(str(run.out / "final.safetensors")), read_info(run.out / "final.safetensors")
    run.model.net.load_state_dict(weights)
    run.info = {**run.info, **info}
    run.say(f"{run.out / 'final.safetensors'} is written and its final evaluation is not: evaluating it")
    summary = _evaluate_final(run, summary)
    write_curves(run)
    return summary


def _needs_final_evaluation(run: Run) -> bool:
    evaluation = run.recipe.evaluation
    return run.recipe.fixres is not None or evaluation.attack is not None or evaluation.autoattack is not None


def _evaluate_final(run: Run, summary: dict) -> dict:
    summary = {**summary, **_final_accuracy(run, summary["test_resize"], summary["test_crop"]),
               "metrics_at": {"resize": summary["test_resize"], "crop": summary["test_crop"]},
               "final_evaluation": "done"}
    if run.is_main:
        with kept_on_write_fault(run.out):
            folder.write_json(run.out / "summary.json", summary)
    return summary


def _fixres(run: Run) -> dict:
    """Sweep the test size, write the curve, optionally fine-tune at the best size; the model's
    info then names that size (eval and export read it)."""
    cfg, data = run.recipe.fixres, run.recipe.data
    sizes = fixres.size_pairs(cfg.sizes or fixres.default_sizes(data.val_crop), data.val_crop / data.val_resize,
                              patch_size(run.model.net))
    _, chosen = fixres.choose(run.model, run.val_loaders, sizes, metric=cfg.metric, held_out=cfg.held_out,
                              device=run.device, out_dir=run.out,
                              train_crop=run.info.get("train_resolution"), title=f"FixRes: {run.recipe.name}",
                              show_progress=run.show_progress and run.is_main, write=run.is_main)
    if cfg.finetune is not None:  # every rank, the same batches (a SyncBatchNorm then all-gathers on every rank)
        fixres.finetune(run.model, run.model.net, run.train_beton, crop=chosen["crop"], resize=chosen["resize"],
                        cfg=cfg.finetune, seed=run.recipe.seed, device=run.device, workers=data.workers,
                        frozen=run.info.get("frozen", []), show_progress=run.show_progress and run.is_main)
        distributed.broadcast_weights(run.model.net)
    run.info.update(fixres.test_size_info(run.info, chosen))
    return fixres.summary_fields(chosen)


def _final_accuracy(run: Run, resize: int, crop: int) -> dict:
    """Clean accuracy at the test size, and robust accuracy under the recipe's PGD and AutoAttack."""
    attack, auto = run.recipe.evaluation.attack, run.recipe.evaluation.autoattack
    for loader in run.val_loaders.values():
        loader.set_size(resize, crop)
    results = evaluate_splits(run.model, run.val_loaders, run.device, attack, auto, num_classes=run.info["num_classes"])
    out = as_row(results)
    if attack is not None:
        out["robust_attack"] = f"{attack.norm}:{describe_eps(attack)}:{attack.steps}"
    if auto is not None:
        out["autoattack"] = {**describe_autoattack(auto),
                             "images": {split: m["autoattack_images"] for split, m in results.items()
                                        if "autoattack_images" in m}}
    return out


def stopped(run: Run, epochs: int) -> dict:
    return {"run": str(run.out.resolve()), "stopped_after_epochs": epochs, **_final_metrics(run)}


def write_curves(run: Run) -> None:
    """RUN/curves.png, refreshed at each stage's end; a plotting failure never stops a run."""
    if not run.is_main:
        return
    try:
        plots.plot([run.out], run.out / plots.CURVES_NAME)
    except Exception as e:  # matplotlib on a head-less node, a full disk...: say so and go on
        console.print(f"[yellow]could not write {run.out / plots.CURVES_NAME}: {type(e).__name__}: {e}")


def average_stage(run: Run, s: int, stage: StageConfig, ema: timm.utils.ModelEmaV3 | None) -> None:
    """Replace the model by the stage's average (checkpoints or EMA), recompute the statistics of
    the batch norms that are not frozen, evaluate, and checkpoint it as the stage's result."""
    avg = stage.average
    distributed.barrier()  # rank 0 has written the stage's last checkpoint
    if ema is not None:
        run.model.net.load_state_dict(ema.module.state_dict())
        how = f"ema {avg.ema_decay}"
    else:
        epochs = stage.averaged_epochs()
        state, _ = average_files([run.out / "checkpoints" / Position(s, e).name() for e in epochs])
        run.model.net.load_state_dict(state)
        how = f"epochs {','.join(map(str, epochs))}"
    res = resolution_at(stage.resolution, stage.epochs - 1)
    if avg.bn_batches:
        batches = calibration_batches(run.train_beton, avg.bn_batches, stage.batch_size, res, seed=run.recipe.seed,
                                      device=run.device, workers=run.recipe.data.workers)
        recalibrate_batch_norm(run.model, run.model.net, batches, run.info["frozen"])
    distributed.broadcast_weights(run.model.net)  # identical on every rank to the last bit
    row = {"stage": stage.name, "stage_index": s, "epoch": stage.epochs, "averaged": how, "resolution": res}
    row.update(as_row(evaluate_splits(run.model, run.val_loaders, run.device)))
    run.record(s, stage.epochs, row)
    run.say(f"{stage.name}: weights averaged ({how}) · " + describe_accuracy(row))
    run.save(Position(s, stage.epochs, averaged=True))
