"""The training stages across 2 CPU processes (DDP over gloo) through `python -m stages.<stage>` with params.yaml
`launch` set, what dvc.yaml runs: sft, then reward, align, rft and distill (judge is reward's code).

Both ranks train (each logs its rank; the trainer's data-parallel world is 2, so one step takes two ranks'
batches), and rank 0 alone writes the model, the metrics and the MLflow run; the saved model reloads. The work
before training (policy samples, rft's samples, the teacher's answers) is shared out: each rank generates its
half, and the gathered result is in the order one process would give. Multi-node: the launcher's command and
the SLURM script that runs it on every node.
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
STEPS = {"max_steps": 2, "save_steps": 2}
COT = "data/cot.jsonl"
# rft's sampler and distill's teacher: the sft model overfitted on four word problems (as in test_rft), so rft has
# right samples to train on (their four answers differ) and the teacher answers every prompt
MEMORISE = {"train_file": COT, "eval_file": COT, "out_dir": "models/memorised",
            "train": {"max_steps": 200, "learning_rate": 1e-2, "batch_size": 4, "save_steps": 200}}
LATER = {
    "reward": {"train": STEPS},  # judge trains with the same code (train/reward_training.py): reward covers both
    "align": {"generation": {"batch_size": 8}, "train": STEPS},  # pairs: policy, 2 steps x 4 rows x 2 ranks = 16 prompts
    "rft": {"model": "models/memorised", "train_file": COT, "max_prompts": 4, "num_samples": 4, "max_new_tokens": 64,
            "max_eval": 2, "train": STEPS},
    "distill": {"teacher": "models/memorised", "train": STEPS},  # 2 x 4 x 2 = 16 prompts answered
}


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

    from posttrain.model.loading import load_model

    work = two_process_sft["work"]
    assert two_process_sft["proc"].returncode == 0
    assert sorted(p.name for p in (work / "models").iterdir()) == ["base", "cpt", "sft"]  # no .tmp leftovers
    client = mlflow.MlflowClient(f"sqlite:///{work}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("lifecycle").experiment_id], "tags.dvc_stage = 'sft'")
    assert len(runs) == 1 and runs[0].data.metrics["world_size"] == 2  # one MLflow run, from rank 0
    model = load_model(work / "models/sft")
    assert sum(p.numel() for p in model.parameters()) == json.loads((work / "metrics/sft.json").read_text())["total_params"]


def _env(work: Path) -> dict:
    return dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{work}/mlflow.db", LIFECYCLE_ID="ddp",
                PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


@pytest.fixture(scope="module")
def two_process_stages(lifecycle, tmp_path_factory):
    """reward, align (policy pairs), rft and distill, each once through `python -m stages.<stage>` on 2 processes."""
    from conftest import run_in_process

    built = lifecycle["workdir"]
    work = make_workdir(tmp_path_factory.mktemp("ddp_stages"), tiny_params(launch=DDP, sft=MEMORISE, **LATER))
    for path in ("data/processed", "models/cpt", "models/sft"):
        shutil.copytree(built / path, work / path, dirs_exist_ok=True)
    rows = [r for r in (work / "data/processed/sft_train.jsonl").read_text().splitlines() if '"source": "cot"' in r]
    (work / COT).write_text("\n".join(rows[:4]) + "\n")
    with pytest.MonkeyPatch.context() as mp:  # one plain process, in this one (the per-test MLflow store is not set up)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work}/mlflow.db")
        run_in_process("sft", work)
    procs = {stage: subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=work, env=_env(work),
                                   capture_output=True, text=True, timeout=600) for stage in LATER}
    return {"work": work, "procs": procs}


def _loads(work: Path, stage: str) -> int:
    from posttrain.model.loading import load_model
    from posttrain.model.reward_model import load_reward_model

    model = (load_reward_model if stage == "reward" else load_model)(work / "models" / stage)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("stage", list(LATER))
def test_each_later_stage_trains_on_both_ranks_and_rank_zero_alone_writes(two_process_stages, stage):
    import mlflow

    work, proc = two_process_stages["work"], two_process_stages["procs"][stage]
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "accelerate.commands.launch --config_file configs/accelerate/ddp.yaml --num_processes 2" in out
    assert "[train] rank 0 of 2: 2 steps" in out and "[train] rank 1 of 2: 2 steps" in out
    metrics = json.loads((work / f"metrics/{stage}.json").read_text())
    assert metrics["world_size"] == 2
    client = mlflow.MlflowClient(f"sqlite:///{work}/mlflow.db")
    everything = client.search_runs([e.experiment_id for e in client.search_experiments()])
    runs = [r for r in everything if r.data.tags.get("dvc_stage") == stage]
    assert len(runs) == 1 and runs[0].data.metrics["world_size"] == 2  # one MLflow run, from rank 0
    assert all(r.data.tags.get("kind") in ("stage", "lifecycle") for r in everything)  # none of another rank's
    saved = sorted(p.name for p in (work / "models" / stage).iterdir())
    assert "config.json" in saved or "adapter_config.json" in saved
    assert "training_args.bin" not in saved  # the trainer's save path, less its pickle: save_model's layout
    reloaded = {"reward": metrics.get("total_params"), "rft": metrics.get("total_params"),
                "align": metrics.get("total_params", 0) - metrics.get("trainable_params", 0),  # the adapter merged
                "distill": metrics.get("student", {}).get("params")}[stage]
    assert _loads(work, stage) == reloaded  # the saved model reloads
    assert not [p.name for p in (work / "models").iterdir() if ".tmp" in p.name]  # no half-written leftovers
    assert not (work / "checkpoints" / stage).exists()


def test_generation_before_training_is_shared_out_and_gathered_in_order(two_process_stages):
    import mlflow

    from posttrain.evaluation.decoding import DecodeConfig
    from posttrain.evaluation.scoring import generate
    from posttrain.model.loading import load_model, load_tokenizer

    work, procs = two_process_stages["work"], two_process_stages["procs"]
    assert all(p.returncode == 0 for p in procs.values())
    m = {s: json.loads((work / f"metrics/{s}.json").read_text()) for s in LATER}
    halves = {"align": ("policy samples", m["align"]["policy_prompts"]), "rft": ("rft samples", m["rft"]["prompts"]),
              "distill": ("teacher answers", m["distill"]["n_distinct_prompts"])}
    for stage, (desc, n) in halves.items():  # each rank its half; one process would have done all n
        out = procs[stage].stdout + procs[stage].stderr
        assert f"[{desc}] rank 0 of 2: {(n + 1) // 2} of {n}" in out and f"[{desc}] rank 1 of 2: {n // 2} of {n}" in out
    assert m["align"]["policy_prompts"] == 16 and 0 < m["align"]["policy_pairs"] <= 16
    assert m["rft"]["samples"] == 4 * 4 and m["rft"]["trained"] is True
    assert m["rft"]["prompts_solved"] >= 3  # samples gathered out of order would be checked against other answers
    # the teacher's answers, gathered from both ranks, are the answers one process gives to the same prompts
    client = mlflow.MlflowClient(f"sqlite:///{work}/mlflow.db")
    run = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.dvc_stage = 'distill'")[0]
    rows = [json.loads(line) for line in Path(client.download_artifacts(run.info.run_id, "teacher_answers.jsonl",
                                                                        str(work))).read_text().splitlines()]
    assert len(rows) == m["distill"]["n_train_rows"] == m["distill"]["n_prompts"] == 16
    teacher = work / "models/memorised"
    answers = generate(load_model(teacher), load_tokenizer(teacher), [r["prompt"] for r in rows], 16, 32,
                       DecodeConfig(engine="compact", sort_by_length=True))
    assert [r["completion"][0]["content"] for r in rows] == answers
    assert (work / "reports/distill.md").exists()


def test_every_training_stage_starts_through_launch():
    import yaml

    from posttrain.core.stages_registry import names

    repo = Path(__file__).resolve().parent.parent
    dvc = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    for stage in names(launchable=True):
        assert "launchable=True" in (repo / f"stages/{stage}.py").read_text(), stage
        assert "launch" in dvc[stage]["params"], stage  # changing how it launches re-runs it (the global batch changes)


def test_other_ranks_write_nothing(tmp_path, monkeypatch):
    from posttrain.core.files import atomic_dir, write_json

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RANK", "1")
    with atomic_dir("models/x") as scratch:
        (scratch / "weights").write_text("rank 1's copy")  # a collective save may need every rank to take part
    write_json("metrics/x.json", {"a": 1})
    assert not scratch.exists() and not Path("models").exists() and not Path("metrics").exists()


def test_launcher_commands_and_shipped_configs():
    from accelerate.commands.config.config_args import load_config_from_file

    from posttrain.core.config import ConfigError
    from posttrain.train.launch import LAUNCHED, LaunchConfig, command

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


def test_a_training_stage_re_executes_under_the_launcher_and_the_others_never_read_launch(tmp_path, monkeypatch):
    from dataclasses import dataclass

    from posttrain.core import cli as stage_cli
    from posttrain.train import cli as training_cli
    from posttrain.train.launch import LAUNCHED

    @dataclass(frozen=True)
    class Section:
        n: int

    repo = Path(__file__).resolve().parent.parent
    params = tmp_path / "params.yaml"
    params.write_text(f"launch: {{config: {repo}/configs/accelerate/ddp.yaml, num_processes: 2, "
                      "main_process_port: 0}\nx: {n: 1}\n")
    execs, ran = [], []
    monkeypatch.setattr(training_cli.os, "execve", lambda path, argv, env: execs.append((argv, env)))
    monkeypatch.delenv(LAUNCHED, raising=False)
    args = ["--params", str(params)]
    assert stage_cli.run_stage("x", Section, lambda cfg: ran.append(cfg) or {"n": cfg.n}, args) == {"n": 1}
    training_cli.run_stage("x", Section, lambda cfg: ran.append(cfg) or {}, args)  # not launchable: runs here
    assert execs == [] and ran == [Section(1), Section(1)]
    training_cli.run_stage("x", Section, lambda cfg: {}, args, launchable=True)
    (argv, env), = execs
    assert argv[1:3] == ["-m", "accelerate.commands.launch"] and env[LAUNCHED] == "1"
    assert argv[-4:] == ["-m", "stages.x", "--params", str(params)]
    monkeypatch.setenv(LAUNCHED, "1")  # a process the launcher started runs the stage itself
    training_cli.run_stage("x", Section, lambda cfg: ran.append(cfg) or {}, args, launchable=True)
    assert len(execs) == 1 and len(ran) == 3


def test_multinode_command_and_the_slurm_script(tmp_path, monkeypatch):
    from accelerate.commands.launch import launch_command_parser

    import posttrain.train.launch as launch
    from posttrain.core.config import ConfigError

    repo = Path(__file__).resolve().parent.parent
    # the script on a fake 2-node allocation: each node's task runs posttrain.train.launch with its own machine rank
    fake, calls = tmp_path / "bin", tmp_path / "calls"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\necho node-a; echo node-b\n")
    (fake / "srun").write_text('#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\n'
                               'SLURM_NODEID=0 "$@" && SLURM_NODEID=1 "$@"\n')
    (fake / "python").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    for f in fake.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", PYTHON=str(fake / "python"),
               SLURM_JOB_NODELIST="node-[a-b]", SLURM_NNODES="2")
    subprocess.run(["bash", str(repo / "configs/slurm/multinode.sbatch"), "align"], env=env, check=True)
    lines = calls.read_text().splitlines()
    assert lines == [f"-m posttrain.train.launch align --num_machines 2 --machine_rank {r} --main_process_ip node-a"
                     for r in (0, 1)]
    # what posttrain.train.launch then runs on node 1: accelerate launch with the node's rank and the fixed port
    params = tmp_path / "params.yaml"
    params.write_text(f"launch: {{config: {repo}/configs/accelerate/ddp.yaml, num_processes: 4, main_process_port: 29555}}\n")
    ran = []
    monkeypatch.setattr(launch.os, "execve", lambda path, argv, env: ran.append((argv, env)))
    launch.main([*lines[1].split()[2:], "--params", str(params)])
    (argv, env), = ran
    assert argv[1:3] == ["-m", "accelerate.commands.launch"] and env[launch.LAUNCHED] == "1"
    assert argv[-4:] == ["-m", "stages.align", "--params", str(params)]
    args = launch_command_parser().parse_args(argv[3:])  # accelerate's own parser takes every flag
    assert (args.num_machines, args.machine_rank, args.main_process_ip, args.main_process_port) == (2, 1, "node-a", 29555)
    assert args.num_processes == 8  # accelerate counts the processes of all machines: 4 per machine
    # a free port (0) is this machine's alone; DeepSpeed nodes start their own processes, as DDP's and FSDP's do
    cfg = launch.LaunchConfig(str(repo / "configs/accelerate/deepspeed.yaml"), 4, 0)
    with pytest.raises(ConfigError, match=r"\[launch.main_process_port\] is 0"):
        launch.command(cfg, "sft", "params.yaml", cuda=True, nodes=launch.Nodes(2, 0, "node-a"))
    with pytest.raises(ConfigError, match="machine rank 2 is not one of 0..1"):
        launch.command(cfg, "sft", "params.yaml", cuda=True, nodes=launch.Nodes(2, 2, "node-a"))
    argv, _ = launch.command(launch.LaunchConfig(cfg.config, 4, 29555), "sft", "params.yaml", cuda=True,
                             nodes=launch.Nodes(2, 0, "node-a"))
    assert argv[argv.index("--deepspeed_multinode_launcher") + 1] == "standard"
