"""launch: start a training stage as one process, or across several under `accelerate launch`.

    python -m stages.launch sft        # what dvc.yaml runs for the training stages

params.yaml `launch.config` is "" (one plain process: `python -m stages.sft`) or an accelerate config file
shipped in configs/accelerate/ (ddp.yaml, fsdp.yaml, deepspeed.yaml); the stage then runs as
`accelerate launch --config_file <config> [--num_processes N] -m stages.sft`. On a machine without CUDA the
DDP processes run on CPU and talk over gloo (ACCELERATE_USE_CPU=true); FSDP and DeepSpeed need CUDA GPUs
(accelerate would quietly fall back to DDP on CPU, so the launcher refuses instead).
Every process runs the stage's own `run(cfg)`: the trainer shards the data across ranks and all-reduces
the gradients, and only the main process writes outputs, metrics and MLflow runs (stages.common.is_main_process).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from stages.config import PARAMS_FILE, ConfigError, load_config

GPU_ONLY = ("FSDP", "DEEPSPEED")


@dataclass(frozen=True)
class LaunchConfig:
    config: str  # "" = one plain process; else an accelerate config file (configs/accelerate/*.yaml)
    num_processes: int  # processes per machine; 0 = the config file's num_processes
    main_process_port: int  # rendezvous port; 0 = a free port on this machine (single-machine runs)


def command(cfg: LaunchConfig, stage: str, params: str, cuda: bool) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that run `stage` as `cfg` says."""
    module = ["-m", f"stages.{stage}", "--params", params]
    env = dict(os.environ)
    if not cfg.config:
        return [sys.executable, *module], env
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.launch", description="Run a training stage as params.yaml `launch` says.")
    parser.add_argument("stage", help="stage module in stages/, e.g. sft")
    parser.add_argument("--params", default=PARAMS_FILE, help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    if not (Path(__file__).parent / f"{args.stage}.py").is_file():
        raise SystemExit(f"launch: no stage module stages/{args.stage}.py")
    try:
        cfg = load_config("launch", LaunchConfig, args.params)
        cmd, env = command(cfg, args.stage, args.params, cuda=bool(cfg.config) and _cuda())
    except ConfigError as e:
        raise SystemExit(f"config error: {e}")
    print("[launch] " + " ".join(cmd[1:] if cmd[0] == sys.executable else cmd), flush=True)
    os.execve(sys.executable, cmd, env)  # the stage (or the launcher) replaces this process: exit code and signals pass through


if __name__ == "__main__":
    main()
