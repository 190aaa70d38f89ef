"""The Prefect lifecycle flow against a real local Prefect API (prefect_test_harness), DVC and MLflow.

One run of the tiny lifecycle up to sft in a temporary git+DVC copy of the repo, with an sft override: the
stages the session `lifecycle` fixture already built are committed into DVC first, so the unchanged ones
skip as cached and sft, whose params changed, runs for real. (The whole lifecycle through evaluate takes
minutes here; the report's table from a stage's markdown output is checked on the toy pipeline.) Retries,
the lifecycle lock and DVC's lock are checked on a toy dvc.yaml of one-line Python stages, which costs
seconds. The deployments are registered and read back with their schedule.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import make_workdir

from bench.common import git_dvc_init

DVC = [sys.executable, "-m", "dvc"]
OVERRIDE = {"sft.train.max_steps": 4}  # the tiny settings have 6


def sh(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    with prefect_test_harness(server_startup_timeout=120):
        yield


def prefect(coro_fn):
    """Run `coro_fn(client)` against the harness's API."""
    from prefect import get_client

    async def go():
        async with get_client() as client:
            return await coro_fn(client)

    return asyncio.run(go())


def task_runs(flow_run_id) -> dict[str, object]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = prefect(lambda c: c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))))
    return {r.name: r for r in runs}


def flow_logs(flow_run_id) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # the log worker sends in batches; wait for what is queued
    logs = prefect(lambda c: c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))))
    return [log.message for log in logs]


def run_flow(fn, *args, **kwargs):
    """Call a flow; return (flow run id, result or the exception it failed with)."""
    state = fn(*args, **kwargs, return_state=True)
    return state.state_details.flow_run_id, state.result(raise_on_failure=False)


# ---------------------------------------------------------------- the tiny lifecycle, for real


@pytest.fixture(scope="module")
def flow_run(prefect_api, lifecycle, tmp_path_factory):
    from flows.lifecycle import dvc_stages, lifecycle as lifecycle_flow

    repo = git_dvc_init(make_workdir(tmp_path_factory.mktemp("flowrepo")))
    stages = dvc_stages(repo)
    seeded = seed(repo, lifecycle["workdir"])
    original_params = (repo / "params.yaml").read_text()

    uri = f"sqlite:///{repo}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("LIFECYCLE_ID", raising=False)
        mp.chdir(repo)
        flow_run_id, result = run_flow(lifecycle_flow, overrides=OVERRIDE, targets=["sft"])
    return {"repo": repo, "id": flow_run_id, "result": result, "seeded": seeded, "stages": stages,
            "original_params": original_params, "uri": uri}


def seed(repo: Path, built: Path) -> list[str]:
    """Copy the outputs of the stages `built` holds into `repo` and record them as those stages' results."""
    from flows.lifecycle import dvc_stages

    outs = {stage: info["outs"] for stage, info in dvc_stages(repo).items()}
    stages = [s for s, paths in outs.items() if paths and all((built / p).exists() for p in paths)]
    for stage in stages:
        for out in outs[stage]:
            (repo / out).parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if (built / out).is_dir() else shutil.copy)(built / out, repo / out)
    sh([*DVC, "commit", "-f", "-q", *stages], repo)
    return stages


def test_flow_walks_dvc_stages_in_order_changed_one_runs_cached_ones_skip(flow_run):
    result = flow_run["result"]
    assert not isinstance(result, BaseException), result
    ran = [r["stage"] for r in result["stages"]]
    assert ran == [s for s in flow_run["stages"] if s in ran]  # DAG order, read from dvc.yaml
    assert set(ran) == {"sft", *flow_run["stages"]["sft"]["upstream"]}  # the target and what it needs, no more
    assert {"sample", "prepare", "base", "cpt", "sft"} <= set(flow_run["seeded"])
    for r in result["stages"]:
        if r["stage"] == "sft":
            assert r["ran"], r  # its params changed
        else:
            assert not r["ran"] and r["seconds"] < 15, r  # DVC skips an unchanged stage in seconds


def test_each_stage_is_a_prefect_task_with_its_logs(flow_run):
    runs = task_runs(flow_run["id"])
    for stage in (r["stage"] for r in flow_run["result"]["stages"]):
        assert runs[stage].state.is_completed(), stage
    logs = flow_logs(flow_run["id"])
    assert "sft | [train] rank 0 of 1: 4 steps" in "\n".join(logs)  # the stage's own output, streamed
    assert any(m.startswith("[1/") and "cached" in m for m in logs)  # stage-by-stage progress


def _artifact(flow_run_id) -> str:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    arts = prefect(lambda c: c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["lifecycle-report"]))))
    (art,) = [a for a in arts if a.flow_run_id == flow_run_id]
    return art.data


