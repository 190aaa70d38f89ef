"""The command line of every stage: `python -m stages.<name> [--params FILE]`.

Loads the stage's section of params.yaml into its typed config, runs it and prints its metrics. A training
stage runs through posttrain.train.cli instead, which passes `before_run`: it first reads params.yaml `launch`
and may re-execute the stage under `accelerate launch` (posttrain.train.launch); this module does not import the
launcher, so it is no code dep of the stages that do not train. A StageError (bad config or data) ends with
`<label>: <message>`, not a traceback.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from posttrain.core.config import PARAMS_FILE, StageError, load_config


def run_stage(stage: str, cls: type, run, argv: list[str] | None = None,
              before_run: Callable[[str, str], None] | None = None):
    """Parse the stage's command line, load its config and run it; `before_run(stage, params_file)` runs after the
    config has loaded and before the stage (a StageError there ends the same way as one from the stage)."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=f"Run the {stage} stage.")
    parser.add_argument("--params", default=PARAMS_FILE, help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(stage, cls, args.params)
        if before_run is not None:
            before_run(stage, args.params)
        metrics = run(cfg)
    except StageError as e:
        raise SystemExit(f"{e.label}: {e}")
    print(json.dumps(metrics, indent=2, default=str))
    return metrics
