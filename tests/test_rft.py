"""rft: samples are checked against the known answer, only right ones are trained on, shares are reported."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import make_workdir, run_in_process, tiny_params

from posttrain.core.files import digest


def workdir_from(src: Path, path: Path, **overrides) -> Path:
    make_workdir(path, tiny_params(**overrides))
    for name in ("data", "models"):
        shutil.copytree(src / name, path / name, dirs_exist_ok=True)
    return path


COT = "data/cot.jsonl"
# an sft model that has memorised four word problems well enough that most, not all, samples at
# temperature 1 are right (measured: 25 of 32; 100 steps got none right after the corpus changed)
MEMORISE = {"train_file": COT, "eval_file": COT,
            "train": {"max_steps": 200, "learning_rate": 1e-2, "batch_size": 4, "save_steps": 200}}
RFT = {"train_file": COT, "num_samples": 8, "temperature": 1.0, "max_new_tokens": 64}


def test_right_samples_are_kept_and_trained_on(lifecycle, tmp_path):
    wd = workdir_from(lifecycle["workdir"], tmp_path / "wd", sft=MEMORISE, rft=RFT)
    rows = [r for r in (wd / "data/processed/sft_train.jsonl").read_text().splitlines() if '"source": "cot"' in r]
    (wd / COT).write_text("\n".join(rows[:4]) + "\n")
    run_in_process("sft", wd)
    metrics = run_in_process("rft", wd)
    assert metrics["prompts"] == 4 and metrics["samples"] == 32
    assert 0 < metrics["correct"] < 32 and metrics["kept_share"] == metrics["correct"] / 32
    assert 0 < metrics["kept_distinct"] <= metrics["correct"] and metrics["trained"] is True
    assert metrics["replayed"] == min(4, metrics["kept_distinct"])  # replay 1.0 of a 4-row train_file
    assert 0 <= metrics["accuracy_before"] <= 1 and 0 <= metrics["accuracy_after"] <= 1
    assert metrics["accuracy_change"] == pytest.approx(metrics["accuracy_after"] - metrics["accuracy_before"])
    assert metrics["peak_memory_mb"] > 0 and metrics["train_loss"] > 0
    assert json.loads((wd / "metrics/rft.json").read_text())["correct"] == metrics["correct"]
    assert digest(wd / "models/rft/model.safetensors") != digest(wd / "models/sft/model.safetensors")


def test_nothing_right_leaves_the_sft_model_unchanged(lifecycle, tmp_path):
    wd = workdir_from(lifecycle["workdir"], tmp_path / "wd")  # the tiny sft model gets nothing right
    metrics = run_in_process("rft", wd)
    assert metrics["correct"] == 0 and metrics["kept_share"] == 0 and metrics["trained"] is False
    assert metrics["accuracy_change"] == 0
    assert digest(wd / "models/rft/model.safetensors") == digest(wd / "models/sft/model.safetensors")


def test_keep_correct_keeps_each_distinct_right_sample_once():
    from stages.rft import keep_correct

    prompt = [{"role": "user", "content": "Ada has 1 pen. Ada gets 2 more. How many pens?"}]
    kept = keep_correct([{"prompt": prompt, "answer": "3"}],
                        [["1 + 2 = 3.\n#### 3", "1 + 2 = 3.\n#### 3", "1 + 2 = 4.\n#### 4", "It is 3", "#### 3"]])
    assert kept == [{"prompt": prompt, "completion": [{"role": "assistant", "content": "1 + 2 = 3.\n#### 3"}]},
                    {"prompt": prompt, "completion": [{"role": "assistant", "content": "#### 3"}]}]


def test_a_train_file_without_checkable_answers_is_refused(lifecycle, tmp_path):
    wd = workdir_from(lifecycle["workdir"], tmp_path / "wd", rft={"train_file": "data/plain.jsonl"})
    row = {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello"}]}
    (wd / "data/plain.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r"\[rft.train_file\] data/plain.jsonl: no row has a completion with a '#### <answer>' final"):
        run_in_process("rft", wd)
    assert not (wd / "models/rft").exists() and not (wd / "metrics/rft.json").exists()
