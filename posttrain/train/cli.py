"""The command line of a training stage: `python -m stages.<name> [--params FILE]`, as posttrain.core.cli's.

A launchable stage first reads params.yaml `launch`: with an accelerate config set there, this process
re-executes the same stage under `accelerate launch` (posttrain.train.launch), and each process it starts runs
the stage itself. Only the training stages import this module, so only they have the launcher as a code dep.
"""

from __future__ import annotations

import os
import sys

from posttrain.core import cli
from posttrain.core.config import load_config
from posttrain.train.launch import LAUNCHED, LaunchConfig, command, describe


def run_stage(stage: str, cls: type, run, argv: list[str] | None = None, launchable: bool = False):
    return cli.run_stage(stage, cls, run, argv, before_run=launch if launchable else None)


def launch(stage: str, params: str) -> None:
    """Re-execute `stage` under `accelerate launch` where params.yaml `launch.config` names an accelerate config
    (not in a process the launcher started)."""
    if os.environ.get(LAUNCHED):
        return
    cfg = load_config("launch", LaunchConfig, params)
    if cfg.config:
        cmd, env = command(cfg, stage, params)
        print(f"[launch] {describe(cmd)}", flush=True)
        os.execve(sys.executable, cmd, env)  # the launcher replaces this process: exit code and signals pass
