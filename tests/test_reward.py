"""reward: the RewardTrainer learns a tiny preference set; LoRA saves the score head; bad pairs stop the stage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_workdir, run_in_process, tiny_params

from posttrain.data.readers import DataError


def workdir_from(lifecycle, path: Path, **overrides) -> Path:
    """A fresh workdir holding the lifecycle's data and models, with tiny params + `overrides`."""
    make_workdir(path, tiny_params(**overrides))
    for name in ("data", "models"):
        shutil.copytree(lifecycle["workdir"] / name, path / name, dirs_exist_ok=True)
    return path


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


OVERFIT = {"max_steps": 30, "learning_rate": 3e-3, "batch_size": 8, "save_steps": 100, "logging_steps": 5}


def small_set(workdir: Path, n: int = 8) -> str:
    rows = [json.loads(line) for line in (workdir / "data/processed/preference_train.jsonl").read_text().splitlines()]
    jsonl(workdir / "data/pairs.jsonl", rows[:n])
    return "data/pairs.jsonl"


def test_reward_model_learns_a_tiny_preference_set(lifecycle, tmp_path):
    from posttrain.model.loading import load_tokenizer
    from posttrain.model.reward_model import load_reward_model, pairwise, preference_rows

    wd = workdir_from(lifecycle, tmp_path / "wd", reward={"train_file": "data/pairs.jsonl",
                                                          "eval_file": "data/pairs.jsonl", "train": OVERFIT})
    small_set(wd)
    metrics = run_in_process("reward", wd)
    assert metrics["eval_accuracy"] == 1.0
    assert metrics["eval_margin"] > metrics["eval_margin_before"] + 1.0
    assert metrics["peak_memory_mb"] > 0 and metrics["tokens_per_s"] > 0
    assert json.loads((wd / "metrics/reward.json").read_text())["eval_accuracy"] == 1.0
    # the saved model scores the pairs as the stage did
    model, tok = load_reward_model(wd / "models/reward"), load_tokenizer(wd / "models/reward")
    again = pairwise(model, tok, preference_rows(str(wd / "data/pairs.jsonl")), batch_size=4,
                     max_length=128)
    assert again["margin"] == pytest.approx(metrics["eval_margin"], abs=1e-4)


def test_lora_reward_model_saves_its_score_head(lifecycle, tmp_path):
    from posttrain.model.loading import load_tokenizer
    from posttrain.model.reward_model import load_reward_model, pairwise, preference_rows

    wd = workdir_from(lifecycle, tmp_path / "wd", reward={"adapter": {"method": "lora"}, "train": {"max_steps": 4}})
    metrics = run_in_process("reward", wd)
    config = json.loads((wd / "models/reward/adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    assert config["base_model_name_or_path"] == "../sft"  # relative to the adapter's own folder
    assert 0 < metrics["trainable_share"] < 1
    model = load_reward_model(wd / "models/reward")
    again = pairwise(model, load_tokenizer(wd / "models/reward"),
                     preference_rows(str(wd / "data/processed/preference_eval.jsonl")), batch_size=8,
                     max_length=128)
    assert again["margin"] == pytest.approx(metrics["eval_margin"], abs=1e-4)


BAD_PAIRS = [
    {"prompt": "What is 2 plus 2?", "chosen": "4", "rejected": "5"},
    {"prompt": "What is 3 plus 3?", "chosen": "6", "rejected": "6"},
    {"chosen": "\n\nHuman: Hi\n\nAssistant: ", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away"},
    {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},
]


def test_bad_pairs_stop_the_stage_naming_file_and_row(lifecycle, tmp_path):
    wd = workdir_from(lifecycle, tmp_path / "wd", reward={"train_file": "data/bad.jsonl"})
    jsonl(wd / "data/bad.jsonl", BAD_PAIRS)
    proc = subprocess.run([sys.executable, "-m", "stages.reward"], cwd=wd, capture_output=True, text=True,
                          env=dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db"))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-4:] == [
        "data error: 3 data problems:",
        "  data/bad.jsonl line 2, column 'chosen, rejected': check 'chosen_ne_rejected' failed (value '6')",
        "  data/bad.jsonl line 3, column 'chosen': check 'non_empty' failed (value '')",
        "  data/bad.jsonl line 4, column 'chosen, rejected': check 'shared_prompt' failed (the two transcripts "
        "differ before their last '\\n\\nAssistant:', so they share no prompt)",
    ]
    assert not (wd / "models/reward").exists() and not (wd / "metrics/reward.json").exists()
    assert not (wd / "checkpoints").exists()


def test_empty_reply_in_prompt_chosen_rejected_layout_is_rejected(tmp_path):
    """Item 5 of the preference issue: empty sides are named like the other bad pairs."""
    from posttrain.data.readers import read_source

    path = jsonl(tmp_path / "pref.jsonl", [{"prompt": "p", "chosen": "fine", "rejected": "  "}])
    with pytest.raises(DataError) as e:
        read_source(path, "preference")
    assert str(e.value) == f"{path} line 1, column 'rejected': check 'non_empty' failed (value '  ')"
