"""distill: both methods train a smaller student that beats an untrained one; bad inputs write nothing."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_workdir, run_in_process, tiny_params

# The tiny lifecycle's models are barely trained (greedy answers are whitespace, which the stage drops), so
# the teacher here is its sft model overfitted on 16 examples (the `teacher` fixture): non-empty answers.
# The student: 1 layer of the same width.
STUDENT = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 32,
           "max_position_embeddings": 256, "tie_word_embeddings": True}
TRAIN = {"max_steps": 12, "learning_rate": 3e-3, "batch_size": 8, "logging_steps": 4, "save_steps": 100,
         "warmup_ratio": 0.0, "num_threads": 1, "max_length": 128}
EVAL = {"max_per_suite": 4, "max_new_tokens": 8, "block_size": 32, "batch_size": 8, "samples_per_suite": 1,
        "speed_prompts": 4, "speed_rounds": 1}


def distill_params(**overrides) -> dict:
    base = {"teacher": "models/teacher", "max_prompts": 64, "max_new_tokens": 16, "gen_batch_size": 32,
            "student": {"source": "tiny", "init": "random", "layers": "evenly", "tiny": STUDENT},
            "train": TRAIN, "eval": EVAL}
    return tiny_params(distill=_merge(base, overrides))


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture(scope="module")
def teacher(lifecycle, tmp_path_factory):
    """A copy of the lifecycle with models/teacher: its sft model overfitted on 16 sft examples."""
    wd = tmp_path_factory.mktemp("teacher")
    make_workdir(wd, tiny_params(sft={"model": "models/sft", "train_file": "data/small.jsonl",
                                      "out_dir": "models/teacher", "train": {**TRAIN, "max_steps": 60}}))
    for name in ("data", "models"):
        shutil.copytree(lifecycle["workdir"] / name, wd / name, dirs_exist_ok=True)
    rows = (wd / "data/processed/sft_train.jsonl").read_text().splitlines()[:16]
    (wd / "data/small.jsonl").write_text("\n".join(rows) + "\n")
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{wd}/mlflow.db"
    try:
        run_in_process("sft", wd)
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI") if old is None else os.environ.update(MLFLOW_TRACKING_URI=old)
    return wd


def workdir_from(src: Path, path: Path, **overrides) -> Path:
    """A fresh workdir with `src`'s data and models and tiny distill params + `overrides`."""
    make_workdir(path, distill_params(**overrides))
    for name in ("data", "models"):
        shutil.copytree(src / name, path / name, dirs_exist_ok=True)
    return path


def assert_distilled(wd: Path, metrics: dict, gain: float) -> None:
    # beats the untrained student on the teacher's own answers to the held-out prompts
    print({k: metrics[k] for k in ("teacher_answer_ppl", "teacher_answer_ppl_initial", "teacher_agreement")})
    assert metrics["teacher_answer_ppl"] < gain * metrics["teacher_answer_ppl_initial"]
    assert 0 < metrics["param_ratio"] < 1
    assert metrics["student"]["params"] < metrics["teacher"]["params"]
    assert set(metrics["student"]) == set(metrics["teacher"])
    assert metrics["teacher_tokens_per_s"] > 0 and metrics["student_tokens_per_s"] > 0
    assert json.loads((wd / "metrics/distill.json").read_text())["param_ratio"] == metrics["param_ratio"]
    assert "| student |" in (wd / "reports/distill.md").read_text()
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(wd / "models/distill")
    assert student.config.num_hidden_layers == 1
    assert not (wd / "checkpoints/distill").exists()


def test_sequence_distillation_beats_an_untrained_student(teacher, tmp_path):
    wd = workdir_from(teacher, tmp_path / "wd", method="sequence")
    metrics = run_in_process("distill", wd)
    assert metrics["method"] == "sequence" and metrics["n_train_rows"] > 0
    assert_distilled(wd, metrics, gain=0.5)


@pytest.mark.parametrize("share", [0.5, 1.0], ids=["gkd-mix", "on-policy"])
def test_logits_distillation_beats_an_untrained_student(teacher, tmp_path, share):
    # 0.5: GKDTrainer mixes the student's samples with the teacher's answers; 1.0: DistillationTrainer
    wd = workdir_from(teacher, tmp_path / "wd", method="logits",
                      logits={"on_policy_share": share, "temperature": 1.0, "beta": 0.5})
    metrics = run_in_process("distill", wd)
    assert metrics["method"] == "logits"
    assert_distilled(wd, metrics, gain=0.75)  # the bounded JSD moves a fresh student more slowly


def test_eval_prompts_are_not_distilled(teacher, tmp_path):
    from posttrain.core.config import load_config
    from stages.distill import DistillConfig, load_prompts

    wd = workdir_from(teacher, tmp_path / "wd", max_prompts=100000,
                      prompt_files=["data/processed/prompts.jsonl", "data/processed/eval_instruction.jsonl"])
    cfg = load_config("distill", DistillConfig, wd / "params.yaml")
    old = os.getcwd()
    os.chdir(wd)
    try:
        prompts = load_prompts(cfg)
    finally:
        os.chdir(old)
    held = {json.dumps(json.loads(line)["prompt"]) for line in
            (wd / "data/processed/eval_instruction.jsonl").read_text().splitlines()}
    assert prompts and not held & {json.dumps(p) for p in prompts}


