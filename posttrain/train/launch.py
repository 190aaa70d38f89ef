"""Starting a training stage across several processes, on one machine or several, under `accelerate launch`.

params.yaml `launch.config` is "" (one plain process: `python -m stages.sft` runs the stage itself) or an
accelerate config file shipped in configs/accelerate/ (ddp.yaml, fsdp.yaml, deepspeed.yaml); every training
stage (launchable in posttrain.core.stages_registry: `python -m stages.<stage>`, what dvc.yaml runs) then re-executes
itself (posttrain.train.cli) as `accelerate launch --config_file <config> [--num_processes N] -m stages.<stage>`. On a
machine without CUDA the DDP processes run on CPU and talk over gloo (ACCELERATE_USE_CPU=true); FSDP and DeepSpeed
need CUDA GPUs (accelerate would quietly fall back to DDP on CPU, so the launcher refuses instead).
Every process runs the stage's own `run(cfg)`: the trainer shards the data across ranks and all-reduces
the gradients, the work before training is shared out (posttrain.train.distributed), and only the main process
writes outputs, metrics and MLflow runs (posttrain.core.files.is_main_process).

Several machines: every node runs this module with its own machine rank, and they meet at machine 0's
address on launch.main_process_port, which must then be fixed (configs/slurm/multinode.sbatch does it
under SLURM):

    python -m posttrain.train.launch sft --num_machines 2 --machine_rank 0 --main_process_ip node0   # on node0
    python -m posttrain.train.launch sft --num_machines 2 --machine_rank 1 --main_process_ip node0   # on node1
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from posttrain.core.config import PARAMS_FILE, ConfigError, StageError, load_config
from posttrain.core.stages_registry import names

GPU_ONLY = ("FSDP", "DEEPSPEED")
LAUNCHED = "POSTTRAIN_LAUNCHED"  # set in the processes accelerate starts: they run the stage, not launch again


@dataclass(frozen=True)
class LaunchConfig:
    config: str  # "" = one plain process; else an accelerate config file (configs/accelerate/*.yaml)
    num_processes: int  # processes per machine; 0 = the config file's num_processes (several machines: the GPUs)
    main_process_port: int  # rendezvous port; 0 = a free port on this machine (one machine only)


@dataclass(frozen=True)
class Nodes:
    """This node's place in a run over several machines; every node starts the same stage with its own rank."""
    count: int  # machines in the run
    rank: int  # this machine's rank, 0 .. count - 1 (SLURM: $SLURM_NODEID)
    main_ip: str  # the address of machine 0, where the processes meet (SLURM: the allocation's first node)


def command(cfg: LaunchConfig, stage: str, params: str, cuda: bool | None = None,
            nodes: Nodes | None = None) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that run `stage` under accelerate as `cfg` says (cuda: default, this machine's),
    on this machine alone or, with `nodes`, as this node's part of a run over several."""
    module = ["-m", f"stages.{stage}", "--params", params]
    env = dict(os.environ, **{LAUNCHED: "1"})
    cuda = _cuda() if cuda is None else cuda
    if not Path(cfg.config).is_file():
        raise ConfigError(f"[launch.config] {cfg.config}: no such accelerate config file (see configs/accelerate/)")
    kind = (yaml.safe_load(Path(cfg.config).read_text()) or {}).get("distributed_type", "NO")
    if kind in GPU_ONLY and not cuda:
        raise ConfigError(f"[launch.config] {cfg.config} is {kind}, which needs CUDA GPUs and none is visible; "
                          "use configs/accelerate/ddp.yaml (CPU processes over gloo) or config: \"\"")
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", cfg.config]
    if nodes is not None and nodes.count > 1:
        argv += _across_machines(cfg, nodes, kind, cuda)
    else:
        if cfg.num_processes > 0:
            argv += ["--num_processes", str(cfg.num_processes)]
        argv += ["--main_process_port", str(cfg.main_process_port or _free_port())]
    if not cuda:
        env["ACCELERATE_USE_CPU"] = "true"  # processes on CPU, gloo backend
    return [*argv, *module], env


def _across_machines(cfg: LaunchConfig, nodes: Nodes, kind: str, cuda: bool) -> list[str]:
    """accelerate's flags for one node of several: its rank, machine 0's address and the fixed port, and the
    processes of all machines (accelerate's --num_processes counts them all; launch.num_processes is per machine)."""
    if not 0 <= nodes.rank < nodes.count:
        raise ConfigError(f"machine rank {nodes.rank} is not one of 0..{nodes.count - 1}")
    if not nodes.main_ip:
        raise ConfigError("a run over several machines needs machine 0's address (--main_process_ip)")
    if cfg.main_process_port <= 0:
        raise ConfigError("[launch.main_process_port] is 0 (a free port, which only one machine would know); a run "
                          "over several machines needs a fixed port that every node uses, e.g. 29500")
    per_machine = cfg.num_processes or (_gpus() if cuda else 0)
    if per_machine < 1:
        raise ConfigError("[launch.num_processes] is 0 and no GPU is visible: set the processes per machine")
    argv = ["--num_processes", str(per_machine * nodes.count), "--num_machines", str(nodes.count),
            "--machine_rank", str(nodes.rank), "--main_process_ip", nodes.main_ip,
            "--main_process_port", str(cfg.main_process_port)]
    if kind == "DEEPSPEED":  # each node starts its own processes, as with DDP and FSDP (not pdsh over ssh)
        argv += ["--deepspeed_multinode_launcher", "standard"]
    return argv


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _cuda() -> bool:
    import torch  # only when launching processes: a plain run does not pay torch's import twice

    return torch.cuda.is_available()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def describe(cmd: list[str]) -> str:
    """The command as a person would type it (without the interpreter's path)."""
    return " ".join(cmd[1:] if cmd[0] == sys.executable else cmd)


def main(argv: list[str] | None = None) -> None:
    """`python -m posttrain.train.launch <stage> --num_machines N --machine_rank R --main_process_ip IP`: this
    node's part of a run over several machines (one machine: `python -m stages.<stage>` launches itself)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m posttrain.train.launch", description=main.__doc__)
    parser.add_argument("stage", choices=names(launchable=True))
    parser.add_argument("--num_machines", type=int, required=True)
    parser.add_argument("--machine_rank", type=int, required=True)
    parser.add_argument("--main_process_ip", required=True)
    parser.add_argument("--params", default=PARAMS_FILE, help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config("launch", LaunchConfig, args.params)
        if not cfg.config:
            raise ConfigError("[launch.config] is \"\": set an accelerate config (configs/accelerate/) to launch")
        cmd, env = command(cfg, args.stage, args.params,
                           nodes=Nodes(args.num_machines, args.machine_rank, args.main_process_ip))
    except StageError as e:
        raise SystemExit(f"{e.label}: {e}")
    print(f"[launch] {describe(cmd)}", flush=True)
    os.execve(sys.executable, cmd, env)


if __name__ == "__main__":
    main()
