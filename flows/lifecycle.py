"""The lifecycle as a Prefect flow: a task per DVC stage; each flow run is one DVC experiment and one MLflow parent run.

    python -m flows.lifecycle -S sft.adapter.method=lora   # one run now (ephemeral Prefect API unless PREFECT_API_URL is set)
    python -m flows.lifecycle --stage sft                  # one stage (and whatever it needs) as its own flow
    python -m flows.serve                                  # the deployments, with the nightly schedule (README: Orchestration)

DVC stays the one truth for what runs. The flow reads the stages and their order from dvc.yaml and runs each
through `dvc repro`, so a stage whose code, data and params did not change skips in about a second, and
nothing here knows what a stage does. One flow run, from the repository root:

1. takes the repo's lifecycle lock (.dvc/tmp/lifecycle.lock): a second lifecycle waits
   `orchestration.lock_wait_s`, then fails naming the run that holds it;
2. applies the `overrides` to params.yaml with DVC's own `--set-param` code (an unknown key is an error),
   as `dvc exp run -S key=value` does in the workspace;
3. opens the MLflow parent run with LIFECYCLE_ID = the experiment name, tagged with the Prefect flow run;
   every stage's run nests under it (posttrain.tracking);
4. one task per stage, `dvc repro --single-item <stage>` in DAG order, with `orchestration.retries`; the
   stage's output streams into the task's logs;
5. `dvc exp save`: the workspace becomes a DVC experiment (`dvc exp show`, `dvc metrics diff`, `dvc exp apply`);
6. logs each stage's metrics file onto the parent run and publishes a Prefect artifact with the evaluate
   table and the MLflow runs;
7. puts params.yaml back as it found it: the experiment keeps the overrides (`dvc exp apply <name>` brings
   them back), so a scheduled run after a UI run with overrides trains the committed configuration again.

Why this split rather than `dvc exp run`: one `dvc exp run` per stage would commit an experiment per stage,
and `dvc exp run --temp` runs the whole pipeline in one process (no per-stage tasks, retries or logs).
`dvc repro` per stage plus one `dvc exp save` is what `dvc exp run` does in the workspace, cut at stage boundaries.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from posttrain.config import TrackingConfig, build, read_params
from posttrain.tracking import flatten, lifecycle_run, tracking_uri

LOCK_FILE = Path(".dvc/tmp/lifecycle.lock")
PROGRESS_EVERY_S = 5.0  # a progress bar redraws itself many times a second: log one state every few seconds
TAIL_LINES = 25


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


# ---------------------------------------------------------------- DVC


def dvc_stages(root: Path) -> dict[str, dict]:
    """Every stage of dvc.yaml in DAG order (dvc.yaml order breaks ties), with the outputs the flow reports."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        stages = list(repo.index.stages)
        position = {s.name: i for i, s in enumerate(stages)}
        upstream_first = repo.index.graph.reverse(copy=True)  # DVC's edges point from a stage to what it needs
        order = nx.lexicographical_topological_sort(upstream_first, key=lambda s: position[s.name])
        return {
            s.name: {
                "upstream": sorted(d.name for d in nx.descendants(repo.index.graph, s)),
                "metrics": [o.def_path for o in s.outs if o.metric],
                "uncached": [o.def_path for o in s.outs if not o.use_cache],
                "reports": [o.def_path for o in s.outs if o.def_path.endswith(".md")],
            }
            for s in order
        }


def plan(stages: dict[str, dict], targets: list[str]) -> list[str]:
    """The stages to run for `targets` (all when empty): the targets and everything upstream, in DAG order."""
    unknown = [t for t in targets if t not in stages]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; dvc.yaml has {list(stages)}")
    if not targets:
        return list(stages)
    wanted = set(targets).union(*(stages[t]["upstream"] for t in targets))
    return [s for s in stages if s in wanted]


def set_param_args(overrides: dict[str, Any]) -> list[str]:
    """{'sft.adapter.method': 'lora'} -> ['sft.adapter.method=lora'] (the `dvc exp run -S` syntax)."""
    def value(v: Any) -> str:
        if isinstance(v, str):
            return v
        return json.dumps(v)  # numbers, true/false/null, [lists] and {maps} in the override grammar

    return [f"{k}={value(v)}" for k, v in overrides.items()]


