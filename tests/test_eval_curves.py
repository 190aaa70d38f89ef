"""train.eval_steps: held-out loss curves in MLflow during training; tracking.report_to: mlflow and tensorboard."""

from __future__ import annotations

import shutil

import pytest
import yaml
from conftest import make_workdir, run_in_process, tiny_params

from posttrain.core.config import ConfigError, load_config


def test_sft_logs_eval_loss_curves_to_mlflow_and_tensorboard(lifecycle, tmp_path):
    from mlflow import MlflowClient

    wd = make_workdir(tmp_path / "wd", tiny_params(sft={"train": {"eval_steps": 2}},
                                                  tracking={"report_to": ["mlflow", "tensorboard"]}))
    for name in ("data/processed", "models/cpt"):
        shutil.copytree(lifecycle["workdir"] / name, wd / name)
    run_in_process("sft", wd)
    client = MlflowClient()  # the test's own store (conftest: MLFLOW_TRACKING_URI)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if r.info.run_name == "sft" or r.data.tags.get("stage") == "sft"]
    assert len(runs) == 1, [r.info.run_name for r in runs]
    history = client.get_metric_history(runs[0].info.run_id, "eval_loss")
    assert {m.step for m in history} >= {2, 4, 6}, [(m.step, m.value) for m in history]  # every eval_steps steps
    assert len({m.value for m in history}) > 1
    assert list((wd / "runs/sft").glob("events.out.tfevents.*")), "report_to tensorboard writes under runs/<stage>/"
    assert not (wd / "checkpoints/sft").exists()


def test_eval_steps_off_by_default_and_report_to_mlflow():
    from conftest import REPO

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["defaults"]["train"]["eval_steps"] == 0 and params["tracking"]["report_to"] == ["mlflow"]


def test_an_unknown_report_to_is_a_config_error_naming_the_key(tmp_path):
    params = tiny_params(tracking={"report_to": ["mlflow", "wandb"]})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    from stages.sft import SFTStageConfig

    with pytest.raises(ConfigError, match=r"tracking\.report_to.*wandb"):
        load_config("sft", SFTStageConfig, tmp_path / "params.yaml")
    params["tracking"]["report_to"] = ["tensorboard"]
    params["sft"]["train"] = {**params["sft"].get("train", {}), "eval_steps": -1}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"eval_steps"):
        load_config("sft", SFTStageConfig, tmp_path / "params.yaml")
