"""Deployments of the lifecycle: the nightly schedule and an on-demand single stage, served from this repo.

    prefect server start                                      # terminal 1: API and UI at http://127.0.0.1:4200
    prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.serve                                     # terminal 2, repo root: register + run the deployments here
    python -m flows.serve --work-pool lifecycle [--source URL]  # or register them on a work pool for remote workers

`lifecycle/nightly` runs every stage on `orchestration.schedule` (params.yaml) with the committed params.yaml;
DVC skips what did not change, so a nightly run re-trains from the stage whose data or code changed.
"Run > Custom run" in the UI takes `overrides` such as {"sft.adapter.method": "lora"}. `stage/on-demand` runs
one stage. Each has concurrency_limit=1: a second run of a deployment waits in Prefect until the first ends,
and the flow's lifecycle lock turns away a run started any other way while one is running.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect.schedules import Cron

from flows.lifecycle import lifecycle, orchestration_config, stage
from posttrain.core.config import read_params

ENTRYPOINTS = {"lifecycle": "flows/lifecycle.py:lifecycle", "stage": "flows/lifecycle.py:stage"}


def specs(params_file: str | Path = "params.yaml") -> list[dict]:
    """Name, flow and settings of each deployment, from params.yaml's `orchestration` section."""
    cfg = orchestration_config(read_params(params_file))
    nightly = Cron(cfg.schedule.cron, timezone=cfg.schedule.timezone)
    return [
        {"flow": "lifecycle", "name": "nightly", "schedules": [nightly], "concurrency_limit": 1, "tags": ["lifecycle"],
         "description": f"Every DVC stage, as one DVC experiment, on '{cfg.schedule.cron}' ({cfg.schedule.timezone})."},
        {"flow": "stage", "name": "on-demand", "schedules": [], "concurrency_limit": 1, "tags": ["lifecycle"],
         "description": "One DVC stage (and the stale stages it needs) as one DVC experiment."},
    ]


def deployments(params_file: str | Path = "params.yaml"):
    """RunnerDeployments for `prefect.serve` (runs execute in this process's machine and repo)."""
    flows = {"lifecycle": lifecycle, "stage": stage}
    return [flows[s.pop("flow")].to_deployment(**s) for s in specs(params_file)]


def deploy_to_pool(work_pool: str, source: str, params_file: str | Path = "params.yaml") -> list:
    """Register the deployments on `work_pool`; its workers fetch the flow code from `source` (a git URL or path)."""
    from prefect import Flow

    ids = []
    for s in specs(params_file):
        flow = Flow.from_source(source=source, entrypoint=ENTRYPOINTS[s.pop("flow")])
        ids.append(flow.deploy(work_pool_name=work_pool, build=False, push=False, print_next_steps=False, **s))
    return ids


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--work-pool", help="register on this work pool instead of serving here")
    parser.add_argument("--source", default=str(Path.cwd()),
                        help="where the pool's workers get the code: a git URL, or a path they share (default: this repo)")
    args = parser.parse_args(argv)
    if args.work_pool:
        ids = deploy_to_pool(args.work_pool, args.source)
        print(f"registered {len(ids)} deployment(s) on work pool '{args.work_pool}'; "
              f"start a worker where the repo and its .venv are: prefect worker start --pool {args.work_pool}")
        return
    import prefect

    prefect.serve(*deployments())


if __name__ == "__main__":
    main()