def apply_overrides(root: Path, overrides: dict[str, Any]) -> None:
    """Write the overrides into params.yaml exactly as `dvc exp run -S` does (comments kept, unknown keys refused)."""
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides

    try:
        dvc_apply_overrides(str(root / "params.yaml"), set_param_args(overrides))
    except Exception as e:  # DVC wraps the grammar's error; its cause names the key
        cause = f": {e.__cause__}" if e.__cause__ else ""
        raise ValueError(f"overrides {set_param_args(overrides)} rejected: {e}{cause}") from e


def experiment_exists(root: Path, name: str) -> bool:
    from dvc.repo import Repo
    from dvc.repo.experiments.refs import ExpRefInfo

    with Repo(str(root)) as repo:
        return bool(repo.scm.get_ref(str(ExpRefInfo(baseline_sha=repo.scm.get_rev(), name=name))))


def dvc_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def subprocess_env(lifecycle: str) -> dict[str, str]:
    """The stages see LIFECYCLE_ID (their MLflow parent) and this interpreter's bin first on PATH (`python -m ...`)."""
    env = dict(os.environ, LIFECYCLE_ID=lifecycle, PYTHONUNBUFFERED="1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def stream(cmd: list[str], cwd: Path, env: dict[str, str], emit) -> tuple[int, list[str]]:
    """Run `cmd`, passing each output line to `emit` (progress-bar redraws at most every few seconds)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    buf, last_progress = b"", 0.0
    while chunk := proc.stdout.read1(1 << 16):
        buf += chunk
        while m := re.search(rb"[\r\n]", buf):
            line, sep, buf = buf[: m.start()], buf[m.start(): m.end()], buf[m.end():]
            text = line.decode(errors="replace").rstrip()
            if not text:
                continue
            tail.append(text)
            if sep == b"\r":
                if time.monotonic() - last_progress < PROGRESS_EVERY_S:
                    continue
                last_progress = time.monotonic()
            emit(text)
    if text := buf.decode(errors="replace").strip():
        tail.append(text)
        emit(text)
    return proc.wait(), list(tail)


# ---------------------------------------------------------------- concurrency


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


# ---------------------------------------------------------------- tasks


@task(cache_policy=NO_CACHE)
def run_stage(root: Path, stage: str, single_item: bool, env: dict[str, str], applied_params: str) -> dict:
    """`dvc repro` one stage; DVC skips it when nothing it depends on changed."""
    logger = get_run_logger()
    if (root / "params.yaml").read_text() != applied_params:
        raise StageFailed("params.yaml changed while this lifecycle was running; not running on params it did not set")
    cmd = dvc_command("repro", *(["--single-item"] if single_item else []), stage)
    start = time.perf_counter()
    rc, tail = stream(cmd, root, env, lambda line: logger.info("%s | %s", stage, line))
    seconds = time.perf_counter() - start
    if rc != 0:
        if any("Unable to acquire lock" in line for line in tail):
            raise StageFailed(f"stage '{stage}': DVC's repository lock in {root} is held by another DVC process "
                              "(a `dvc repro` or `dvc exp run` outside this flow?); wait for it to finish")
        raise StageFailed(f"stage '{stage}' failed (dvc repro exit {rc}); last output:\n" + "\n".join(tail))
    skipped = (f"Stage '{stage}' didn't change", f"Stage '{stage}' is cached")  # unchanged / restored from run-cache
    ran = not any(msg in line for line in tail for msg in skipped)
    return {"stage": stage, "ran": ran, "seconds": round(seconds, 1)}


@task(cache_policy=NO_CACHE, task_run_name="save-experiment")
def save_experiment(root: Path, name: str, stages: list[str], include: list[str], message: str) -> str:
    """`dvc exp save <stages>`: record the workspace (params, dvc.lock, metrics) as experiment `name`.

    Only the stages this run covered are committed: another stage may never have run (no outputs yet).
    """
    logger = get_run_logger()
    present = [p for p in include if (root / p).exists()]
    args = ["exp", "save", "--name", name, "--message", message, *[a for p in present for a in ("-I", p)], *stages]
    rc, tail = stream(dvc_command(*args), root, dict(os.environ), lambda line: logger.info("exp save | %s", line))
    if rc != 0:
        raise StageFailed(f"dvc exp save failed (exit {rc}):\n" + "\n".join(tail))
    return name


@task(cache_policy=NO_CACHE, task_run_name="report")
def report(root: Path, stages: dict[str, dict], results: list[dict], tracking: TrackingConfig, parent: str,
           experiment: str, overrides: list[str], ui: str) -> str:
    """This run's stages' metrics files onto the MLflow parent run; a Prefect artifact with their report
    tables (a stage's markdown outputs) and the MLflow runs."""
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient(tracking_uri=tracking.uri)
    exp_id = client.get_run(parent).info.experiment_id
    now = int(time.time() * 1000)
    metrics = [Metric(f"{stage}.{k}", float(v), now, 0)
               for stage in (r["stage"] for r in results) for path in stages[stage]["metrics"] if (root / path).exists()
               for k, v in flatten(json.loads((root / path).read_text())).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)]
    client.log_batch(parent, metrics=metrics)
    children = client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'",
                                  order_by=["attributes.start_time ASC"])
    stage_runs = {r.data.tags.get("dvc_stage"): r.info.run_id for r in children}
    base = tracking.uri.rstrip("/") if tracking.uri.startswith("http") else ui.rstrip("/")
    link = lambda run_id: f"[{run_id[:8]}]({base}/#/experiments/{exp_id}/runs/{run_id})"  # noqa: E731

    lines = [f"# Lifecycle `{experiment}`", "",
             f"- DVC experiment: `{experiment}` (`dvc exp show`, `dvc exp apply {experiment}`)",
             f"- MLflow parent run: {link(parent)} (experiment `{tracking.experiment}`)",
             f"- overrides: {', '.join(f'`{o}`' for o in overrides) or 'none'}", "",
             "| # | stage | result | seconds | MLflow run |", "|---|---|---|---|---|"]
    for i, r in enumerate(results, 1):
        run = link(stage_runs[r["stage"]]) if r["stage"] in stage_runs else "-"
        lines.append(f"| {i} | {r['stage']} | {'ran' if r['ran'] else 'cached'} | {r['seconds']} | {run} |")
    for stage in (r["stage"] for r in results):
        for path in stages[stage]["reports"]:
            if (root / path).exists():
                lines += ["", f"## {path} ({stage})", "", _first_section(root / path)]
    markdown = "\n".join(lines) + "\n"
    create_markdown_artifact(markdown, key="lifecycle-report", description=f"lifecycle {experiment}")
    return markdown


