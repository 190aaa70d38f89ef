"""The end of every stage run: its model saved atomically, its metrics in MLflow and in metrics/<stage>.json."""

from __future__ import annotations

from pathlib import Path

from posttrain.core.files import atomic_dir, is_main_process, write_json
from posttrain.core.tracking import log_model_dir, log_stage_metrics, stage_run
from posttrain.model.loading import save_model, save_trained, write_passthrough
from posttrain.train.training import clear_checkpoints


def finish(stage: str, cfg, metrics: dict, model=None, tokenizer=None, base_path: str | Path | None = None,
           trainer=None) -> dict:
    """Inside the stage's MLflow run: save the model into `cfg.out_dir` in one rename, log the metrics and the
    model folder, write metrics/<stage>.json, then drop the stage's checkpoints (the run is complete).

    With a `trainer`, its model is saved through the trainer's own save path (posttrain.model.loading.save_trained),
    which every process of a multi-process launch must call; else `model` (if given) with save_model.
    """
    if trainer is not None:
        with atomic_dir(cfg.out_dir) as tmp:  # the main process's temp dir; a scratch dir in the others
            save_trained(trainer, tokenizer, tmp, base_path=base_path)
    elif model is not None:
        with atomic_dir(cfg.out_dir) as tmp:
            save_model(model, tokenizer, tmp, base_path=base_path)
    log_stage_metrics(metrics)
    if trainer is not None or model is not None:
        log_model_dir(cfg.out_dir, cfg)
    write_json(f"metrics/{stage}.json", metrics)
    if is_main_process():
        clear_checkpoints(stage)
    return metrics


def pass_through(stage: str, cfg, model: str | None) -> dict:
    """A stage switched off (`<stage>.enabled: false`): its out_dir names `model` instead of holding weights, so
    every later stage loads the input through it (posttrain.model.loading.local_path); metrics say `skipped`."""
    metrics = {"skipped": True, "model": model}
    with stage_run(stage, cfg) as run:
        if run is not None:
            import mlflow

            mlflow.set_tag("skipped", "true")
        with atomic_dir(cfg.out_dir) as tmp:
            write_passthrough(tmp, model, stage)
        write_json(f"metrics/{stage}.json", metrics)
    clear_checkpoints(stage)
    print(f"[{stage}] switched off ({stage}.enabled: false): {cfg.out_dir} passes on {model}", flush=True)
    return metrics
