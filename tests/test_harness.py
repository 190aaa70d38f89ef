"""posttrain.train.harness: the training stages' shared life (checkpoints, clear-on-failure, the model made trainable).

The stages' own tests (test_training, test_switches, test_methods, test_rft, test_reward, test_align,
test_distill) run the harness end to end; these pin its parts on a two-layer model and an empty stage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from posttrain.core.config import AdapterConfig, TrackingConfig
from posttrain.core.stages_registry import names
from posttrain.train.harness import TrainingStage, make_trainable


@dataclass(frozen=True)
class _Cfg:
    seed: int
    tracking: TrackingConfig
    out_dir: str


def _stage(tmp_path, monkeypatch) -> TrainingStage:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.txt").write_text("rows")
    return TrainingStage("demo", _Cfg(seed=0, tracking=TrackingConfig(uri="", experiment="x", log_models=False), out_dir="out"))


def _adapter(method: str) -> AdapterConfig:
    return AdapterConfig(method=method, freeze_train_top_k=1, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                         target_modules=["q_proj", "v_proj"], num_virtual_tokens=4)


def _tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2))


def test_a_fresh_run_that_cannot_start_leaves_no_checkpoint_folder(tmp_path, monkeypatch):
    stage = _stage(tmp_path, monkeypatch)
    assert stage.checkpoints({"data": "data.txt"}).resolve() == (tmp_path / "checkpoints/demo").resolve()
    assert stage.resume is None
    with pytest.raises(ValueError), stage.cleared_on_failure(ValueError):
        raise ValueError("no pair")
    assert not (tmp_path / "checkpoints" / "demo").exists()


def test_other_errors_and_resumed_runs_keep_their_checkpoints(tmp_path, monkeypatch):
    stage = _stage(tmp_path, monkeypatch)
    stage.checkpoints({"data": "data.txt"})
    with pytest.raises(KeyError), stage.cleared_on_failure(ValueError):  # not the error the step expects
        raise KeyError("crash")
    assert (tmp_path / "checkpoints/demo/fingerprint.txt").exists()

    done = tmp_path / "checkpoints/demo/checkpoint-2"
    done.mkdir()
    (done / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    resumed = TrainingStage("demo", stage.cfg)
    resumed.checkpoints({"data": "data.txt"})
    assert Path(resumed.resume).resolve() == done.resolve()
    with pytest.raises(ValueError), resumed.cleared_on_failure(ValueError):
        raise ValueError("no pair")
    assert done.exists()  # a resumed run never loses its checkpoint


def test_make_trainable_freezes_wraps_or_hands_the_peft_config_to_the_trainer():
    full = make_trainable(_tiny_lm(), _adapter("full"))
    assert all(p.requires_grad for p in full.parameters())

    frozen = make_trainable(_tiny_lm(), _adapter("freeze"))
    trains = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert trains and all(n.startswith(("model.layers.1.", "model.norm")) for n in trains)

    lora = make_trainable(_tiny_lm(), _adapter("lora"))
    assert hasattr(lora, "peft_config")
    assert {n for n, p in lora.named_parameters() if p.requires_grad} == {
        n for n, _ in lora.named_parameters() if "lora_" in n}

    model, pc = make_trainable(_tiny_lm(), _adapter("lora"), trainer_applies_peft=True)
    assert not hasattr(model, "peft_config") and pc.r == 4  # TRL wraps it (and keeps the reference adapter-off)
    model, pc = make_trainable(_tiny_lm(), _adapter("full"), trainer_applies_peft=True)
    assert pc is None


def test_make_trainable_trains_and_saves_a_new_head():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    def classifier():
        return LlamaForSequenceClassification(LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, num_labels=1, pad_token_id=0))

    frozen = make_trainable(classifier(), _adapter("freeze"), task_type="SEQ_CLS", head="score")
    assert frozen.score.weight.requires_grad and not frozen.model.layers[0].self_attn.q_proj.weight.requires_grad
    lora = make_trainable(classifier(), _adapter("lora"), task_type="SEQ_CLS", head="score")
    assert "score" in lora.peft_config["default"].modules_to_save


TRAINING_STAGES = names(trains=True)


@pytest.mark.parametrize("name", TRAINING_STAGES)
def test_each_training_stage_names_itself_once_and_runs_through_the_harness(name):
    import ast

    source = (Path(__file__).parents[1] / "stages" / f"{name}.py").read_text()
    literals = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Constant) and n.value == name]
    assert len(literals) == 1, f"stages/{name}.py spells '{name}' {len(literals)} times"
    assert "TrainingStage(" in source or "train_reward_model(" in source
    for private in ("prepare_checkpoints(", "train_with_resume(", "clear_checkpoints(", "get_peft_model("):
        assert private not in source, f"stages/{name}.py calls {private} itself: the harness does"


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).parents[1] / "stages").glob("*.py")
                                         if p.stem != "__init__"))
def test_stage_modules_stay_short(name):
    lines = (Path(__file__).parents[1] / "stages" / f"{name}.py").read_text().splitlines()
    assert len(lines) <= 200, f"stages/{name}.py has {len(lines)} lines: move library code into posttrain/"
