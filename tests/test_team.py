"""Team mode: a DVC remote shared between clones, and the lifecycle against real PostgreSQL-backed MLflow and
Prefect servers (posttrain.tools.team).

The tiny lineage the session `lifecycle` fixture built (sample -> sft) is committed into a scratch git+DVC repo
with tests/test_flows.py's seed(). One clone pushes it to a directory remote, a second clone pulls it and
`dvc repro` there trains nothing. Then `python -m posttrain.tools.team`'s services (launched when the module starts, so
they come up while the scratch repo is made and the DVC test runs) run the next stage, reward, as the Prefect
`stage` flow, and the test reads the flow run back from the Prefect server and the lifecycle's MLflow runs (and
the logged model) from the MLflow server.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import make_workdir
from test_flows import DVC, seed, sh

from bench.common import git_dvc_init
from posttrain.tools import team as teammod

TIMES: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def services():
    """The team's services in a fresh state folder, launched before this module's other fixtures (after the
    session's `lifecycle`, which pytest builds first); the test that uses them waits for them.

    The state folder is outside pytest's tmp (a 0700 tree): as root, PostgreSQL runs as the postgres user, which
    must be able to reach it."""
    why = teammod.missing()
    if why:
        yield {"skip": why}
        return
    state = Path(tempfile.mkdtemp(prefix="posttrain-team-"))
    state.chmod(0o755)
    t = teammod.Team(state / "team", ports={"postgres": 0, "mlflow": 0, "prefect": 0}, ui=False)
    start = time.perf_counter()
    try:
        t.start()
        yield {"team": t, "started": start}
    finally:
        begin = time.perf_counter()
        t.down()
        TIMES["down"] = time.perf_counter() - begin
        shutil.rmtree(state, ignore_errors=True)
        print(f"\ntest_team timings (s): {', '.join(f'{k} {v:.1f}' for k, v in TIMES.items())}")


def commit(repo: Path, message: str) -> None:
    sh(["git", "add", "-A"], repo)
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", message], repo)


@pytest.fixture(scope="module")
def repo(lifecycle, tmp_path_factory):
    """A git+DVC repo holding the lineage up to sft, committed, with a directory remote as its default (docs/team.md)."""
    begin = time.perf_counter()
    path = git_dvc_init(make_workdir(tmp_path_factory.mktemp("team-repo")))
    seeded = seed(path, lifecycle["workdir"])
    remote = tmp_path_factory.mktemp("dvc-remote")
    sh([*DVC, "remote", "add", "-d", "shared", str(remote)], path)
    commit(path, "lineage up to sft, shared remote")
    TIMES["repo"] = time.perf_counter() - begin
    return {"path": path, "remote": remote, "seeded": seeded}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_dvc_push_from_one_clone_pull_in_another_trains_nothing(repo, tmp_path):
    begin = time.perf_counter()
    sh([*DVC, "push", "-q"], repo["path"])
    assert any(repo["remote"].rglob("*")), "the remote holds nothing after dvc push"
    second = tmp_path / "second"
    sh(["git", "clone", "-q", str(repo["path"]), str(second)], tmp_path)
    assert not (second / "models/sft").exists()  # only git came with the clone
    sh([*DVC, "pull", "-q", "--with-deps", "sft"], second)  # (plain `dvc pull` once every stage has run)
    weights = "models/sft/model.safetensors"
    assert _sha(second / weights) == _sha(repo["path"] / weights)
    out = sh([*DVC, "repro", "sft"], second)
    assert "Running stage" not in out, out
    for stage in repo["seeded"]:
        assert f"Stage '{stage}' didn't change, skipping" in out, out
    TIMES["push+clone+pull+repro"] = time.perf_counter() - begin


def _prefect(url: str, coro_fn):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def go():
        async with get_client() as client:
            return await coro_fn(client)

    with temporary_settings(updates={PREFECT_API_URL: url}):
        return asyncio.run(go())


def test_lifecycle_runs_against_the_team_servers_and_reads_back(services, repo, monkeypatch):
    if "skip" in services:
        pytest.skip(f"team services unavailable: {services['skip']}")
    t: teammod.Team = services["team"]
    begin = time.perf_counter()
    urls = t.wait(timeout=240)
    TIMES["waited for the services"] = time.perf_counter() - begin  # launched this long before:
    TIMES["(launched before)"] = begin - services["started"]
    assert urls["mlflow"].startswith("http://127.0.0.1:") and urls["prefect"].startswith("http://127.0.0.1:")
    assert {name: s["running"] for name, s in t.status().items()} == {"postgres": True, "mlflow": True, "prefect": True}

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.lifecycle import stage

    begin = time.perf_counter()
    for key, value in t.env().items():  # what `eval "$(python -m posttrain.tools.team env)"` exports
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("LIFECYCLE_ID", raising=False)
    monkeypatch.chdir(repo["path"])
    with temporary_settings(updates={PREFECT_API_URL: urls["prefect"]}):
        state = stage("reward", overrides={"tracking.log_models": True}, experiment="team-reward", return_state=True)
    result = state.result(raise_on_failure=False)
    assert not isinstance(result, BaseException), result
    flow_run_id = state.state_details.flow_run_id
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # the flow's logs reach the server before it stops
    TIMES["reward flow"] = time.perf_counter() - begin
    assert {r["stage"] for r in result["stages"] if r["ran"]} == {"reward"}  # upstream came cached

    # the Prefect server has the flow run and its task
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    run = _prefect(urls["prefect"], lambda c: c.read_flow_run(flow_run_id))
    assert run.state.is_completed() and run.parameters["name"] == "reward"
    tasks = _prefect(urls["prefect"], lambda c: c.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))))
    assert {r.name for r in tasks} >= {"reward", "save-experiment", "report"}

    # the MLflow server has the lifecycle's parent run, the stage's run under it, its metrics and its model
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=urls["mlflow"])
    exp = client.get_experiment_by_name("lifecycle")
    (parent,) = client.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert parent.info.run_id == result["mlflow_parent_run"] and parent.info.status == "FINISHED"
    (child,) = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert child.data.tags["dvc_stage"] == "reward" and child.data.tags["lifecycle"] == "team-reward"
    assert "train_loss" in child.data.metrics and child.data.params["cfg.train.max_steps"] == "6"
    model = {a.path for a in client.list_artifacts(child.info.run_id, "model")}
    assert "model/config.json" in model, model
    assert child.info.artifact_uri.startswith("mlflow-artifacts:")  # through the server, into the team's store
    assert list((t.state / "artifacts").rglob("config.json"))
    print(f"\nread back: Prefect flow run {run.name} ({len(tasks)} task runs); MLflow runs {parent.info.run_id[:8]} "
          f"(parent) and {child.info.run_id[:8]} (reward: {len(child.data.metrics)} metrics, {len(model)} model files)")


def test_cli_env_and_status(services, tmp_path):
    """`env` prints the exports; `status` on a folder with no team says how to start one."""
    if "skip" in services:
        pytest.skip(f"team services unavailable: {services['skip']}")
    t = services["team"]
    env = subprocess.run([sys.executable, "-m", "posttrain.tools.team", "env", "--state", str(t.state)],
                         capture_output=True, text=True, check=True).stdout
    assert f"export MLFLOW_TRACKING_URI={t.env()['MLFLOW_TRACKING_URI']}\n" in env and "PREFECT_API_URL=" in env
    proc = subprocess.run([sys.executable, "-m", "posttrain.tools.team", "status", "--state", str(tmp_path / "none")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "posttrain.tools.team up" in proc.stderr


def test_missing_postgres_is_said_plainly(monkeypatch, tmp_path):
    monkeypatch.setattr(teammod, "pg_bin", lambda: None)
    assert "make install-team" in teammod.missing()
    with pytest.raises(teammod.TeamError, match="make install-team"):
        teammod.Team(tmp_path / "t").up()
    assert not (tmp_path / "t").exists()  # refused before touching anything