def test_artifact_links_the_mlflow_runs(flow_run):
    data = _artifact(flow_run["id"])
    parent = flow_run["result"]["mlflow_parent_run"]
    assert f"/runs/{parent}" in data and "sft.train.max_steps=4" in data
    assert re.search(r"^\| \d+ \| cpt \| cached \| [\d.]+ \| - \|$", data, re.M)
    assert re.search(r"^\| \d+ \| sft \| ran \| [\d.]+ \| \[\w{8}\]\(http.*/runs/\w+\) \|$", data, re.M)


def test_run_is_a_dvc_experiment_and_params_yaml_is_restored(flow_run):
    import dvc.api

    repo, name = flow_run["repo"], flow_run["result"]["experiment"]
    assert dvc.api.params_show(repo=str(repo), rev=name)["sft"]["train"]["max_steps"] == 4
    assert json.loads(sh(["git", "show", f"{_exp_ref(repo, name)}:metrics/sft.json"], repo))["train_loss"] > 0
    assert (repo / "params.yaml").read_text() == flow_run["original_params"]


def _exp_ref(repo: Path, name: str) -> str:
    refs = sh(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo).split()
    (ref,) = [r for r in refs if r.endswith("/" + name)]
    return ref


def test_one_mlflow_parent_per_flow_run_with_stage_runs_under_it(flow_run):
    import mlflow

    client = mlflow.MlflowClient(flow_run["uri"])
    exp = client.get_experiment_by_name("lifecycle")
    (parent,) = client.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run['id']}'")
    assert parent.info.run_id == flow_run["result"]["mlflow_parent_run"] and parent.info.status == "FINISHED"
    assert parent.data.tags["kind"] == "lifecycle" and parent.data.tags["dvc.experiment"] == flow_run["result"]["experiment"]
    assert parent.data.params["sft.train.max_steps"] == "4"  # the whole params.yaml of this run
    assert "sft.train_loss" in parent.data.metrics and "cpt.perplexity_after" in parent.data.metrics  # every stage's file
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert [c.data.tags["dvc_stage"] for c in children] == ["sft"]  # the stage that ran; cached ones made no run
    assert children[0].data.tags["lifecycle"] == flow_run["result"]["experiment"]


def test_compare_reads_the_lifecycle_back(flow_run, monkeypatch):
    from posttrain.evaluation.compare import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", flow_run["uri"])
    text = main(["--last", "3", "--params", str(flow_run["repo"] / "params.yaml"), "--metrics", "sft.*loss"])
    assert flow_run["result"]["experiment"] in text and re.search(r"^\| sft\.train_loss +\| [\d.]+ +\|$", text, re.M)


# ---------------------------------------------------------------- retries and locks, on a toy pipeline

TOY_DVC = {"stages": {
    "make": {"cmd": "python -c \"import yaml; open('a.txt', 'w').write(str(yaml.safe_load(open('params.yaml'))['toy']['n']))\"",
             "params": ["toy"], "outs": ["a.txt"]},
    "flaky": {"cmd": "python flaky.py", "deps": ["a.txt", "flaky.py"],
              "outs": ["reports/toy.md"], "metrics": [{"metrics/flaky.json": {"cache": False}}]},
}}
FLAKY = '''import json, os, pathlib
tries = pathlib.Path(".dvc/tmp/tries"); tries.parent.mkdir(exist_ok=True); n = int(tries.read_text()) + 1 if tries.exists() else 1; tries.write_text(str(n))
print(f"attempt {n}", flush=True)
if n < 2: raise SystemExit("flaky: failing the first attempt")
os.makedirs("reports", exist_ok=True); os.makedirs("metrics", exist_ok=True)
pathlib.Path("reports/toy.md").write_text("# Toy\\n\\n| model | score |\\n|---|---|\\n| toy | 1 |\\n\\n## Details\\nnot in the artifact\\n")
json.dump({"score": 1.0, "attempts": n}, open("metrics/flaky.json", "w"))
'''


@pytest.fixture(scope="module")
def toy_mlflow(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('toy-mlflow')}/mlflow.db"  # one store: its set-up costs seconds


