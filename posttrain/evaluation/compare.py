"""compare: the last N lifecycles side by side, from MLflow: the params that differ, then the metrics.

    python -m posttrain.evaluation.compare                       # last 5 lifecycles, the evaluate table's metrics
    python -m posttrain.evaluation.compare --last 4 \
        --metrics 'sft.trainable_share' 'sft.peak_memory_mb' 'sft.train_wall_s' 'evaluate.sft.*'

A lifecycle is an MLflow parent run (tags.kind = lifecycle): one `dvc repro`, Prefect flow run or queued DVC
experiment. Its params are the whole params.yaml it ran with (logged when it opened); its metrics are
`<stage>.<name>`: what the Prefect flow logged onto it from every stage's metrics file, else the latest run
of each stage under it (a stage DVC skipped as cached has no run of its own in that lifecycle, so run the
flow, or `dvc exp show`, for the full picture). Not a DVC stage: it only reads.
"""

from __future__ import annotations

import argparse
import fnmatch
from datetime import datetime

from posttrain.core.config import PARAMS_FILE, ConfigError, TrackingConfig, build, read_params
from posttrain.core.markdown import markdown_table
from posttrain.core.tracking import tracking_uri


def lifecycles(tracking: TrackingConfig, last: int) -> list[dict]:
    """The `last` lifecycles, oldest first: name, parent run id, start time, params, `<stage>.<metric>` metrics."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(tracking.uri))
    experiment = client.get_experiment_by_name(tracking.experiment)
    if experiment is None:
        return []
    eid = experiment.experiment_id
    parents = client.search_runs([eid], "tags.kind = 'lifecycle'", order_by=["attributes.start_time DESC"],
                                 max_results=last)
    out = []
    for parent in reversed(parents):
        metrics: dict[str, float] = {}
        children = client.search_runs([eid], f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                      order_by=["attributes.start_time ASC"])
        for child in children:
            stage = child.data.tags.get("dvc_stage", child.info.run_name)
            metrics.update({f"{stage}.{k}": v for k, v in child.data.metrics.items()})
        metrics.update(parent.data.metrics)
        out.append({
            "name": parent.data.tags.get("lifecycle", parent.info.run_id[:8]),
            "run_id": parent.info.run_id,
            "started": datetime.fromtimestamp(parent.info.start_time / 1000).strftime("%Y-%m-%d %H:%M"),
            "params": dict(parent.data.params),
            "metrics": metrics,
        })
    return out


def table(runs: list[dict], patterns: list[str]) -> list[list[str]]:
    """Rows: a header, the start times, every param whose value differs between runs, the matching metrics."""
    missing = "-"
    keys = sorted(set().union(*(r["params"] for r in runs)))
    differing = [k for k in keys if len({r["params"].get(k, missing) for r in runs}) > 1]
    names = sorted({m for r in runs for m in r["metrics"] if any(fnmatch.fnmatchcase(m, p) for p in patterns)})
    rows = [["", *(r["name"] for r in runs)], ["started", *(r["started"] for r in runs)]]
    rows += [[f"param {k}", *(r["params"].get(k, missing) for r in runs)] for k in differing]
    rows += [[m, *(_fmt(r["metrics"].get(m)) for r in runs)] for m in names]
    return rows


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"
    return str(value)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m posttrain.evaluation.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--last", type=int, default=5, help="how many lifecycles, newest last (default 5)")
    parser.add_argument("--metrics", nargs="+", default=["evaluate.*"],
                        help="metric name patterns, <stage>.<metric> (default: evaluate.*)")
    parser.add_argument("--params", default=PARAMS_FILE, help="params file with the `tracking` section")
    args = parser.parse_args(argv)
    try:
        tracking = build(TrackingConfig, read_params(args.params).get("tracking"), "tracking")
    except ConfigError as e:
        raise SystemExit(f"config error: {e}")
    runs = lifecycles(tracking, args.last)
    if not runs:
        raise SystemExit(f"no lifecycle runs in MLflow experiment '{tracking.experiment}' at {tracking_uri(tracking.uri)}")
    header, *rows = table(runs, args.metrics)
    text = markdown_table(header, rows, cell=str, padded=True)
    print(text)
    return text


if __name__ == "__main__":
    main()
