"""`python -m posttrain.evaluation.compare`: lifecycles side by side from a real MLflow store, written the way the
stages write it."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import yaml
from conftest import tiny_params

from posttrain.core.config import TrackingConfig


@dataclass(frozen=True)
class FakeStageConfig:  # what a stage's config carries into stage_run
    seed: int
    tracking: TrackingConfig
    method: str


def lifecycle(workdir, monkeypatch, method: str, em: float, share: float, flow_metrics: dict | None = None) -> None:
    """One `dvc repro`-style lifecycle (LIFECYCLE_ID from git commit + params.yaml): an sft and an evaluate run."""
    from posttrain.core.tracking import lifecycle_id, log_stage_metrics, stage_run

    params = tiny_params(sft={"adapter": {"method": method}})
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.delenv("LIFECYCLE_ID", raising=False)
    cfg = FakeStageConfig(seed=1, tracking=TrackingConfig(uri="", experiment="lifecycle", log_models=False), method=method)
    with stage_run("sft", cfg):
        log_stage_metrics({"trainable_share": share, "train_wall_s": 2.5})
    with stage_run("evaluate", cfg):
        log_stage_metrics({"sft": {"instruction_em": em, "perplexity": 30.0}, "base": {"instruction_em": 0.0}})
    if flow_metrics:  # what the Prefect flow adds onto the parent run from the metrics files
        import mlflow

        client = mlflow.MlflowClient()
        (parent,) = client.search_runs([client.get_experiment_by_name("lifecycle").experiment_id],
                                       f"tags.lifecycle = '{lifecycle_id()}' and tags.kind = 'lifecycle'")
        for k, v in flow_metrics.items():
            client.log_metric(parent.info.run_id, k, v)


def test_last_lifecycles_side_by_side_with_differing_params(tmp_path, monkeypatch, capsys):
    from posttrain.evaluation.compare import main

    monkeypatch.chdir(tmp_path)
    lifecycle(tmp_path, monkeypatch, "full", em=0.10, share=1.0)
    lifecycle(tmp_path, monkeypatch, "lora", em=0.20, share=0.05)
    lifecycle(tmp_path, monkeypatch, "ia3", em=0.30, share=0.002, flow_metrics={"evaluate.sft.instruction_em": 0.35})

    text = main(["--last", "2", "--metrics", "evaluate.sft.*", "sft.trainable_share"])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in text.splitlines()}
    assert rows["param sft.adapter.method"] == ["lora", "ia3"]  # the last 2, oldest first; only what differs
    assert not any(k.startswith("param ") and k != "param sft.adapter.method" for k in rows)
    assert rows["evaluate.sft.instruction_em"] == ["0.2", "0.35"]  # the flow's parent metric wins over the child's
    assert rows["evaluate.sft.perplexity"] == ["30", "30"] and rows["sft.trainable_share"] == ["0.05", "0.002"]
    assert "evaluate.base.instruction_em" not in rows and "sft.train_wall_s" not in rows  # only the asked metrics
    assert re.match(r"^\| +\| [0-9a-f]{12} +\| [0-9a-f]{12} +\|$", text.splitlines()[0])  # lifecycle ids as columns
    assert capsys.readouterr().out.strip() == text


def test_no_lifecycles_says_where_it_looked(tmp_path, monkeypatch):
    from posttrain.evaluation.compare import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    with pytest.raises(SystemExit, match="no lifecycle runs in MLflow experiment 'lifecycle' at sqlite:///"):
        main([])