@pytest.fixture
def toy(tmp_path, monkeypatch, toy_mlflow):
    params = {"toy": {"n": 1}, "tracking": {"uri": "", "experiment": "lifecycle", "log_models": False},
              "orchestration": {"retries": 1, "retry_delay_s": 0, "lock_wait_s": 0, "mlflow_ui": "http://127.0.0.1:5000",
                                "schedule": {"cron": "0 3 * * *", "timezone": "UTC"}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(TOY_DVC, sort_keys=False))
    (tmp_path / "flaky.py").write_text(FLAKY)
    git_dvc_init(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", toy_mlflow)
    return tmp_path


def test_failed_stage_is_retried_and_run_saved(prefect_api, toy):
    from flows.lifecycle import lifecycle

    run_id, result = run_flow(lifecycle, overrides={"toy.n": 2})
    assert not isinstance(result, BaseException), result
    assert task_runs(run_id)["flaky"].run_count == 2  # failed once, retried (orchestration.retries: 1)
    assert (toy / "a.txt").read_text() == "2"  # ran with the override
    assert "n: 1" in (toy / "params.yaml").read_text()  # ... which the workspace does not keep
    assert "flaky | flaky: failing the first attempt" in flow_logs(run_id)
    report = _artifact(run_id)
    assert "| toy | 1 |" in report and "not in the artifact" not in report  # a report's first table only


def test_second_lifecycle_fails_at_once_naming_the_running_one(prefect_api, toy):
    from flows.lifecycle import LifecycleBusy, lifecycle, lifecycle_lock

    before = (toy / "params.yaml").read_text()
    holder = {"flow_run": "first-run", "flow_run_id": "x", "pid": os.getpid(), "host": "here", "started": "now"}
    with lifecycle_lock(toy, 0, holder):
        start = time.perf_counter()
        _, error = run_flow(lifecycle, overrides={"toy.n": 3})
        assert time.perf_counter() - start < 30
    assert isinstance(error, LifecycleBusy)
    assert "another lifecycle is running" in str(error) and "first-run" in str(error)
    assert (toy / "params.yaml").read_text() == before and not (toy / "a.txt").exists()
    assert sh(["git", "for-each-ref", "refs/exps"], toy).strip() == ""  # no experiment either


def test_second_lifecycle_waits_for_the_lock_when_told_to(prefect_api, toy):
    from flows.lifecycle import lifecycle, lifecycle_lock

    params = yaml.safe_load((toy / "params.yaml").read_text())
    params["orchestration"]["lock_wait_s"] = 60
    (toy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    released = threading.Event()

    def hold():
        with lifecycle_lock(toy, 0, {"flow_run": "first-run", "pid": 0, "host": "-", "started": "-"}):
            time.sleep(3)
        released.set()

    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(0.3)
    _, result = run_flow(lifecycle)
    holder.join()
    assert released.is_set() and not isinstance(result, BaseException), result


def test_dvc_lock_held_elsewhere_is_reported_clearly(prefect_api, toy):
    from dvc.lock import make_lock

    from flows.lifecycle import StageFailed, lifecycle

    lock = make_lock(str(toy / ".dvc/tmp/lock"), tmp_dir=str(toy / ".dvc/tmp"))
    lock.lock()  # what a `dvc repro` outside the flow holds while it runs
    try:
        _, error = run_flow(lifecycle, overrides={"orchestration.retries": 0})
    finally:
        lock.unlock()
    assert isinstance(error, StageFailed) and "DVC's repository lock" in str(error)


def test_unknown_override_is_refused_before_anything_runs(prefect_api, toy):
    from flows.lifecycle import lifecycle

    before = (toy / "params.yaml").read_text()
    _, error = run_flow(lifecycle, overrides={"toy.nn": 2})
    assert isinstance(error, ValueError) and "toy.nn" in str(error)
    assert (toy / "params.yaml").read_text() == before and not (toy / "a.txt").exists()


def test_single_stage_flow_runs_one_task(prefect_api, toy):
    from flows.lifecycle import stage

    run_id, result = run_flow(stage, "make")
    assert not isinstance(result, BaseException), result
    assert set(task_runs(run_id)) == {"make", "save-experiment", "report"} and (toy / "a.txt").read_text() == "1"


# ---------------------------------------------------------------- deployments


def test_deployments_are_registered_with_the_schedule(prefect_api, monkeypatch):
    from flows.serve import deployments

    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    params = yaml.safe_load(Path("params.yaml").read_text())["orchestration"]["schedule"]
    ids = [d.apply() for d in deployments()]
    found = {d.name: d for d in (prefect(lambda c, i=i: c.read_deployment(i)) for i in ids)}
    nightly = found["nightly"]
    (schedule,) = nightly.schedules
    assert schedule.active and schedule.schedule.cron == params["cron"] and schedule.schedule.timezone == params["timezone"]
    assert nightly.entrypoint.endswith("flows/lifecycle.py:lifecycle")
    assert nightly.global_concurrency_limit.limit == 1
    assert found["on-demand"].entrypoint.endswith("flows/lifecycle.py:stage") and not found["on-demand"].schedules
