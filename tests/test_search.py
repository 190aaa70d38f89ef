"""posttrain.tools.search on the tiny lineage in a scratch git+DVC repo: each trial a DVC experiment with its MLflow
run, a failing trial recorded (FAIL) without stopping the search, a killed search resumed from its Optuna storage, the
Pareto front written, and --apply writing the chosen setup into params.yaml."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from conftest import make_workdir, tiny_params
from test_flows import DVC, git_dvc_init, sh

from posttrain.tools import search as S

SEEDED = ("sample", "prepare", "base", "cpt")


@pytest.fixture
def repo(lifecycle, tmp_path, monkeypatch):
    params = tiny_params(sft={"train": {"max_steps": 2, "save_steps": 100}})
    repo = git_dvc_init(make_workdir(tmp_path / "repo", params))
    built = lifecycle["workdir"]
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    for stage in SEEDED:
        metrics = [next(iter(m)) if isinstance(m, dict) else m for m in spec[stage].get("metrics", [])]
        for out in [*spec[stage].get("outs", []), *metrics]:
            (repo / out).parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if (built / out).is_dir() else shutil.copy)(built / out, repo / out)
    sh([*DVC, "commit", "-f", "-q", *SEEDED], repo)  # what the fixture built: these stages' cached results
    sh(["git", "add", "-A"], repo)
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "lineage"], repo)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo}/mlflow.db")
    monkeypatch.setattr(S, "TARGETS", {**S.TARGETS, "missing": ["no_such_proj"]})  # peft stops: no such module
    return repo


SPACE = {"methods": ["lora", "bottleneck"], "ranks": [4], "reductions": [8], "targets": ["attn", "missing"],
         "lr": [1e-3, 3e-3]}
FAILS = {"method": "lora", "rank": 4, "targets": "missing", "lr": 1e-3}
WORKS = {"method": "bottleneck", "reduction": 8, "placement_targets": "mlp", "lr": 3e-3}


def test_search_records_failures_resumes_and_applies(repo, capsys, monkeypatch):
    import optuna

    study = S.search(repo, "sft", trials=1, space=SPACE, seed=0, enqueue=[FAILS])
    assert [t.state.name for t in study.trials] == ["FAIL"]  # recorded; the search ends at its budget, not by it
    assert "no_such_proj" in study.trials[0].user_attrs["error"]
    # a search killed mid-trial leaves a RUNNING trial; run again with a larger budget: that one is marked FAIL
    # (interrupted) and the search goes on (here with a setup queued in the storage)
    stored = S.open_study(repo, "sft", 0)
    stored.ask()
    stored.enqueue_trial(WORKS)
    study = S.search(repo, "sft", trials=3, space=SPACE, seed=0)
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL", "COMPLETE"]
    assert study.trials[1].user_attrs["error"].startswith("interrupted")
    done = study.trials[2]
    assert done.params["method"] == "bottleneck"
    assert done.values[1] == 2 * (2 * 32 * 4 + 4 + 32)  # pfeiffer, 2 layers, hidden 32 / 8
    assert done.user_attrs["mlflow_run_id"]
    exps = sh(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo)
    assert exps.strip().endswith("/sft-t2")  # the trial is a DVC experiment
    metrics = json.loads(sh(["git", "show", f"{exps.split()[0]}:metrics/sft.json"], repo))
    assert metrics["method"] == "bottleneck" and metrics["eval_loss"] == done.user_attrs["metric"]

    capsys.readouterr()
    monkeypatch.chdir(repo)
    assert S.main(["sft", "--trials", "3", "--max-trainable", "10000000", "--apply"]) == 0  # no trial left to run
    out = capsys.readouterr().out
    assert "best setup" in out and "| trial | setup | eval_loss |" in out
    assert (repo / ".search/sft/front.csv").read_text().count("\n") >= 2
    best = S.best_under(optuna.load_study(study_name="sft", storage=f"sqlite:///{repo}/.search/sft.db"), 10_000_000)
    applied = yaml.safe_load((repo / "params.yaml").read_text())["sft"]
    assert applied["adapter"]["method"] == best.user_attrs["setup"]["method"]
    assert applied["train"]["learning_rate"] == pytest.approx(best.user_attrs["setup"]["lr"])
