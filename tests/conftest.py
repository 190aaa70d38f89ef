"""Shared test fixtures: the repo's own params.yaml shrunk to a tiny lifecycle that runs in seconds.

`tiny_params()` returns params.yaml with TINY merged over it; `make_workdir()` copies the code into a
temp dir with those params (so stages write data/, models/, metrics/ and an sqlite MLflow store
there, never into the checkout); `lifecycle` runs sample -> prepare -> base -> cpt -> sft once per
session in such a dir, for tests of later stages to start from.
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # importable with or without `pip install -e .`
CODE = ["stages", "posttrain", "profiles", "schemas", "flows", "configs", "data/feedback", "dvc.yaml", "pyproject.toml"]

# fp32: bf16 autocast costs more than it saves on models this small (the e2e test keeps precision: auto).
_TRAIN = {"max_steps": 6, "batch_size": 4, "logging_steps": 2, "save_steps": 3, "warmup_ratio": 0.0, "num_threads": 1,
          "precision": "fp32"}
TINY = {
    "sample": {"n_corpus_docs": 120, "n_instruction": 200, "n_refusal": 40, "n_cot": 80, "n_preference": 80,
               "n_prompts": 30},
    "prepare": {"mixture": {"size": 120}, "max_eval_per_suite": 20},
    "base": {"tokenizer": {"vocab_size": 320},
             "tiny": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 2,
                      "intermediate_size": 64, "max_position_embeddings": 256}},
    "cpt": {"train": dict(_TRAIN, max_length=64)},
    "sft": {"train": dict(_TRAIN, max_length=128)},
    "evaluate": {"max_per_suite": 6, "max_new_tokens": 8, "batch_size": 8, "num_threads": 1, "block_size": 32,
                 "benchmarks": {"gsm8k_embedded": {"limit": 4, "max_new_tokens": 8}, "arc_embedded": {"limit": 4}}},
    "reward": {"eval_batch_size": 8, "train": dict(_TRAIN, max_length=128)},
    "judge": {"eval_batch_size": 8, "train": dict(_TRAIN, max_length=128)},
    "align": {"min_reward_gap": 0.0, "generation": {"num_generations": 2, "max_completion_length": 8},
              "train": dict(_TRAIN, max_length=128)},
    "distill": {"max_prompts": 64, "max_new_tokens": 16, "gen_batch_size": 32,
                "student": {"tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 2,
                                     "intermediate_size": 32, "max_position_embeddings": 256}},
                "train": dict(_TRAIN, max_length=128),
                "eval": {"max_per_suite": 6, "max_new_tokens": 8, "block_size": 32, "batch_size": 8,
                         "samples_per_suite": 1, "speed_prompts": 4, "speed_rounds": 1}},
    "rft": {"max_prompts": 8, "num_samples": 2, "max_new_tokens": 16, "batch_size": 8, "max_eval": 6,
            "train": dict(_TRAIN, max_length=128)},
    # the gate's paired rules without the refusal floor: a model trained 6 steps refuses nothing, and a lineage test
    # should ship (sft at least: it is never significantly worse than itself); tests/test_gate.py tests the floors
    "export": {"gate": {"rules": [{"metric": m, "test": "not_worse"} for m in
                                  ("instruction_em", "cot_accuracy", "refusal_rate", "prefers_chosen", "win_rate")]}},
}


def tiny_params(**overrides) -> dict:
    """params.yaml with TINY and then `overrides` laid over it (posttrain.core.config.overlaid), a copy of its own."""
    from posttrain.core.config import overlaid

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params = overlaid(params, {k: v for k, v in TINY.items() if k in params})
    params["tracking"]["log_models"] = False
    return copy.deepcopy(overlaid(params, overrides))


def make_workdir(path: Path, params: dict | None = None) -> Path:
    """A copy of the repo's code at `path` with a tiny params.yaml; stages run from there."""
    path.mkdir(parents=True, exist_ok=True)
    for name in CODE:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, path / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy(src, path / name)
    (path / "params.yaml").write_text(yaml.safe_dump(params or tiny_params(), sort_keys=False))
    return path


def run_in_process(name: str, workdir: Path):
    """Run stage `name` in-process from `workdir` with that dir's params.yaml; return its metrics."""
    import importlib
    import typing

    from posttrain.core.config import load_config

    module = importlib.import_module(f"stages.{name}")
    cls = typing.get_type_hints(module.run)["cfg"]  # the stage's config class: what its run() takes
    old = os.getcwd()
    os.chdir(workdir)
    try:
        return module.run(load_config(name, cls, "params.yaml"))
    finally:
        os.chdir(old)


def write_evaluation(workdir: Path, outcomes: dict[str, dict[str, list]], extra: dict[str, dict] | None = None) -> dict:
    """metrics/evaluate.json and reports/evaluate_items.json as evaluate writes them, from per-item outcomes
    ({model: {metric: [1, 0, ...], "win_rate": [1.0, 0.5, ...]}}) and scalar `extra` columns (perplexity, params)."""
    import json

    from posttrain.evaluation.stats import rate

    table = {}
    for name, metrics in outcomes.items():
        scalars = dict((extra or {}).get(name, {}))
        params = scalars.pop("params", None)  # last, as in evaluate's table
        rates = {m: rate([bool(f) for f in flags]) for m, flags in metrics.items() if m != "win_rate"}
        row = {**scalars, **{m: r["value"] for m, r in rates.items()}}
        if "win_rate" in metrics:
            row["win_rate"] = sum(metrics["win_rate"]) / len(metrics["win_rate"])
        table[name] = {**row, **({"params": params} if params is not None else {}), "rates": rates}
    (workdir / "metrics").mkdir(exist_ok=True)
    (workdir / "reports").mkdir(exist_ok=True)
    (workdir / "metrics/evaluate.json").write_text(json.dumps(table))
    (workdir / "reports/evaluate_items.json").write_text(json.dumps(outcomes))
    return table


def flags(k: int, n: int) -> list[int]:
    """k passes out of n items, first k."""
    return [1] * k + [0] * (n - k)


# `make test-fast` runs `pytest -m "not lineage"`: the day-to-day loop without the tests that build a lineage, start
# servers, drive the browser or load SmolLM2 (they use one of these fixtures); `make test` runs every test.
LINEAGE_FIXTURES = {"lifecycle", "repo", "lifecycle_on_smollm2", "prefect_api", "server", "services"}


# The longest files (minutes each on 2 cores), longest first: pytest-xdist (--dist loadfile) hands files out in
# collection order, so these start at once and the short ones fill in around them, instead of one long file
# starting last while the other worker idles.
LONGEST_FIRST = ("test_lifecycle.py", "test_real_model.py", "test_resume.py", "test_multiprocess.py",
                 "test_team.py", "test_flows.py", "test_search.py", "test_kernels.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if LINEAGE_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("real_model"):
            item.add_marker(pytest.mark.lineage)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept within each


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path, monkeypatch):
    # Any stage a test runs logs to a store of its own, never the checkout's mlflow.db.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("LIFECYCLE_ID", "test")


@pytest.fixture(scope="session")
def lifecycle(tmp_path_factory):
    """sample -> prepare -> base -> cpt -> sft on the tiny settings, once per session (read-only for tests)."""
    workdir = make_workdir(tmp_path_factory.mktemp("lifecycle"))
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir}/mlflow.db"
    try:
        metrics = {s: run_in_process(s, workdir) for s in ("sample", "prepare", "base", "cpt", "sft")}
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
    return {"workdir": workdir, "metrics": metrics}
