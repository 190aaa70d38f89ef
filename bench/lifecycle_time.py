"""Wall time of the whole lifecycle per stage, and how much of it is orchestration rather than compute.

    python -m bench.lifecycle_time                      # the embedded default (params.yaml), every stage
    python -m bench.lifecycle_time --params tiny.yaml --targets base --noop-runs 1     # a quick look

Runs `dvc repro` in a fresh temporary git + DVC copy of the repo (never in the checkout), with
bench/timing_site on PYTHONPATH so every Python process of the run (DVC itself, the launcher, each stage)
reports its wall time and the self time of each phase (see bench/timing_site/sitecustomize.py). Then it times
a no-op `dvc repro` (nothing changed: every stage cached), without the timer.

Orchestration overhead = process start and imports + config loading + MLflow (stage runs, params, metrics,
model artifacts, the trainer's MLflow callback) + model load/save between stages + checkpoints + the
launcher process + DVC's own bookkeeping (hashing, cache, lock files: DVC's wall less its stage processes').
Compute = training + evaluation + everything else a stage does (data, generation, scoring).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import git_dvc_init, load, machine, table  # noqa: E402

CODE = ["stages", "posttrain", "profiles", "schemas", "flows", "configs", "bench", "data/feedback", "dvc.yaml",
        "pyproject.toml"]
OVERHEAD = ["imports", "config", "mlflow", "model_io", "checkpoints"]
COMPUTE = ["train", "eval", "generate"]


def make_repo(path: Path, params: Path) -> None:
    """A git + DVC copy of the code at `path` with `params` as its params.yaml."""
    path.mkdir(parents=True, exist_ok=True)
    for name in CODE:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, path / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy(src, path / name)
    shutil.copy(params, path / "params.yaml")
    git_dvc_init(path)


def repro(path: Path, targets: list[str], env: dict) -> tuple[float, str]:
    dvc = str(Path(sys.executable).parent / "dvc")
    start = time.perf_counter()
    proc = subprocess.run([dvc, "repro", *targets], cwd=path, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"dvc repro failed in {path}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def stage_of(argv: list[str]) -> str | None:
    """'stages/sft.py' (python -m stages.sft) -> 'sft'; the launcher -> 'launch:<stage>'."""
    if not argv:
        return None
    p = Path(argv[0])
    if p.parent.name != "stages":
        return None
    if p.stem == "launch":
        return "launch:" + next((a for a in argv[1:] if not a.startswith("-")), "?")
    return p.stem


def summarise(records: list[dict], dvc_wall: float) -> tuple[list[list], dict]:
    stages, launchers, dvc_proc = {}, {}, None
    for r in records:
        name = stage_of(r["argv"])
        if name is None:
            if r["argv"] and Path(r["argv"][0]).name == "dvc":
                dvc_proc = r
            continue
        (launchers if name.startswith("launch:") else stages)[name.removeprefix("launch:")] = r
    rows, totals = [], {k: 0.0 for k in [*OVERHEAD, "launcher", *COMPUTE, "other", "wall"]}
    for name, r in sorted(stages.items(), key=lambda kv: kv[1]["start"]):
        ph = r["phases"]
        # posttrain.train.cli execs an accelerate launch in its own process (os.execve): its few ms before that land
        # in DVC's share
        launcher = launchers[name]["wall_s"] - r["wall_s"] if name in launchers else 0.0
        wall = r["wall_s"] + launcher
        # interpreter start before the timer loads: counted with the imports
        spent = {k: ph.get(k, 0.0) for k in [*OVERHEAD, *COMPUTE]}
        other = r["wall_s"] - sum(spent.values())
        overhead = sum(spent[k] for k in OVERHEAD) + launcher
        for k, v in {**spent, "launcher": launcher, "other": other, "wall": wall}.items():
            totals[k] += v
        rows.append([name, wall, spent["imports"], spent["config"], spent["mlflow"], spent["model_io"],
                     spent["checkpoints"], spent["train"], spent["eval"], spent["generate"], other,
                     f"{100 * overhead / wall:.1f} %"])
    total_wall = dvc_proc["wall_s"] if dvc_proc else dvc_wall
    dvc_bookkeeping = total_wall - totals["wall"]
    overhead = sum(totals[k] for k in [*OVERHEAD, "launcher"]) + dvc_bookkeeping
    rows.append(["**all stages**", totals["wall"], *(totals[k] for k in OVERHEAD),
                 totals["train"], totals["eval"], totals["generate"], totals["other"],
                 f"{100 * (overhead - dvc_bookkeeping) / totals['wall']:.1f} %" if totals["wall"] else "-"])
    summary = {"dvc_repro_wall_s": total_wall, "stage_process_wall_s": totals["wall"],
               "dvc_bookkeeping_s": dvc_bookkeeping, "overhead_s": overhead,
               "overhead_share_pct": 100 * overhead / total_wall if total_wall else None,
               "compute_s": totals["train"] + totals["eval"] + totals["generate"] + totals["other"],
               "generate_share_pct": 100 * totals["generate"] / totals["wall"] if totals["wall"] else None,
               "phases_s": {k: totals[k] for k in [*OVERHEAD, "launcher", *COMPUTE, "other"]}}
    return rows, summary


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.lifecycle_time", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default=str(REPO / "params.yaml"), help="params file to run (default: params.yaml)")
    p.add_argument("--targets", nargs="*", default=[], help="dvc repro targets (default: the whole DAG)")
    p.add_argument("--noop-runs", type=int, default=3, help="times to run the no-op dvc repro (median reported)")
    p.add_argument("--workdir", help="where to make the copy (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the copy (its metrics/, models/, mlflow.db)")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)

    path = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="lifecycle-time-"))
    make_repo(path, Path(a.params))
    timing = path / "timing.jsonl"
    base_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                "MLFLOW_TRACKING_URI": f"sqlite:///{path}/mlflow.db"}
    base_env.pop("LIFECYCLE_ID", None)
    timed_env = {**base_env, "LIFECYCLE_TIMING": str(timing),
                 "PYTHONPATH": os.pathsep.join([str(path / "bench" / "timing_site"), os.environ.get("PYTHONPATH", "")])}
    load_before = load()
    print(f"# lifecycle time: {machine()}; params {a.params}; copy at {path}; load before {load_before}", flush=True)
    wall, out = repro(path, a.targets, timed_env)
    load_after = load()
    noop = []
    for _ in range(a.noop_runs):
        noop_wall, noop_out = repro(path, a.targets, base_env)
        if "Running stage" in noop_out:
            raise SystemExit(f"the second dvc repro was not a no-op:\n{noop_out[-2000:]}")
        noop.append(noop_wall)

    records = [json.loads(line) for line in timing.read_text().splitlines() if line.strip()]
    rows, summary = summarise(records, wall)
    summary.update(noop_repro_s=statistics.median(noop) if noop else None, noop_repro_runs_s=noop,
                   load_before=load_before, load_after=load_after, machine=machine(), params=a.params)
    print(f"\ndvc repro: {wall:.1f} s (load after {load_after})\n")
    print(table(["stage", "wall s", "imports", "config", "mlflow", "model load/save", "checkpoints",
                 "train", "eval", "generate", "other compute", "overhead"], rows))
    print("\ngenerating (posttrain.evaluation.scoring generate/sample, reward scoring): "
          f"{summary['phases_s']['generate']:.1f} s, "
          f"{summary['generate_share_pct']:.1f} % of the stages' wall time")
    print(f"\nDVC bookkeeping (DVC's wall less its stage processes'): {summary['dvc_bookkeeping_s']:.1f} s")
    print(f"orchestration overhead: {summary['overhead_s']:.1f} s of {summary['dvc_repro_wall_s']:.1f} s = "
          f"{summary['overhead_share_pct']:.1f} % (target < 10 %)")
    if noop:
        print(f"no-op dvc repro: {summary['noop_repro_s']:.1f} s (median of {len(noop)}: "
              f"{', '.join(f'{x:.1f}' for x in noop)}; target < 10 s)")
    if a.json:
        Path(a.json).write_text(json.dumps({"summary": summary, "rows": rows, "records": records}, indent=1))
    if not a.keep and not a.workdir:
        shutil.rmtree(path, ignore_errors=True)
    return summary


if __name__ == "__main__":
    main()
