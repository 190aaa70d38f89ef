"""search: a budgeted search over fine-tuning setups for one stage, each trial a DVC experiment.

    python -m posttrain.tools.search sft --trials 12                       # method x rank/reduction x targets x lr
    python -m posttrain.tools.search sft --trials 12 --max-trainable 50000 --apply
    python -m posttrain.tools.search sft --enqueue method=lora,rank=8,targets=all,lr=1e-3   # a setup tried first

Optuna (multi-objective, TPE) proposes a setup: `adapter.method` (lora / dora / ia3 / bottleneck / full),
LoRA/DoRA rank or the bottleneck's reduction factor, the target modules (attn / mlp / all; for bottleneck
the placement: pfeiffer / houlsby) and the learning rate. Each trial is `dvc exp run --temp -S ...` of the stage
(upstream stages come from DVC's cache), so it is a DVC experiment (`dvc exp show`, `dvc exp apply <name>`)
with the stage's own MLflow run (nested under a lifecycle parent `search-<study>-t<n>`). The objectives are
the stage's held-out metric (sft, cpt: `eval_loss` of metrics/<stage>.json, minimised) and its trainable
parameters. A trial whose experiment fails is recorded as FAIL with the tail of its log, and the search goes on.
The study lives in `.search/<study>.db` (sqlite): a killed search, run again, resumes there (a trial it was
running is marked FAIL, "interrupted") and runs only what is left of `--trials`. One search per study at a time.

It prints the Pareto front (eval metric against trainable parameters), writes it to `.search/<study>/front.csv`
and `trials.csv` (`dvc plots show .search/<study>/trials.csv -x trainable_params -y value`) and front.png, and names
the best setup: the lowest metric among complete trials with at most `--max-trainable` trainable parameters.
`--apply` writes that setup into params.yaml (`<stage>.adapter.*`, `<stage>.train.learning_rate`; comments kept).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
TARGETS = {"attn": ATTN, "mlp": MLP, "all": ATTN + MLP}
PLACEMENTS = {"mlp": "pfeiffer", "all": "houlsby"}  # bottleneck: after the MLP only, or after attention and MLP
METRICS = {"sft": ("eval_loss", "minimize"), "cpt": ("eval_loss", "minimize")}
STATE_DIR = Path(".search")


class TrialFailed(RuntimeError):
    pass


# ---------------------------------------------------------------- a setup and its params.yaml overrides


def suggest(trial, space: dict) -> dict:
    """The setup of `trial` (define-by-run: a method's own knobs only)."""
    method = trial.suggest_categorical("method", space["methods"])
    setup = {"method": method}
    if method in ("lora", "dora"):
        setup["rank"] = trial.suggest_categorical("rank", space["ranks"])
    if method == "bottleneck":
        setup["reduction"] = trial.suggest_categorical("reduction", space["reductions"])
        setup["targets"] = trial.suggest_categorical("placement_targets", list(PLACEMENTS))
    elif method in ("lora", "dora", "ia3"):
        setup["targets"] = trial.suggest_categorical("targets", space["targets"])
    setup["lr"] = trial.suggest_float("lr", space["lr"][0], space["lr"][1], log=True)
    return setup


def overrides(stage: str, setup: dict) -> dict[str, object]:
    """params.yaml keys for `setup` (`++` in the -S syntax: set, or add to a stage's `adapter: {}`)."""
    a = f"{stage}.adapter"
    out: dict[str, object] = {f"{a}.method": setup["method"], f"{stage}.train.learning_rate": setup["lr"]}
    if "rank" in setup:
        out.update({f"{a}.lora_r": setup["rank"], f"{a}.lora_alpha": 2 * setup["rank"]})
    if setup["method"] == "bottleneck":
        out.update({f"{a}.reduction_factor": setup["reduction"], f"{a}.placement": PLACEMENTS[setup["targets"]]})
    elif "targets" in setup:
        out[f"{a}.target_modules"] = TARGETS[setup["targets"]]
    return out


def set_args(values: dict[str, object]) -> list[str]:
    def fmt(v):
        if isinstance(v, list):
            return "[" + ",".join(map(str, v)) + "]"
        return str(v).lower() if isinstance(v, bool) else str(v)

    return [f"++{k}={fmt(v)}" for k, v in values.items()]


def parse_setup(text: str) -> dict:
    """'method=lora,rank=8,targets=all,lr=1e-3' -> Optuna params (for enqueue_trial)."""
    raw = dict(kv.split("=", 1) for kv in text.split(","))
    params = {"method": raw["method"], "lr": float(raw["lr"])}
    if "rank" in raw:
        params["rank"] = int(raw["rank"])
    if "reduction" in raw:
        params["reduction"] = int(raw["reduction"])
    if "targets" in raw:
        params["placement_targets" if raw["method"] == "bottleneck" else "targets"] = raw["targets"]
    return params


def describe(setup: dict) -> str:
    parts = [setup["method"]]
    if "rank" in setup:
        parts.append(f"r={setup['rank']}")
    if "reduction" in setup:
        parts.append(f"rf={setup['reduction']}")
    if "targets" in setup:
        parts.append(PLACEMENTS[setup["targets"]] if setup["method"] == "bottleneck" else setup["targets"])
    parts.append(f"lr={setup['lr']:.2g}")
    return " ".join(parts)


# ---------------------------------------------------------------- one trial: one DVC experiment


def run_experiment(root: Path, stage: str, name: str, values: dict, env: dict, timeout: float | None) -> dict:
    """`dvc exp run --temp` of `stage` with `values`; the experiment's metrics/<stage>.json."""
    cmd = [sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", name, *[a for s in set_args(values)
                                                                          for a in ("-S", s)], stage]
    log = root / STATE_DIR / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        try:
            rc = subprocess.run(cmd, cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            raise TrialFailed(f"timed out after {timeout:g}s (log: {log})")
    if rc != 0:
        tail = log.read_text().strip().splitlines()[-6:]
        raise TrialFailed(f"dvc exp run exited {rc}: " + " | ".join(tail)[-1500:] + f" (log: {log})")
    ref = experiment_ref(root, name)
    text = subprocess.run(["git", "show", f"{ref}:metrics/{stage}.json"], cwd=root, capture_output=True,
                          text=True, check=True).stdout
    return {"ref": ref, **json.loads(text)}


def experiment_ref(root: Path, name: str) -> str:
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=root, capture_output=True,
                          text=True, check=True).stdout.split()
    found = [r for r in refs if r.endswith("/" + name)]
    if not found:
        raise TrialFailed(f"experiment {name} finished but no ref refs/exps/.../{name} was found")
    return found[-1]


