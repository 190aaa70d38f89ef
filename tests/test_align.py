"""align: every method trains end to end and moves its metric the right way; the reference is the sft
model (also when sft is itself a LoRA adapter) and, with LoRA, no second copy of the weights exists."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_workdir, run_in_process, tiny_params

from posttrain.core.config import ConfigError, load_config
from posttrain.data.readers import DataError


def workdir_from(src: Path, path: Path, **overrides) -> Path:
    """A fresh workdir holding `src`'s data and models, with tiny params + `overrides`."""
    make_workdir(path, tiny_params(**overrides))
    for name in ("data", "models"):
        shutil.copytree(src / name, path / name, dirs_exist_ok=True)
    return path


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_in_fixture(stage: str, workdir: Path):
    """run_in_process from a module fixture (the per-test MLflow isolation is not active there)."""
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir}/mlflow.db"
    try:
        return run_in_process(stage, workdir)
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="module")
def trained(lifecycle, tmp_path_factory):
    """The lifecycle plus a reward model and an 8-pair set to overfit."""
    wd = workdir_from(lifecycle["workdir"], tmp_path_factory.mktemp("align"))
    run_in_fixture("reward", wd)
    rows = (wd / "data/processed/preference_train.jsonl").read_text().splitlines()[:8]
    (wd / "data/pairs.jsonl").write_text("\n".join(rows) + "\n")
    return wd


# ---------------------------------------------------------------- every method, end to end

FAST = {"max_steps": 16, "batch_size": 8, "learning_rate": 5e-3, "logging_steps": 4, "save_steps": 100}
OFFLINE = {"train_file": "data/pairs.jsonl", "eval_file": "data/pairs.jsonl", "pairs": "data", "sft_weight": 0.0,
           "train": FAST}
ONLINE = {"train": dict(FAST, max_steps=32, learning_rate=1e-2),
          "generation": {"num_generations": 4, "max_completion_length": 8, "temperature": 1.0}}


@pytest.mark.parametrize("method, key, better", [
    ("dpo", "rewards/margins", "up"),
    ("kto", "loss", "down"),
    ("orpo", "log_odds_ratio", "up"),
    ("grpo", "reward", "up"),
    ("rloo", "reward", "up"),
])
def test_each_method_trains_and_moves_its_metric(trained, tmp_path, method, key, better):
    settings = OFFLINE if method in ("dpo", "kto", "orpo") else ONLINE
    wd = workdir_from(trained, tmp_path / "wd", align={"method": method, **settings})
    metrics = run_in_process("align", wd)
    first, last = metrics[f"train_{key}_first"], metrics[f"train_{key}_last"]
    assert (last > first) if better == "up" else (last < first), (key, first, last)
    assert metrics["method"] == method and metrics["peak_memory_mb"] > 0
    assert (wd / "models/align/adapter_config.json").exists()
    if method == "dpo":
        assert metrics["eval_loss"] < math.log(2) and metrics["eval_rewards/accuracies"] > 0.5


def test_policy_pairs_are_the_models_samples_ranked_by_the_reward_model(trained, tmp_path):
    wd = workdir_from(trained, tmp_path / "wd", align={
        "method": "dpo", "pairs": "policy", "train_file": "data/pairs.jsonl", "eval_file": "data/pairs.jsonl",
        "generation": {"num_generations": 3, "max_completion_length": 8}, "train": {"max_steps": 2}})
    metrics = run_in_process("align", wd)
    assert metrics["policy_prompts"] == 8 and 0 < metrics["policy_pairs"] <= 8 and metrics["policy_pair_gap"] > 0
    assert metrics["train_loss"] > 0 and (wd / "models/align/adapter_config.json").exists()


def test_policy_pairs_keep_only_prompts_the_reward_model_tells_apart(trained, tmp_path):
    from posttrain.model.reward_model import preference_rows
    from stages.align import AlignConfig, policy_pairs

    wd = workdir_from(trained, tmp_path / "wd", align={"pairs": "policy", "min_reward_gap": 1e6})
    cfg = load_config("align", AlignConfig, params=yaml.safe_load((wd / "params.yaml").read_text()))
    rows = preference_rows(str(wd / "data/pairs.jsonl"))
    old = os.getcwd()
    os.chdir(wd)
    try:
        with pytest.raises(ValueError, match=r"pairs: policy: no prompt of data/processed/preference_train.jsonl "
                                             r"gave two samples whose rewards differ by more than min_reward_gap"):
            policy_pairs(cfg, rows, tmp_path / "pairs.jsonl")
    finally:
        os.chdir(old)
    assert not (tmp_path / "pairs.jsonl").exists()  # nothing cached: a rerun with other settings starts clean


# ---------------------------------------------------------------- the reference model


