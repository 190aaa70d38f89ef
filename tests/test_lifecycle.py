"""End to end: `dvc repro` of the whole lifecycle in a temporary git+DVC copy of the repo (tiny settings).

Checks the metrics move the expected way, every stage logged to MLflow under one lifecycle, a second
`dvc repro` trains nothing, an arena vote makes only the preference stages stale, and README's commands (an align
value changed through `dvc exp run`) re-run align and what follows, nothing upstream.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_workdir, tiny_params

from bench.common import git_dvc_init

# Enough steps for the tiny model to move its metrics, still seconds per stage.
E2E = {
    "base": {"tiny": {"hidden_size": 64, "num_heads": 4, "num_kv_heads": 4, "intermediate_size": 128}},
    # precision auto: the default's path (bf16 autocast on a CPU that has it natively)
    "cpt": {"train": {"max_steps": 40, "learning_rate": 3.0e-3, "save_steps": 20, "precision": "auto"}},
    "sft": {"train": {"max_steps": 40, "learning_rate": 3.0e-3, "save_steps": 20, "precision": "auto"}},
    # align on the preference files' pairs: a model this small mostly answers nothing, and DPO on its own samples
    # teaches it to say nothing at all, which leaves distill no teacher answers to learn from
    "align": {"pairs": "data"},
    # distill's teacher answers as many prompts as training uses: enough that a tiny teacher answers some
    # the student as wide as this base: the default student.init (teacher) starts it from the teacher's layers
    "distill": {"train": {"max_steps": 16},
                "student": {"tiny": {"hidden_size": 64, "num_heads": 4, "num_kv_heads": 4}}},
}
UPSTREAM_OF_SFT = {"sample", "prepare", "base", "cpt"}
DVC = str(Path(sys.executable).parent / "dvc")


def sh(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w-]+)'", output))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    path = git_dvc_init(make_workdir(tmp_path_factory.mktemp("repo"), tiny_params(**E2E)))
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{path}/mlflow.db",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("LIFECYCLE_ID", None)
    first = sh([DVC, "repro"], path, env)
    return {"path": path, "env": env, "first": first.stdout}


def test_repro_runs_every_stage_and_metrics_move(repo):
    path = repo["path"]
    stages = set(yaml.safe_load((path / "dvc.yaml").read_text())["stages"])
    assert ran_stages(repo["first"]) == stages
    table = json.loads((path / "metrics/evaluate.json").read_text())
    assert table["cpt"]["perplexity"] < 0.5 * table["base"]["perplexity"]
    sft = json.loads((path / "metrics/sft.json").read_text())
    assert sft["eval_loss"] < sft["eval_loss_before"]
    assert (path / "plots/evaluate.csv").read_text().startswith("model,")
    assert "## Sample generations" in (path / "reports/evaluate.md").read_text()


def test_every_stage_logged_to_mlflow_under_one_lifecycle(repo):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo['path']}/mlflow.db")
    exp = client.get_experiment_by_name("lifecycle")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "lifecycle"]
    assert len(parents) == 1
    children = {r.data.tags["dvc_stage"]: r for r in runs if r.data.tags.get("kind") == "stage"}
    assert set(children) == set(yaml.safe_load((repo["path"] / "dvc.yaml").read_text())["stages"])
    for stage, run in children.items():
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["git_commit"] != "unknown"
        assert any(k.startswith("cfg.") for k in run.data.params), stage
    assert children["sft"].data.params["cfg.train.max_steps"] == "40"
    assert "train_loss" in children["sft"].data.metrics
    assert len(client.get_metric_history(children["sft"].info.run_id, "loss")) > 1  # a training curve
    assert children["sft"].data.tags["input.train.sha256"]
    assert "cpt.perplexity" in children["evaluate"].data.metrics


def test_second_repro_is_a_no_op(repo):
    path = repo["path"]
    before = (path / "models/sft/model.safetensors").stat().st_mtime_ns
    out = sh([DVC, "repro"], path, repo["env"]).stdout
    assert ran_stages(out) == set()
    assert (path / "models/sft/model.safetensors").stat().st_mtime_ns == before


def test_an_arena_vote_makes_only_the_preference_stages_stale(repo):
    """A vote appended as the arena writes it: prepare takes it in, and of the training stages only the ones
    that read preference pairs are then stale (cpt and sft read none). README's `dvc exp run` (the next test)
    runs them."""
    from posttrain.serving.arena import VoteLog

    path = repo["path"]
    log = VoteLog(path / "data/feedback/arena.jsonl", path / "data/feedback/arena_ties.jsonl")
    log.record({"prompt": "Which colour is the sky on a clear day?", "model_a": "models/sft",
                "model_b": "models/align", "reply_a": "Blue.", "reply_b": "Green, mostly."}, "A")
    status = sh([DVC, "status"], path, repo["env"]).stdout
    assert "prepare:" in status and not re.search(r"^(base|cpt|sft|rft):", status, re.M)
    assert ran_stages(sh([DVC, "repro", "prepare"], path, repo["env"]).stdout) == {"prepare"}
    prepared = json.loads((path / "metrics/prepare.json").read_text())
    assert prepared["sources"]["data/feedback/arena.jsonl"]["rows"] == 1
    stale = set(re.findall(r"^(\w+):", sh([DVC, "status"], path, repo["env"]).stdout, re.M))
    assert stale & {"reward", "judge"} and "align" in stale  # the vote is a train pair of reward or judge
    assert not stale & {"sample", "prepare", "base", "cpt", "sft", "rft"}


def test_readmes_commands_after_make_run_work_verbatim_in_a_fresh_shell(repo):
    """README's block for after `make run`, run as a new user would: a new shell whose PATH has no venv on it,
    from the repo root where `make run` made .venv (here a link to this interpreter's venv). Last in this
    module: its `dvc exp run` re-runs align and what follows in the workspace."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", readme, re.S) if b.startswith("source .venv/bin/activate"))
    assert "dvc exp run" in block
    path = repo["path"]
    (path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    fresh = {"HOME": os.environ["HOME"], "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    proc = subprocess.run(["bash", "-e", "-c", block], cwd=path, env=fresh, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ran = ran_stages(proc.stdout + proc.stderr)
    assert {"align", "distill", "evaluate", "export"} <= ran and not ran & {*UPSTREAM_OF_SFT, "sft", "rft"}
    assert yaml.safe_load((path / "params.yaml").read_text())["align"]["beta"] == 0.1