def test_student_initialised_from_the_teacher_copies_its_layers(teacher):
    from posttrain.model.loading import load_model, load_tokenizer
    from posttrain.model.tiny import TinyModelConfig, build_tiny_model
    from posttrain.train.student_init import init_from_teacher
    from stages.distill import DistillError

    sft = teacher / "models/teacher"
    teacher, tok = load_model(sft), load_tokenizer(sft)
    same = TinyModelConfig(**{**STUDENT, "num_layers": teacher.config.num_hidden_layers,
                              "intermediate_size": teacher.config.intermediate_size})
    twin = build_tiny_model(same, tok)
    init_from_teacher(twin, teacher)  # same shape: an exact copy
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    assert torch.allclose(twin(input_ids=ids).logits, teacher(input_ids=ids).logits, atol=1e-5)
    small = build_tiny_model(TinyModelConfig(**STUDENT), tok)
    init_from_teacher(small, teacher)  # fewer layers, pruned MLP
    assert torch.equal(small.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(small.model.layers[0].self_attn.q_proj.weight, teacher.model.layers[0].self_attn.q_proj.weight)
    wide = build_tiny_model(TinyModelConfig(**{**STUDENT, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 4}), tok)
    with pytest.raises(DistillError, match="hidden_size"):
        init_from_teacher(wide, teacher)


def test_block_influence_keeps_the_layers_that_change_the_hidden_states_most(teacher):
    from types import SimpleNamespace

    from posttrain.model.loading import load_model, load_tokenizer
    from posttrain.model.tiny import TinyModelConfig
    from posttrain.train.student_init import StudentConfig, block_influence, build_student
    from stages.distill import DistillError

    sft = teacher / "models/teacher"
    teacher, tok = load_model(sft), load_tokenizer(sft)
    texts = ["Count the words.\n\nblue fox gold", "What is 2 plus 3?", "Sort the numbers.\n\n3 1 2"]
    influence = block_influence(teacher, tok, texts)
    assert len(influence) == teacher.config.num_hidden_layers and all(0 < b < 2 for b in influence)
    one_layer = StudentConfig("tiny", "teacher", "block_influence", TinyModelConfig(**{**STUDENT, "num_layers": 1}))
    cfg = SimpleNamespace(student=one_layer, seed=0, method="sequence", teacher=str(sft))
    student, _ = build_student(cfg, teacher, tok, texts)
    top = max(range(len(influence)), key=influence.__getitem__)
    kept, taken = student.model.layers[0].self_attn.q_proj.weight, teacher.model.layers[top].self_attn.q_proj.weight
    assert torch.equal(kept, taken)
    with pytest.raises(DistillError, match="calibration"):
        build_student(cfg, teacher, tok, [])


def assert_nothing_written(wd: Path) -> None:
    for out in ("models/distill", "metrics/distill.json", "reports/distill.md", "checkpoints/distill"):
        assert not (wd / out).exists(), out


def _no_distill_run() -> bool:
    import mlflow

    uri = os.environ["MLFLOW_TRACKING_URI"]  # this test's own store (mlflow's global URI may be another test's)
    client = mlflow.MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return not ids or not client.search_runs(ids, filter_string="tags.dvc_stage = 'distill'")


def test_missing_teacher_stops_with_a_clear_message(teacher, tmp_path):
    from stages.distill import DistillError

    wd = workdir_from(teacher, tmp_path / "wd", teacher="models/align")
    with pytest.raises(DistillError, match="distill.teacher 'models/align' not found"):
        run_in_process("distill", wd)
    assert_nothing_written(wd)
    assert _no_distill_run()


def test_empty_prompt_set_stops_with_a_clear_message(teacher, tmp_path):
    from stages.distill import DistillError

    wd = workdir_from(teacher, tmp_path / "wd", prompt_files=["data/processed/eval_cot.jsonl"])
    with pytest.raises(DistillError, match="prompt set is empty"):
        run_in_process("distill", wd)  # every prompt there is held out for evaluation
    assert_nothing_written(wd)
    wd2 = workdir_from(teacher, tmp_path / "wd2", prompt_files=["data/empty.jsonl"])
    (wd2 / "data/empty.jsonl").write_text("")
    with pytest.raises(DistillError, match="prompt set is empty"):
        run_in_process("distill", wd2)
    assert_nothing_written(wd2)
    assert _no_distill_run()


def test_logits_with_another_tokenizer_stops_before_training(teacher, tmp_path):
    from transformers import AutoTokenizer

    from stages.distill import DistillError

    wd = workdir_from(teacher, tmp_path / "wd", method="logits", student={"source": "models/other"})
    shutil.copytree(wd / "models/teacher", wd / "models/other", dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(wd / "models/other")
    tok.add_tokens(["<extra-token>"])
    tok.save_pretrained(wd / "models/other")
    with pytest.raises(DistillError, match="share the teacher's tokenizer"):
        run_in_process("distill", wd)
    assert_nothing_written(wd)
    assert _no_distill_run()


def test_a_teacher_with_only_empty_answers_stops(teacher, tmp_path):
    from transformers import AutoModelForCausalLM

    from stages.distill import DistillError

    wd = workdir_from(teacher, tmp_path / "wd", teacher="models/mute", max_prompts=16)
    mute = AutoModelForCausalLM.from_pretrained(wd / "models/teacher")
    torch.nn.init.zeros_(mute.model.norm.weight)  # all logits 0: greedy picks the pad token, decoded as ""
    mute.save_pretrained(wd / "models/mute")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(wd / "models/teacher" / f, wd / "models/mute")
    with pytest.raises(DistillError, match="gave an empty answer to every prompt"):
        run_in_process("distill", wd)
    assert_nothing_written(wd)
    assert _no_distill_run()


def test_cli_reports_bad_input_without_a_traceback(teacher, tmp_path):
    import subprocess
    import sys

    wd = workdir_from(teacher, tmp_path / "wd", teacher="models/nope")
    proc = subprocess.run([sys.executable, "-m", "stages.distill"], cwd=wd, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "distill: distill.teacher 'models/nope' not found" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert_nothing_written(wd)
