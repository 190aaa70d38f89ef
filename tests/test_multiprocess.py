"""A training stage across 2 CPU processes (DDP over gloo) through `python -m stages.sft` with params.yaml `launch` set, what dvc.yaml runs.

Both ranks train (each logs its rank; the trainer's data-parallel world is 2, so one step takes two ranks'
batches), and rank 0 alone writes the model, the metrics and the MLflow run; the saved model reloads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_workdir, tiny_params

DDP = {"config": "configs/accelerate/ddp.yaml", "num_processes": 2, "main_process_port": 0}


@pytest.fixture(scope="module")
def two_process_sft(lifecycle, tmp_path_factory):
    built = lifecycle["workdir"]
    work = make_workdir(tmp_path_factory.mktemp("ddp"), tiny_params(launch=DDP))
    for path in ("data/processed", "models/base", "models/cpt"):
        shutil.copytree(built / path, work / path, dirs_exist_ok=True)
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{work}/mlflow.db", LIFECYCLE_ID="ddp",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run([sys.executable, "-m", "stages.sft"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    return {"work": work, "proc": proc, "single": lifecycle["metrics"]["sft"]}


def test_both_ranks_train_one_data_parallel_job(two_process_sft):
    proc = two_process_sft["proc"]
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "accelerate.commands.launch --config_file configs/accelerate/ddp.yaml --num_processes 2" in out
    assert "[train] rank 0 of 2: 6 steps" in out and "[train] rank 1 of 2: 6 steps" in out
    metrics = json.loads((two_process_sft["work"] / "metrics/sft.json").read_text())
    assert metrics["world_size"] == 2 and two_process_sft["single"]["world_size"] == 1
    assert metrics["train_loss"] != two_process_sft["single"]["train_loss"]  # a global batch of 2 x 4 rows, not 4


def test_rank_zero_alone_writes_and_the_model_reloads(two_process_sft):
    import mlflow

    from posttrain.models import load_model

    work = two_process_sft["work"]
    assert two_process_sft["proc"].returncode == 0
    assert sorted(p.name for p in (work / "models").iterdir()) == ["base", "cpt", "sft"]  # no .tmp leftovers
    client = mlflow.MlflowClient(f"sqlite:///{work}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("lifecycle").experiment_id], "tags.dvc_stage = 'sft'")
    assert len(runs) == 1 and runs[0].data.metrics["world_size"] == 2  # one MLflow run, from rank 0
    model = load_model(work / "models/sft")
    assert sum(p.numel() for p in model.parameters()) == json.loads((work / "metrics/sft.json").read_text())["total_params"]


def test_other_ranks_write_nothing(tmp_path, monkeypatch):
    from posttrain.files import atomic_dir, write_json

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RANK", "1")
    with atomic_dir("models/x") as scratch:
        (scratch / "weights").write_text("rank 1's copy")  # a collective save may need every rank to take part
    write_json("metrics/x.json", {"a": 1})
    assert not scratch.exists() and not Path("models").exists() and not Path("metrics").exists()


def test_launcher_commands_and_shipped_configs():
    from accelerate.commands.config.config_args import load_config_from_file

    from posttrain.config import ConfigError
    from posttrain.launch import LAUNCHED, LaunchConfig, command

    repo = Path(__file__).resolve().parent.parent
    with pytest.raises(ConfigError, match=r"\[launch.config\] : no such accelerate config file"):
        command(LaunchConfig(config="", num_processes=0, main_process_port=0), "sft", "params.yaml", cuda=False)
    for name in ("ddp", "fsdp", "deepspeed"):
        path = str(repo / f"configs/accelerate/{name}.yaml")
        assert load_config_from_file(path).num_processes == 2  # accelerate's own loader: no unknown keys
        cfg = LaunchConfig(config=path, num_processes=4, main_process_port=29555)
        argv, env = command(cfg, "sft", "params.yaml", cuda=True)
        assert argv[1:5] == ["-m", "accelerate.commands.launch", "--config_file", path]
        assert argv[argv.index("--num_processes") + 1] == "4" and argv[argv.index("--main_process_port") + 1] == "29555"
        assert argv[-4:] == ["-m", "stages.sft", "--params", "params.yaml"]
        assert env[LAUNCHED] == "1"  # the processes it starts run the stage instead of launching again
        if name != "ddp":  # accelerate has no FSDP / DeepSpeed over CPU processes; it would quietly run DDP
            with pytest.raises(ConfigError, match="needs CUDA GPUs"):
                command(cfg, "sft", "params.yaml", cuda=False)