@pytest.fixture(scope="module")
def lora_chain(lifecycle, tmp_path_factory):
    """sft trained as a LoRA adapter over cpt: the case where a wrong reference would be the cpt model."""
    wd = workdir_from(lifecycle["workdir"], tmp_path_factory.mktemp("chain"),
                      sft={"adapter": {"method": "lora"}, "train": {"learning_rate": 3e-2}},
                      align={"method": "dpo", **OFFLINE})
    run_in_fixture("sft", wd)
    assert (wd / "models/sft/adapter_config.json").exists()
    rows = (wd / "data/processed/preference_train.jsonl").read_text().splitlines()[:8]
    (wd / "data/pairs.jsonl").write_text("\n".join(rows) + "\n")
    return wd


def batch(tokenizer, path: Path, n: int = 4) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
    texts = [tokenizer.apply_chat_template(r["prompt"] + r["chosen"], tokenize=False) for r in rows]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@torch.no_grad()
def logps(model, enc) -> torch.Tensor:
    """Per-token log-probabilities of the batch under `model` (padding zeroed)."""
    model.eval()
    logits = model(**enc).logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, enc["input_ids"][:, 1:, None])[..., 0]
    return lp * enc["attention_mask"][:, 1:]


def trainer_for(wd: Path, monkeypatch, adapter: str):
    from stages.align import AlignConfig, build_trainer, load_data

    monkeypatch.chdir(wd)
    cfg = load_config("align", AlignConfig, "params.yaml")
    cfg = dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, method=adapter))
    return build_trainer(cfg, wd / "checkpoints/align", load_data(cfg))


def test_lora_reference_is_the_sft_model_with_the_adapter_off_and_no_copy(lora_chain, monkeypatch):
    from trl.trainer.utils import use_adapter

    from posttrain.model.loading import load_model, load_tokenizer

    trainer = trainer_for(lora_chain, monkeypatch, "lora")
    sft, cpt = load_model("models/sft"), load_model("models/cpt")
    enc = batch(load_tokenizer("models/sft"), Path("data/pairs.jsonl"))
    policy = trainer.model
    # TRL's own reference path: no ref model, no "ref" adapter -> the policy with its adapter disabled
    assert trainer.ref_model is None and "ref" not in policy.peft_config
    frozen = sum(p.numel() for p in policy.parameters() if not p.requires_grad)
    assert frozen == sum(p.numel() for p in sft.parameters())  # one copy of the weights, not two
    want = logps(sft, enc)
    assert not torch.allclose(want, logps(cpt, enc), atol=1e-3)  # sft's adapter matters: cpt is not sft

    trainer.train()
    policy = trainer.accelerator.unwrap_model(policy, keep_fp32_wrapper=False)  # fp32 again, as sft was scored
    with use_adapter(policy, adapter_name=None):
        assert torch.allclose(logps(policy, enc), want, atol=1e-5)
    assert not torch.allclose(logps(policy, enc), want, atol=1e-3)  # and the policy itself did move


def test_full_reference_is_the_merged_sft_model(lora_chain, monkeypatch):
    from posttrain.model.loading import load_model, load_tokenizer

    trainer = trainer_for(lora_chain, monkeypatch, "full")
    enc = batch(load_tokenizer("models/sft"), Path("data/pairs.jsonl"))
    assert trainer.ref_model is not None
    ref = trainer.accelerator.unwrap_model(trainer.ref_model, keep_fp32_wrapper=False)  # fp32, as sft is scored
    assert torch.allclose(logps(ref, enc), logps(load_model("models/sft"), enc), atol=1e-5)
    assert not torch.allclose(logps(ref, enc), logps(load_model("models/cpt"), enc), atol=1e-3)