def mlflow_run_id(uri: str, lifecycle: str, stage: str) -> str | None:
    try:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  f"tags.lifecycle = '{lifecycle}' and tags.dvc_stage = '{stage}'")
        return runs[0].info.run_id if runs else None
    except Exception:  # MLflow is never required: a trial stands on its DVC experiment
        return None


# ---------------------------------------------------------------- the study


def open_study(root: Path, study_name: str, seed: int):
    import optuna

    (root / STATE_DIR).mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{(root / STATE_DIR / f'{study_name}.db').resolve()}"
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=4)
    study = optuna.create_study(study_name=study_name, storage=storage, directions=["minimize", "minimize"],
                                sampler=sampler, load_if_exists=True)
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        # a killed search left it running: its experiment never finished
        study._storage.set_trial_user_attr(t._trial_id, "error", "interrupted (the search was killed)")
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
    return study


def search(root: str | Path, stage: str, trials: int, space: dict, study_name: str | None = None, seed: int = 0,
           enqueue: list[dict] | None = None, trial_timeout: float | None = None, metric: str | None = None,
           direction: str | None = None, log=print):
    import optuna

    root = Path(root).resolve()
    study_name = study_name or stage
    metric, direction = (metric, direction or "minimize") if metric else METRICS.get(stage, (None, None))
    if metric is None:
        raise SystemExit(f"search: no default held-out metric for stage {stage!r}: pass --metric and --direction")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(root, study_name, seed)
    if study.user_attrs.get("stage", stage) != stage:
        raise SystemExit(f"search: study {study_name} searches {study.user_attrs['stage']}, not {stage}")
    study.set_user_attr("stage", stage)
    study.set_user_attr("metric", metric)
    sign = 1.0 if direction == "minimize" else -1.0
    done = [t for t in study.trials if t.state.is_finished()]
    if not done:
        for params in enqueue or []:
            study.enqueue_trial(params)
    left = trials - len(done)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"
    log(f"[search] {stage}: study {study_name} in {STATE_DIR}/{study_name}.db, {len(done)} trial(s) done, "
        f"{max(left, 0)} to run")

    def objective(trial):
        setup = suggest(trial, space)
        trial.set_user_attr("setup", setup)
        name = f"{study_name}-t{trial.number}"
        lifecycle = f"search-{name}"
        env = dict(os.environ, MLFLOW_TRACKING_URI=uri, LIFECYCLE_ID=lifecycle, PYTHONUNBUFFERED="1")
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        start = time.perf_counter()
        log(f"[search] trial {trial.number}: {describe(setup)}")
        try:
            m = run_experiment(root, stage, name, overrides(stage, setup), env, trial_timeout)
        except TrialFailed as e:
            trial.set_user_attr("error", str(e))
            log(f"[search] trial {trial.number} FAILED: {str(e)[:300]}")
            raise
        finally:
            trial.set_user_attr("wall_s", round(time.perf_counter() - start, 1))
        trial.set_user_attr("experiment", name)
        trial.set_user_attr("mlflow_run_id", mlflow_run_id(uri, lifecycle, stage))
        value = m.get(metric)
        if value is None:
            raise TrialFailed(f"metrics/{stage}.json of {name} has no {metric!r}")
        trial.set_user_attr("metric", value)
        log(f"[search] trial {trial.number}: {metric}={value:.4f}, trainable={m['trainable_params']}")
        return sign * float(value), float(m["trainable_params"])

    if left > 0:
        study.optimize(objective, n_trials=left, catch=(TrialFailed,))
    return study


