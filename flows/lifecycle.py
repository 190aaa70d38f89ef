"""The lifecycle as a Prefect flow: a task per DVC stage; each flow run is one DVC experiment and one MLflow parent run.

    python -m flows.lifecycle -S sft.adapter.method=lora   # one run now (ephemeral Prefect API unless PREFECT_API_URL set)
    python -m flows.lifecycle --stage sft                  # one stage (and whatever it needs) as its own flow
    python -m flows.serve                                  # the deployments, with the nightly schedule

DVC stays the one truth for what runs and what is cached (flows.dvc_cli): the stages and their order are `dvc dag`'s,
each runs as `dvc repro --single-item <stage>` (an unchanged one skips in about a second), the `overrides` go into
params.yaml as `dvc exp run -S` writes them and the run is saved with `dvc exp save`, after which params.yaml is put
back (`dvc exp apply <name>` brings the run's values back). This flow adds what DVC and Prefect do not: a lock (a
second lifecycle waits `orchestration.lock_wait_s`, then fails naming the run that holds it), the stages as Prefect
tasks with `orchestration.retries` and their output in the task logs, and a report: an MLflow parent run holding
every stage's metrics (LIFECYCLE_ID: every stage's run nests under it) and a Prefect artifact with the stages, their
MLflow runs and their report tables. A failed stage publishes an artifact with its error and its own report.

Not `dvc exp run`: one per stage would commit an experiment per stage, and `dvc exp run --temp` runs the pipeline in
one process (no per-stage tasks, retries or logs); `dvc repro` per stage plus one `dvc exp save` is what `dvc exp
run` does in the workspace, cut at stage boundaries.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.dvc_cli import DvcFailed, dvc, dvc_stages, experiment_exists, overridden_params, plan, set_param_args
from posttrain.core.config import TrackingConfig, build, read_params
from posttrain.core.markdown import markdown_table
from posttrain.core.tracking import flatten, lifecycle_run, tracking_uri

LOCK_FILE = Path(".dvc/tmp/lifecycle.lock")


@dataclass(frozen=True)
class ScheduleConfig:
    cron: str
    timezone: str


@dataclass(frozen=True)
class OrchestrationConfig:
    retries: int  # per-stage task retries
    retry_delay_s: float
    lock_wait_s: float  # how long a second lifecycle waits for the running one before failing
    mlflow_ui: str  # base URL of the MLflow UI, for links
    schedule: ScheduleConfig


class LifecycleBusy(RuntimeError):
    """Another lifecycle holds this repository."""


class StageFailed(RuntimeError):
    pass


def orchestration_config(params: dict) -> OrchestrationConfig:
    return build(OrchestrationConfig, params.get("orchestration"), "orchestration")


# ---------------------------------------------------------------- the lock and the MLflow parent run


@contextlib.contextmanager
def lifecycle_lock(root: Path, wait_s: float, holder: dict[str, Any]) -> Iterator[None]:
    """Hold the repo's lifecycle lock for the whole run; a second lifecycle waits `wait_s`, then fails naming the holder.

    DVC's own lock covers one `dvc repro` at a time; this one covers the run from the params it writes to
    the experiment it saves. An flock dies with its process: a killed run leaves no stale lock.
    """
    path = root / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LifecycleBusy(_busy_message(path, wait_s)) from None
                time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _busy_message(path: Path, wait_s: float) -> str:
    try:
        h = json.loads(path.read_text())
        who = f"flow run '{h['flow_run']}' (pid {h['pid']} on {h['host']}, started {h['started']})"
    except (OSError, ValueError, KeyError):
        who = "another process"
    return (f"another lifecycle is running in {path.parent.parent.parent}: {who} holds {LOCK_FILE}. "
            f"Waited {wait_s:g}s (orchestration.lock_wait_s); run again when it has finished, or cancel it.")


@contextlib.contextmanager
def parent_run(root: Path, tracking: TrackingConfig, name: str, params: dict, tags: dict[str, str]) -> Iterator[str]:
    """The lifecycle's MLflow parent run, FINISHED when the block ends, FAILED when it raises."""
    import mlflow

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    run_id = lifecycle_run(tracking, name, commit, params, tags=tags)
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    finally:
        mlflow.MlflowClient(tracking_uri=tracking.uri).set_terminated(run_id, status)


# ---------------------------------------------------------------- tasks


