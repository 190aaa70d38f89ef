"""Starting a training stage across several processes under `accelerate launch`.

params.yaml `launch.config` is "" (one plain process: `python -m stages.sft` runs the stage itself) or an
accelerate config file shipped in configs/accelerate/ (ddp.yaml, fsdp.yaml, deepspeed.yaml); every training
stage (TRAINING_STAGES: `python -m stages.<stage>`, what dvc.yaml runs) then re-executes itself (posttrain.cli)
as `accelerate launch --config_file <config> [--num_processes N] -m stages.<stage>`. On a machine without CUDA
the DDP processes run on CPU and talk over gloo (ACCELERATE_USE_CPU=true); FSDP and DeepSpeed need CUDA GPUs
(accelerate would quietly fall back to DDP on CPU, so the launcher refuses instead).
Every process runs the stage's own `run(cfg)`: the trainer shards the data across ranks and all-reduces
the gradients, the work before training is shared out (posttrain.distributed), and only the main process
writes outputs, metrics and MLflow runs (posttrain.files.is_main_process).
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from posttrain.config import ConfigError

GPU_ONLY = ("FSDP", "DEEPSPEED")
LAUNCHED = "POSTTRAIN_LAUNCHED"  # set in the processes accelerate starts: they run the stage, not launch again
TRAINING_STAGES = ("cpt", "sft", "reward", "judge", "align", "rft", "distill")  # each `run_stage(..., launchable=True)`


@dataclass(frozen=True)
class LaunchConfig:
    config: str  # "" = one plain process; else an accelerate config file (configs/accelerate/*.yaml)
    num_processes: int  # processes per machine; 0 = the config file's num_processes
    main_process_port: int  # rendezvous port; 0 = a free port on this machine (single-machine runs)


def command(cfg: LaunchConfig, stage: str, params: str, cuda: bool | None = None) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that run `stage` under accelerate as `cfg` says (cuda: default, this machine's)."""
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
    if cfg.num_processes > 0:
        argv += ["--num_processes", str(cfg.num_processes)]
    argv += ["--main_process_port", str(cfg.main_process_port or _free_port())]
    if not cuda:
        env["ACCELERATE_USE_CPU"] = "true"  # processes on CPU, gloo backend
    return [*argv, *module], env


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