# ---------------------------------------------------------------- the results


def rows(study) -> list[dict]:
    import optuna

    front = {t.number for t in study.best_trials}
    out = []
    for t in study.trials:
        row = {"trial": t.number, "state": t.state.name, "setup": describe(t.user_attrs["setup"])
               if "setup" in t.user_attrs else "", "value": t.user_attrs.get("metric"),
               "trainable_params": int(t.values[1]) if t.values else None, "pareto": t.number in front,
               "experiment": t.user_attrs.get("experiment", ""), "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
               "wall_s": t.user_attrs.get("wall_s"), "error": t.user_attrs.get("error", "")}
        if t.state != optuna.trial.TrialState.COMPLETE:
            row["value"] = None
        out.append(row)
    return out


def best_under(study, max_trainable: int | None):
    """The complete trial with the best metric among those within the parameter budget (None if none)."""
    import optuna

    ok = [t for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
          if max_trainable is None or t.values[1] <= max_trainable]
    return min(ok, key=lambda t: t.values[0]) if ok else None


def report(study, root: Path, max_trainable: int | None, log=print) -> dict:
    root = Path(root)
    table = rows(study)
    out_dir = root / STATE_DIR / study.study_name
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = ["trial", "state", "setup", "value", "trainable_params", "pareto", "experiment", "mlflow_run_id",
              "wall_s", "error"]
    for name, selected in (("trials.csv", table), ("front.csv", [r for r in table if r["pareto"]])):
        with (out_dir / name).open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(sorted(selected, key=lambda r: (r["trainable_params"] is None, r["trainable_params"] or 0)))
    metric = study.user_attrs.get("metric", "value")
    log(f"\n| trial | setup | {metric} | trainable params | Pareto | experiment |\n| --- | --- | --- | --- | --- | --- |")
    for r in sorted(table, key=lambda r: (r["value"] is None, r["trainable_params"] or 0)):
        value = f"{r['value']:.4f}" if r["value"] is not None else r["state"]
        log(f"| {r['trial']} | {r['setup']} | {value} | {r['trainable_params'] or ''} | "
            f"{'*' if r['pareto'] else ''} | {r['experiment']} |")
    failed = [r for r in table if r["state"] == "FAIL"]
    for r in failed:
        log(f"trial {r['trial']} failed: {r['error'][:300]}")
    _plot(table, out_dir / "front.png", metric)
    best = best_under(study, max_trainable)
    budget = f"<= {max_trainable} trainable params" if max_trainable is not None else "any size"
    if best is None:
        log(f"\nno complete trial within {budget}")
    else:
        log(f"\nbest setup ({budget}): trial {best.number}, {describe(best.user_attrs['setup'])}: "
            f"{metric}={best.user_attrs['metric']:.4f}, {int(best.values[1])} trainable params, "
            f"experiment {best.user_attrs.get('experiment')}")
    log(f"(front: {out_dir / 'front.csv'}, {out_dir / 'front.png'}; all trials: {out_dir / 'trials.csv'})")
    return {"rows": table, "best": best}