@task(cache_policy=NO_CACHE)
def repro_stage(root: Path, stage: str, single_item: bool, env: dict[str, str], applied_params: str) -> dict:
    """`dvc repro` one stage; DVC skips it when nothing it depends on changed."""
    logger = get_run_logger()
    if (root / "params.yaml").read_text() != applied_params:
        raise StageFailed("params.yaml changed while this lifecycle was running; not running on params it did not set")
    start = time.perf_counter()
    try:
        out = dvc(root, "repro", *(["--single-item"] if single_item else []), stage, env=env,
                  emit=lambda line: logger.info("%s | %s", stage, line))
    except DvcFailed as e:
        if "Unable to acquire lock" in str(e):
            raise StageFailed(f"stage '{stage}': DVC's repository lock in {root} is held by another DVC process "
                              "(a `dvc repro` or `dvc exp run` outside this flow?); wait for it to finish") from None
        raise StageFailed(f"stage '{stage}': {e}") from None
    skipped = (f"Stage '{stage}' didn't change", f"Stage '{stage}' is cached")  # unchanged / restored from run-cache
    return {"stage": stage, "ran": not any(msg in out for msg in skipped),
            "seconds": round(time.perf_counter() - start, 1)}


@task(cache_policy=NO_CACHE, task_run_name="save-experiment")
def save_experiment(root: Path, name: str, stages: list[str], include: list[str], message: str) -> str:
    """`dvc exp save <stages>`: the workspace (params, dvc.lock, metrics) as experiment `name`; only the stages this
    run covered, since another may never have run (no outputs yet)."""
    logger = get_run_logger()
    includes = [a for p in include if (root / p).exists() for a in ("-I", p)]
    dvc(root, "exp", "save", "--name", name, "--message", message, *includes, *stages,
        emit=lambda line: logger.info("exp save | %s", line))
    return name


@task(cache_policy=NO_CACHE, task_run_name="report")
def report(root: Path, stages: dict[str, dict], results: list[dict], tracking: TrackingConfig, parent: str,
           experiment: str, overrides: list[str], ui: str) -> str:
    """This run's stages' metrics files onto the MLflow parent run; a Prefect artifact with the stages, their MLflow
    runs and their report tables (a stage's markdown outputs)."""
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient(tracking_uri=tracking.uri)
    exp_id = client.get_run(parent).info.experiment_id
    now = int(time.time() * 1000)
    ran = [r["stage"] for r in results]
    client.log_batch(parent, metrics=[
        Metric(f"{stage}.{k}", float(v), now, 0) for stage in ran for path in stages[stage]["metrics"]
        if (root / path).exists() for k, v in flatten(json.loads((root / path).read_text())).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)])
    children = client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'",
                                  order_by=["attributes.start_time ASC"])
    stage_runs = {r.data.tags.get("dvc_stage"): r.info.run_id for r in children}
    base = tracking.uri.rstrip("/") if tracking.uri.startswith("http") else ui.rstrip("/")
    link = lambda run_id: f"[{run_id[:8]}]({base}/#/experiments/{exp_id}/runs/{run_id})"  # noqa: E731
    rows = [[i, r["stage"], "ran" if r["ran"] else "cached", r["seconds"],
             link(stage_runs[r["stage"]]) if r["stage"] in stage_runs else "-"] for i, r in enumerate(results, 1)]
    lines = [f"# Lifecycle `{experiment}`", "",
             f"- DVC experiment: `{experiment}` (`dvc exp show`, `dvc exp apply {experiment}`)",
             f"- MLflow parent run: {link(parent)} (experiment `{tracking.experiment}`)",
             f"- overrides: {', '.join(f'`{o}`' for o in overrides) or 'none'}", "",
             markdown_table(["#", "stage", "result", "seconds", "MLflow run"], rows, cell=str),
             *_sections(root, {path: f"{path} ({stage})" for stage in ran for path in stages[stage]["reports"]})]
    markdown = "\n".join(lines) + "\n"
    create_markdown_artifact(markdown, key="lifecycle-report", description=f"lifecycle {experiment}")
    return markdown


def _sections(root: Path, titles: dict[str, str]) -> list[str]:
    """Each report's (path: its title here) first section: its table, everything before its second heading."""
    return [f"\n## {title}\n\n" + "\n".join((root / path).read_text().split("\n## ")[0].splitlines()[1:]).strip()
            for path, title in titles.items() if (root / path).exists()]


# ---------------------------------------------------------------- flows