def test_align_stage_chains_its_adapter_onto_sft_without_touching_it(lora_chain, tmp_path):
    from posttrain.core.files import digest
    from posttrain.model.loading import load_model, load_tokenizer

    wd = workdir_from(lora_chain, tmp_path / "wd", sft={"adapter": {"method": "lora"}},
                      align={"method": "dpo", **OFFLINE})
    before = digest(wd / "models/sft")
    metrics = run_in_process("align", wd)
    assert digest(wd / "models/sft") == before
    config = json.loads((wd / "models/align/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "../sft"
    assert metrics["train_rewards/margins_last"] > metrics["train_rewards/margins_first"]
    enc = batch(load_tokenizer(wd / "models/sft"), wd / "data/pairs.jsonl")
    aligned, sft = load_model(wd / "models/align"), load_model(wd / "models/sft")
    assert not torch.allclose(logps(aligned, enc), logps(sft, enc), atol=1e-3)


# ---------------------------------------------------------------- bad input


def test_bad_pairs_stop_align_before_anything_is_written(trained, tmp_path):
    wd = workdir_from(trained, tmp_path / "wd", align={"train_file": "data/bad.jsonl"})
    jsonl(wd / "data/bad.jsonl", [{"prompt": "What is 2 plus 2?", "chosen": "4", "rejected": "5"},
                                  {"prompt": "Hi", "chosen": "", "rejected": "Go away"}])
    with pytest.raises(DataError, match=r"^data/bad.jsonl line 2, column 'chosen': check 'non_empty' failed"):
        run_in_process("align", wd)
    assert not (wd / "models/align").exists() and not (wd / "metrics/align.json").exists()
    assert not (wd / "checkpoints").exists()


def test_online_batch_must_hold_whole_groups():
    from stages.align import AlignConfig

    params = tiny_params(align={"method": "grpo", "generation": {"num_generations": 3}})
    with pytest.raises(ConfigError, match=r"\[align.train\] batch_size \* grad_accum \(4 \* 1\) must be a multiple "
                                          r"of generation.num_generations \(3\) for grpo"):
        load_config("align", AlignConfig, params=params)


def test_verifiable_reward():
    from stages.align import verifiable_reward

    completions = [[{"role": "assistant", "content": "3 + 4 = 7.\n#### 7"}],
                   [{"role": "assistant", "content": "#### 8"}],
                   [{"role": "assistant", "content": "Blue red."}],
                   [{"role": "assistant", "content": "anything"}]]
    assert verifiable_reward(prompts=[None] * 4, completions=completions, answer=["7", "7", "blue red", None]) == [
        1.0, 0.0, 1.0, None]


# ---------------------------------------------------------------- evaluate: judged by the reward model


def test_evaluate_judges_aligned_against_sft(trained, tmp_path):
    wd = workdir_from(trained, tmp_path / "wd", align={"method": "dpo", **OFFLINE})
    params = yaml.safe_load((wd / "params.yaml").read_text())
    params["evaluate"]["models"] = {"sft": "models/sft", "aligned": "models/align"}  # replaced, not merged
    params["evaluate"]["reward_model"] = "models/reward"  # this fixture trains reward, not judge
    (wd / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_in_process("align", wd)
    table = run_in_process("evaluate", wd)
    assert table["sft"]["win_rate"] == 0.5 and table["sft"]["kl_to_ref"] == 0.0
    assert 0 <= table["aligned"]["win_rate"] <= 1 and table["aligned"]["kl_to_ref"] > 0
    assert all(isinstance(table[m]["reward_score"], float) for m in table)
    header = (wd / "plots/evaluate.csv").read_text().splitlines()[0]
    assert "reward_score,win_rate,kl_to_ref" in header
    assert "win_rate: share of those prompts where it beats sft's answer" in (wd / "reports/evaluate.md").read_text()
    aligned = table["aligned"]["rates"]["win_rate"]
    assert aligned["low"] <= table["aligned"]["win_rate"] <= aligned["high"] and aligned["n"] == 6
    assert aligned["diff_vs_reference"] == pytest.approx(table["aligned"]["win_rate"] - 0.5)
    assert 0 < aligned["p_vs_reference"] <= 1 and "p_vs_reference" not in table["sft"]["rates"]["win_rate"]


def test_win_rate_interval_and_sign_test():
    from posttrain.evaluation.report import win_rate_stats

    all_won = win_rate_stats([1.0] * 10, is_reference=False)
    assert all_won["value"] == all_won["low"] == all_won["high"] == 1.0
    assert all_won["p_vs_reference"] == pytest.approx(2 * 0.5**10)  # 10 wins, 0 losses: two-sided exact
    even = win_rate_stats([1.0, 0.0] * 10 + [0.5] * 5, is_reference=False)
    assert even["value"] == 0.5 and even["p_vs_reference"] == 1.0 and even["low"] < 0.5 < even["high"]
    assert even["n"] == 25


def test_win_rate_counts_ties_half_and_kl_of_a_model_to_itself_is_zero(lifecycle):
    from posttrain.evaluation.suites import kl_along, win_rate
    from posttrain.model.loading import load_model, load_tokenizer

    assert win_rate([1.0, 0.0, 2.0, 3.0], [0.0, 1.0, 2.0, 1.0]) == 0.625
    wd = lifecycle["workdir"]
    tok, sft, cpt = load_tokenizer(wd / "models/sft"), load_model(wd / "models/sft"), load_model(wd / "models/cpt")
    prompts = [[{"role": "user", "content": "What is 2 plus 3?"}], [{"role": "user", "content": "Hi"}]]
    answers = ["5", "Hello there"]
    assert kl_along(sft, sft, tok, prompts, answers, batch_size=2) == pytest.approx(0.0, abs=1e-6)
    one_by_one = [kl_along(sft, cpt, tok, [p], [a], batch_size=1) for p, a in zip(prompts, answers)]
    assert kl_along(sft, cpt, tok, prompts, answers, batch_size=2) == pytest.approx(sum(one_by_one) / 2, rel=1e-4)
    assert min(one_by_one) > 0
