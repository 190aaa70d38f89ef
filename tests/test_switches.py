"""Stages a user has no data or no use for: `enabled: false` passes the input model on without copying weights
and records `skipped`; downstream stages still run. A stage whose input is missing or empty stops with a config
error naming the key (never a traceback), and a failed start does not block the next run."""

from __future__ import annotations

import shutil

import pytest
from conftest import make_workdir, run_in_process, tiny_params

from posttrain.core.config import ConfigError


def workdir(lifecycle, path, models=None, **overrides):
    params = tiny_params(**overrides)
    if models:
        params["evaluate"]["models"] = models  # replaced, not merged
    work = make_workdir(path, params)
    for name in ("data/processed", "models/base"):
        shutil.copytree(lifecycle["workdir"] / name, work / name, dirs_exist_ok=True)
    return work


def test_switched_off_cpt_passes_base_on_and_sft_and_evaluate_still_run(lifecycle, tmp_path):
    from posttrain.model.loading import load_model

    work = workdir(lifecycle, tmp_path / "w", cpt={"enabled": False}, judge={"enabled": False},
                   models={"base": "models/base", "cpt": "models/cpt", "sft": "models/sft"},
                   evaluate={"reference": "base"})
    assert run_in_process("cpt", work) == {"skipped": True, "model": "models/base"}
    assert sorted(p.name for p in (work / "models/cpt").iterdir()) == ["passthrough.json"]  # no weights copied
    base, passed = load_model(work / "models/base"), load_model(work / "models/cpt")
    assert all((a == b).all() for a, b in zip(base.state_dict().values(), passed.state_dict().values()))

    sft = run_in_process("sft", work)  # trains on base through models/cpt
    assert sft["train_loss"] > 0 and (work / "models/sft/model.safetensors").exists()
    assert run_in_process("judge", work)["skipped"]  # no judge: its columns read n/a

    table = run_in_process("evaluate", work)
    assert {k: v for k, v in table["cpt"].items() if k != "rates"} == {k: v for k, v in table["base"].items()
                                                                       if k != "rates"}  # one model, scored once
    assert table["cpt"]["rates"]["cot_accuracy"]["p_vs_reference"] == 1.0  # the same answers as base
    assert table["sft"]["perplexity"] != table["base"]["perplexity"]
    assert table["sft"]["win_rate"] is None and "n/a" in (work / "reports/evaluate.md").read_text()


def test_align_needing_a_reward_model_names_the_key_when_reward_is_off(lifecycle, tmp_path):
    work = workdir(lifecycle, tmp_path / "w", reward={"enabled": False}, align={"pairs": "policy"})
    (work / "models/sft").mkdir(parents=True)
    run_in_process("reward", work)
    with pytest.raises(ConfigError, match=r"\[align.reward_model\] models/reward holds no reward model"):
        run_in_process("align", work)
    assert not (work / "models/align").exists()


def test_cpt_without_a_corpus_stops_with_a_config_error_and_the_fixed_run_is_not_blocked(lifecycle, tmp_path):
    work = workdir(lifecycle, tmp_path / "w")
    corpus = (work / "data/processed/corpus_train.jsonl").read_text()
    (work / "data/processed/corpus_train.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"\[cpt.train_file\] .* has no rows: add a source of kind corpus"):
        run_in_process("cpt", work)
    assert not (work / "models/cpt").exists() and not (work / "metrics/cpt.json").exists()
    (work / "data/processed/corpus_train.jsonl").write_text(corpus)  # fixed: other data, same checkpoint folder
    assert run_in_process("cpt", work)["perplexity_after"] > 0