def _run(targets: list[str], single_item: bool, overrides: dict[str, Any], experiment: str) -> dict:
    logger = get_run_logger()
    root = Path.cwd()
    if not (root / "dvc.yaml").exists():
        raise FileNotFoundError(f"{root}: no dvc.yaml; run the flow from the repository root")
    name = experiment or flow_run.get_name() or f"lifecycle-{int(time.time())}"
    holder = {"flow_run": flow_run.get_name(), "flow_run_id": str(flow_run.get_id()), "pid": os.getpid(),
              "host": socket.gethostname(), "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    with lifecycle_lock(root, orchestration_config(read_params(root / "params.yaml")).lock_wait_s, holder):
        if experiment_exists(root, name):
            raise ValueError(f"DVC experiment '{name}' already exists for this commit; pass another `experiment` name")
        stages = dvc_stages(root)
        todo = plan(stages, targets)
        with overridden_params(root, overrides, logger) as applied:
            params = read_params(root / "params.yaml")
            cfg = orchestration_config(params)
            tracking = build(TrackingConfig, params["tracking"], "tracking")
            tracking = dataclasses.replace(tracking, uri=tracking_uri(tracking.uri))
            tags = {"prefect.flow_run_id": holder["flow_run_id"], "prefect.flow_run_name": str(holder["flow_run"]),
                    "dvc.experiment": name, "overrides": " ".join(set_param_args(overrides)) or "none"}
            with parent_run(root, tracking, name, params, tags) as parent:
                logger.info("lifecycle '%s': %d stage(s) %s; MLflow parent run %s", name, len(todo), todo, parent)
                env = dict(os.environ, LIFECYCLE_ID=name, PYTHONUNBUFFERED="1",  # the stages' MLflow parent;
                           PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))  # python -m
                results = []
                for i, stage in enumerate(todo, 1):
                    logger.info("[%d/%d] %s ...", i, len(todo), stage)
                    try:
                        results.append(repro_stage.with_options(
                            task_run_name=stage, retries=cfg.retries, retry_delay_seconds=cfg.retry_delay_s,
                        )(root, stage, single_item, env, applied))
                    except StageFailed as e:  # the UI shows why, with the stage's own report (e.g. export's gate)
                        reports = _sections(root, {path: path for path in stages[stage]["reports"]})
                        create_markdown_artifact(f"# {stage} failed\n\n```\n{e}\n```\n" + "\n".join(reports),
                                                 key=f"{stage}-failed", description=f"lifecycle {name}: {stage} failed")
                        raise
                    logger.info("[%d/%d] %s %s in %.1fs", i, len(todo), stage,
                                "ran" if results[-1]["ran"] else "cached", results[-1]["seconds"])
                include = [p for s in todo for p in stages[s]["uncached"]]
                save_experiment(root, name, todo, include,
                                f"Prefect flow run {holder['flow_run']}: {set_param_args(overrides)}")
                report(root, stages, results, tracking, parent, name, set_param_args(overrides), cfg.mlflow_ui)
    return {"experiment": name, "mlflow_parent_run": parent, "stages": results}


@flow(name="lifecycle", description="Every stage of dvc.yaml in order, each through `dvc repro`, as one DVC experiment.")
def lifecycle(overrides: dict[str, Any] | None = None, targets: list[str] | None = None, experiment: str = "") -> dict:
    """Run the lifecycle as one DVC experiment.

    overrides: params.yaml values for this run, {"sft.adapter.method": "lora", "sft.train.max_steps": 200}.
    targets: stages to run, with everything upstream of them (empty: all of dvc.yaml).
    experiment: the DVC experiment's name (empty: the flow run's name).
    """
    return _run(list(targets or []), True, dict(overrides or {}), experiment)


@flow(name="stage", description="One stage of dvc.yaml through `dvc repro <stage>` (stale upstream stages too).")
def stage(name: str, overrides: dict[str, Any] | None = None, experiment: str = "") -> dict:
    """Run one stage (DVC brings whatever it depends on up to date in the same task) as one DVC experiment."""
    return _run([name], False, dict(overrides or {}), experiment)


def main(argv: list[str] | None = None) -> dict:
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as STARTUP_TIMEOUT, temporary_settings

    parser = argparse.ArgumentParser(prog="python -m flows.lifecycle", description="Run the lifecycle flow once.")
    parser.add_argument("-S", "--set-param", action="append", default=[], metavar="KEY=VALUE",
                        help="params.yaml override for this run (as `dvc exp run -S`); repeatable")
    parser.add_argument("--targets", nargs="*", default=[], help="stages to run with their upstream (default: all)")
    parser.add_argument("--stage", help="run only this stage (and what it needs) as the `stage` flow")
    parser.add_argument("--name", default="", help="DVC experiment name (default: the flow run's name)")
    args = parser.parse_args(argv)
    bad = [item for item in args.set_param if not item.partition("=")[0] or "=" not in item]
    if bad:
        raise SystemExit(f"-S expects key=value, got {bad[0]!r}")
    overrides = dict(item.split("=", 1) for item in args.set_param)
    # With no PREFECT_API_URL, Prefect starts a temporary server; its first start creates the database,
    # which took over the default 20 s on a busy 2-core machine. An explicit setting wins.
    timeout = {} if "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in os.environ else {STARTUP_TIMEOUT: 120}
    with temporary_settings(updates=timeout):
        if args.stage:
            return stage(args.stage, overrides, args.name)
        return lifecycle(overrides, args.targets, args.name)


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
