"""The command line of every stage: `python -m stages.<name> [--params FILE]`.

Loads the stage's section of params.yaml into its typed config, runs it and prints its metrics. A training
stage (launchable) first reads params.yaml `launch`: with an accelerate config set there, this process
re-executes the same stage under `accelerate launch` (posttrain.launch), and each process it starts runs
the stage itself. A StageError (bad config or data) ends with `<label>: <message>`, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from posttrain.config import PARAMS_FILE, StageError, load_config
from posttrain.launch import LAUNCHED, LaunchConfig, command, describe


def run_stage(stage: str, cls: type, run, argv: list[str] | None = None, launchable: bool = False):
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=f"Run the {stage} stage.")
    parser.add_argument("--params", default=PARAMS_FILE, help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(stage, cls, args.params)
        if launchable and not os.environ.get(LAUNCHED):
            launch = load_config("launch", LaunchConfig, args.params)
            if launch.config:
                cmd, env = command(launch, stage, args.params)
                print(f"[launch] {describe(cmd)}", flush=True)
                os.execve(sys.executable, cmd, env)  # the launcher replaces this process: exit code and signals pass
        metrics = run(cfg)
    except StageError as e:
        raise SystemExit(f"{e.label}: {e}")
    print(json.dumps(metrics, indent=2, default=str))
    return metrics
