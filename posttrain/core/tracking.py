"""MLflow: one child run per stage, grouped under one parent run per lifecycle.

A lifecycle is one `dvc repro` (or one flow run): `$LIFECYCLE_ID` if set (the Prefect flow sets it),
else a digest of the git commit and params.yaml, so every stage run of the same code and params lands
under the same parent and the MLflow UI can compare whole lifecycles side by side.
MLflow is never required to be up: with no URI the store is a local sqlite file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Iterator

from posttrain.core.files import digest, git_commit, is_main_process

DEFAULT_URI = "sqlite:///mlflow.db"


def tracking_uri(configured: str) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def lifecycle_id(params_path: str | Path = "params.yaml") -> str:
    if os.environ.get("LIFECYCLE_ID"):
        return os.environ["LIFECYCLE_ID"]
    h = hashlib.sha256(git_commit().encode())
    p = Path(params_path)
    if p.exists():
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def flatten(obj, prefix: str = "") -> dict[str, object]:
    """Dataclass / nested dict -> {'a.b.c': value} for mlflow.log_params."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    out: dict[str, object] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _parent_run(client, experiment_id: str, lifecycle: str, commit: str, params: dict | None = None) -> str:
    """The lifecycle's parent run: found by its tag, else created with the whole params.yaml as its params."""
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.lifecycle = '{lifecycle}' and tags.kind = 'lifecycle'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        experiment_id, run_name=f"lifecycle-{lifecycle}",
        tags={"lifecycle": lifecycle, "kind": "lifecycle", "git_commit": commit},
    )
    if params:
        from mlflow.entities import Param

        client.log_batch(run.info.run_id, params=[Param(k, str(v)[:500]) for k, v in flatten(params).items()])
    return run.info.run_id


def lifecycle_run(tracking, lifecycle: str, commit: str, params: dict, tags: dict[str, str] | None = None) -> str:
    """Open (or find) the parent run of `lifecycle` before its stages run, add `tags`; return its run id.

    The Prefect flow calls this with LIFECYCLE_ID = `lifecycle`, so the stage runs it starts nest under it.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(tracking.uri))
    experiment = mlflow.set_experiment(tracking.experiment)
    client = mlflow.MlflowClient()
    run_id = _parent_run(client, experiment.experiment_id, lifecycle, commit, params)
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
    return run_id


def _read_params(path: Path) -> dict | None:
    from posttrain.core.config import read_params  # with its profile laid over it: the values the stages ran with

    return read_params(path) if path.exists() else None


@contextlib.contextmanager
def stage_run(stage: str, cfg, inputs: dict[str, str | Path] | None = None) -> Iterator[object]:
    """Start the stage's MLflow run (nested under its lifecycle) and log config, inputs and lineage.

    `cfg` must carry `.tracking` (TrackingConfig). Yields the active mlflow run; metrics logged with
    `mlflow.log_metric(s)` or by a trainer with report_to="mlflow" land in it. In the other ranks of a
    multi-process launch it yields None and logs nothing (transformers' MLflow callback logs from rank 0 only).
    """
    if not is_main_process():
        yield None
        return
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg.tracking.uri))
    experiment = mlflow.set_experiment(cfg.tracking.experiment)
    client = mlflow.MlflowClient()
    commit = git_commit()
    lifecycle = lifecycle_id("params.yaml")
    parent = _parent_run(client, experiment.experiment_id, lifecycle, commit, _read_params(Path("params.yaml")))
    tags = {
        "dvc_stage": stage, "git_commit": commit, "lifecycle": lifecycle, "kind": "stage",
        "mlflow.parentRunId": parent,
    }
    with mlflow.start_run(run_name=stage, tags=tags) as run:
        params = {f"cfg.{k}": v for k, v in flatten(cfg).items() if k != "tracking" and not k.startswith("tracking.")}
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        for name, path in (inputs or {}).items():
            mlflow.set_tag(f"input.{name}.sha256", digest(path))
            mlflow.set_tag(f"input.{name}.path", str(path))
        yield run
    client.set_terminated(parent)


def log_stage_metrics(metrics: dict[str, object], prefix: str = "") -> None:
    """Log the numeric entries of a (nested) metrics dict to the active run (main process only)."""
    if not is_main_process():
        return
    import mlflow

    flat = {f"{prefix}{k}": v for k, v in flatten(metrics).items()}
    mlflow.log_metrics({k: float(v) for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})


def log_model_dir(path: str | Path, cfg) -> None:
    """Copy a saved model/adapter folder into the active run's artifacts (if tracking.log_models; main process only)."""
    if not is_main_process():
        return
    import mlflow

    if cfg.tracking.log_models:
        mlflow.log_artifacts(str(path), artifact_path="model")