def _first_section(path: Path) -> str:
    """A report's first section without its title: its table, everything before its second heading."""
    body = path.read_text().split("\n## ")[0]
    return "\n".join(body.splitlines()[1:]).strip()  # drop the report's own '# ' title


# ---------------------------------------------------------------- flows


def _run(targets: list[str], single_item: bool, overrides: dict[str, Any], experiment: str) -> dict:
    logger = get_run_logger()
    root = Path.cwd()
    if not (root / "dvc.yaml").exists():
        raise FileNotFoundError(f"{root}: no dvc.yaml; run the flow from the repository root")
    name = experiment or flow_run.get_name() or f"lifecycle-{int(time.time())}"
    holder = {"flow_run": flow_run.get_name(), "flow_run_id": str(flow_run.get_id()), "pid": os.getpid(),
              "host": socket.gethostname(), "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    wait_s = orchestration_config(read_params(root / "params.yaml")).lock_wait_s
    with lifecycle_lock(root, wait_s, holder):
        if experiment_exists(root, name):
            raise ValueError(f"DVC experiment '{name}' already exists for this commit; pass another `experiment` name")
        stages = dvc_stages(root)
        todo = plan(stages, targets)
        original = (root / "params.yaml").read_text()
        if overrides:
            apply_overrides(root, overrides)
        applied = (root / "params.yaml").read_text()
        parent = None
        try:
            params = read_params(root / "params.yaml")
            cfg = orchestration_config(params)
            tracking = build(TrackingConfig, params["tracking"], "tracking")
            tracking = dataclasses.replace(tracking, uri=tracking_uri(tracking.uri))
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
            parent = lifecycle_run(tracking, name, commit, params, tags={
                "prefect.flow_run_id": holder["flow_run_id"], "prefect.flow_run_name": str(holder["flow_run"]),
                "dvc.experiment": name, "overrides": " ".join(set_param_args(overrides)) or "none"})
            logger.info("lifecycle '%s': %d stage(s) %s; MLflow parent run %s", name, len(todo), todo, parent)
            env = subprocess_env(name)
            results = []
            for i, stage in enumerate(todo, 1):
                logger.info("[%d/%d] %s ...", i, len(todo), stage)
                try:
                    result = run_stage.with_options(
                        task_run_name=stage, retries=cfg.retries, retry_delay_seconds=cfg.retry_delay_s,
                    )(root, stage, single_item, env, applied)
                except StageFailed as e:  # the UI shows why, with the stage's own report (e.g. export's gate)
                    reports = ["\n".join(["", f"## {p}", "", _first_section(root / p)])
                               for p in stages[stage]["reports"] if (root / p).exists()]
                    create_markdown_artifact(f"# {stage} failed\n\n```\n{e}\n```\n" + "\n".join(reports),
                                             key=f"{stage}-failed", description=f"lifecycle {name}: {stage} failed")
                    raise
                logger.info("[%d/%d] %s %s in %.1fs", i, len(todo), stage, "ran" if result["ran"] else "cached",
                            result["seconds"])
                results.append(result)
            include = [p for s in todo for p in stages[s]["uncached"]]
            save_experiment(root, name, todo, include, f"Prefect flow run {holder['flow_run']}: {set_param_args(overrides)}")
            report(root, stages, results, tracking, parent, name, set_param_args(overrides), cfg.mlflow_ui)
            _terminate(tracking, parent, "FINISHED")
            return {"experiment": name, "mlflow_parent_run": parent, "stages": results}
        except BaseException:
            if parent:
                _terminate(tracking, parent, "FAILED")
            raise
        finally:
            if applied != original and (root / "params.yaml").read_text() == applied:
                (root / "params.yaml").write_text(original)
                logger.info("params.yaml restored; `dvc exp apply %s` brings this run's params and outputs back", name)


def _terminate(tracking: TrackingConfig, run_id: str, status: str) -> None:
    import mlflow

    mlflow.MlflowClient(tracking_uri=tracking.uri).set_terminated(run_id, status)


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


def _parse_set(values: list[str]) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"-S expects key=value, got {item!r}")
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m flows.lifecycle", description="Run the lifecycle flow once.")
    parser.add_argument("-S", "--set-param", action="append", default=[], metavar="KEY=VALUE",
                        help="params.yaml override for this run (as `dvc exp run -S`); repeatable")
    parser.add_argument("--targets", nargs="*", default=[], help="stages to run with their upstream (default: all)")
    parser.add_argument("--stage", help="run only this stage (and what it needs) as the `stage` flow")
    parser.add_argument("--name", default="", help="DVC experiment name (default: the flow run's name)")
    args = parser.parse_args(argv)
    overrides = _parse_set(args.set_param)
    from prefect.settings import (
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as STARTUP_TIMEOUT,
        temporary_settings,
    )

    # With no PREFECT_API_URL, Prefect starts a temporary server; its first start creates the database,
    # which took over the default 20 s on a busy 2-core machine. An explicit setting wins.
    timeout = {} if "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in os.environ else {STARTUP_TIMEOUT: 120}
    with temporary_settings(updates=timeout):
        if args.stage:
            return stage(args.stage, overrides, args.name)
        return lifecycle(overrides, args.targets, args.name)


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