def _plot(table: list[dict], path: Path, metric: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    done = [r for r in table if r["value"] is not None]
    if not done:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r["trainable_params"] for r in done], [r["value"] for r in done], c="lightgray", label="trials")
    front = sorted((r for r in done if r["pareto"]), key=lambda r: r["trainable_params"])
    ax.plot([r["trainable_params"] for r in front], [r["value"] for r in front], "o-", label="Pareto front")
    for r in front:
        ax.annotate(r["setup"].rsplit(" lr=", 1)[0], (r["trainable_params"], r["value"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(metric)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def apply(root: Path, stage: str, setup: dict) -> dict:
    """Write `setup` into params.yaml as `dvc exp run -S` would (comments kept)."""
    from dvc.utils.hydra import apply_overrides

    values = overrides(stage, setup)
    apply_overrides(str(Path(root) / "params.yaml"), set_args(values))
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m posttrain.tools.search", description=__doc__.split("\n\n")[0])
    p.add_argument("stage", help="the stage to search (sft, cpt; others with --metric)")
    p.add_argument("--trials", type=int, default=12, help="trials in all, those done before a resume included")
    p.add_argument("--methods", default="lora,dora,ia3,bottleneck,full")
    p.add_argument("--ranks", default="4,8,16,32")
    p.add_argument("--reductions", default="4,8,16,32")
    p.add_argument("--targets", default="attn,mlp,all")
    p.add_argument("--lr", default="1e-4,3e-3", help="log-uniform range min,max")
    p.add_argument("--enqueue", action="append", default=[], help="a setup tried first: method=lora,rank=8,"
                   "targets=all,lr=1e-3 (repeatable; only when the study is new)")
    p.add_argument("--max-trainable", type=int, default=None, help="the parameter budget the best setup must fit")
    p.add_argument("--apply", action="store_true", help="write the best setup into params.yaml")
    p.add_argument("--study", default=None, help="study name (default: the stage); .search/<study>.db")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trial-timeout", type=float, default=None, help="seconds; a slower trial fails")
    p.add_argument("--metric", default=None, help="key of metrics/<stage>.json (default: eval_loss for sft/cpt)")
    p.add_argument("--direction", choices=("minimize", "maximize"), default=None)
    a = p.parse_args(argv)
    lr = [float(x) for x in a.lr.split(",")]
    space = {"methods": a.methods.split(","), "ranks": [int(x) for x in a.ranks.split(",")],
             "reductions": [int(x) for x in a.reductions.split(",")], "targets": a.targets.split(","), "lr": lr}
    root = Path.cwd()
    start = time.perf_counter()
    study = search(root, a.stage, a.trials, space, study_name=a.study, seed=a.seed,
                   enqueue=[parse_setup(s) for s in a.enqueue], trial_timeout=a.trial_timeout, metric=a.metric,
                   direction=a.direction)
    print(f"[search] {time.perf_counter() - start:.0f}s this run")
    result = report(study, root, a.max_trainable)
    if a.apply:
        if result["best"] is None:
            print("search: nothing to apply", file=sys.stderr)
            return 1
        values = apply(root, a.stage, result["best"].user_attrs["setup"])
        print("params.yaml: " + ", ".join(f"{k}={v}" for k, v in values.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
