"""Crash safety and determinism of the training stages: resume after a kill, refuse stale
checkpoints, atomic outputs, same seed -> same metrics."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import make_workdir, run_in_process, tiny_params

from posttrain.core.files import atomic_dir
from posttrain.train.training import StaleCheckpointError


def workdir_after_cpt(lifecycle, path: Path, **overrides) -> Path:
    """A fresh workdir holding the lifecycle's prepared data and base/cpt models."""
    make_workdir(path, tiny_params(**overrides))
    src = lifecycle["workdir"]
    for name in ("data/processed", "models/base", "models/cpt"):
        shutil.copytree(src / name, path / name, dirs_exist_ok=True)
    return path


def test_same_seed_gives_same_metrics(lifecycle, tmp_path):
    runs = [run_in_process("cpt", workdir_after_cpt(lifecycle, tmp_path / f"w{i}")) for i in range(2)]
    for key in ("train_loss", "perplexity_before", "perplexity_after"):
        assert runs[0][key] == runs[1][key], key


def test_atomic_dir_leaves_old_output_when_the_block_fails(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed")
    assert (out / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_checkpoint_half_written_when_killed_is_dropped_and_the_previous_one_resumed(tmp_path, monkeypatch):
    from posttrain.train.training import prepare_checkpoints

    monkeypatch.chdir(tmp_path)
    root = Path("checkpoints/sft")
    (root / "checkpoint-10").mkdir(parents=True)
    (root / "checkpoint-10/trainer_state.json").write_text('{"global_step": 10}')
    (root / "checkpoint-20").mkdir()  # killed after the weights, before trainer_state.json
    (root / "checkpoint-20/model.safetensors").write_text("partial")
    (root / "fingerprint.txt").write_text("fp")
    ckpt_dir, resume = prepare_checkpoints("sft", "fp")
    assert resume == str(root / "checkpoint-10")
    assert not (root / "checkpoint-20").exists()


def test_a_run_that_failed_before_its_first_checkpoint_does_not_block_the_next(tmp_path, monkeypatch):
    """A stage that stopped before any checkpoint (bad data, say) left only its fingerprint and maybe a cache:
    a re-run with other params starts afresh instead of being refused as stale."""
    from posttrain.train import training

    monkeypatch.chdir(tmp_path)
    root, resume = training.prepare_checkpoints("cpt", "fingerprint-of-the-failed-run")
    (root / "policy_pairs.jsonl").write_text("{}\n")  # a cache of the failed run: not valid for other params
    assert resume is None
    root, resume = training.prepare_checkpoints("cpt", "fingerprint-of-the-fixed-run")
    assert resume is None and (root / "fingerprint.txt").read_text() == "fingerprint-of-the-fixed-run"
    assert not (root / "policy_pairs.jsonl").exists()
    # with a complete checkpoint, other params are still refused
    (root / "checkpoint-3").mkdir()
    (root / "checkpoint-3" / "trainer_state.json").write_text("{}")
    with pytest.raises(StaleCheckpointError, match="made with different params or data"):
        training.prepare_checkpoints("cpt", "yet-other-params")
