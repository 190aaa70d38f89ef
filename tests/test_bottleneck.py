"""adapter.method=bottleneck (posttrain.model.bottleneck): the count the planner uses, an unchanged model at the start,
save/reload with the same logits, the Trainer's resume, the sft stage on the tiny lineage, a later stage over the
chain, and the refusals (full over a bottleneck, plain weights for export)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from conftest import make_workdir, run_in_process, tiny_params

from posttrain.core.config import AdapterConfig, StageError
from posttrain.model import bottleneck
from posttrain.model.loading import is_adapter_dir, load_for_training, load_model, load_tokenizer
from posttrain.train.harness import make_trainable
from posttrain.train.memory.estimate import shape_of, trainable_params

ADAPTER = AdapterConfig(method="bottleneck", freeze_train_top_k=1, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                        target_modules=["q_proj", "v_proj"], num_virtual_tokens=4, reduction_factor=4,
                        placement="houlsby", nonlinearity="relu")


def _tiny_lm(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2)).eval()


IDS = torch.tensor([[1, 5, 7, 9, 3, 2]])


@pytest.mark.parametrize("placement,insertions", [("houlsby", 4), ("pfeiffer", 2)])
def test_trainable_count_is_the_formula_and_the_model_starts_unchanged(placement, insertions):
    adapter = replace(ADAPTER, placement=placement)
    model = _tiny_lm()
    with torch.no_grad():
        before = model(IDS).logits
    model = make_trainable(model, adapter)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    h, w = 16, 16 // 4
    assert trainable == insertions * (2 * h * w + w + h)  # down + up weights, their biases
    assert trainable == trainable_params(shape_of(model.config), "bottleneck", adapter)  # what the planner counts
    assert all(not p.requires_grad for n, p in model.named_parameters() if "bottlenecks" not in n)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, before)  # up-projection starts at zero


def test_saved_adapter_reloads_with_the_same_logits_and_trains(tmp_path):
    model = make_trainable(_tiny_lm(), replace(ADAPTER, nonlinearity="gelu"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    _tiny_lm().save_pretrained(tmp_path / "base")
    bottleneck.point_at(model, "../base")
    model.save_pretrained(tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["adapter_config.json", bottleneck.WEIGHTS]
    meta = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert meta["peft_type"] == "BOTTLENECK" and meta["nonlinearity"] == "gelu" and meta["placement"] == "houlsby"
    assert is_adapter_dir(tmp_path / "adapter")
    reloaded = load_model(tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(IDS).logits, model.eval()(IDS).logits, atol=1e-6)
    # a loaded bottleneck is frozen and cannot be written as plain weights (export, a reward backbone)
    assert not any(p.requires_grad for n, p in reloaded.named_parameters() if "bottlenecks" in n)
    with pytest.raises(bottleneck.BottleneckNotMergeable, match="cannot be merged"):
        reloaded.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain").exists()
    # full fine-tuning over it is refused; another bottleneck stacks on top and saves only itself
    with pytest.raises(StageError, match="cannot be merged"):
        load_for_training(tmp_path / "adapter", replace(ADAPTER, method="full"))
    stacked = make_trainable(load_for_training(tmp_path / "adapter", ADAPTER), replace(ADAPTER, placement="pfeiffer"))
    assert sum(p.numel() for p in stacked.parameters() if p.requires_grad) == 2 * (2 * 16 * 4 + 4 + 16)


def test_trainer_checkpoint_resumes_the_adapter(tmp_path):
    """A killed stage resumes: the Trainer reads a non-peft checkpoint's model.safetensors (non-strict)."""
    from transformers import Trainer, TrainingArguments

    model = make_trainable(_tiny_lm(), ADAPTER)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "bottlenecks" in n:
                p.add_(0.1)
    trainer = Trainer(model=model, args=TrainingArguments(str(tmp_path), report_to=[], use_cpu=True))
    trainer._save(str(tmp_path / "checkpoint-3"))
    assert (tmp_path / "checkpoint-3" / bottleneck.WEIGHTS).exists()
    fresh = make_trainable(_tiny_lm(), ADAPTER)
    Trainer(model=fresh, args=TrainingArguments(str(tmp_path), report_to=[], use_cpu=True))._load_from_checkpoint(
        str(tmp_path / "checkpoint-3"))
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(IDS).logits, model.eval()(IDS).logits, atol=1e-6)


def test_reward_models_are_refused_clearly():
    with pytest.raises(StageError, match="reward"):
        make_trainable(_tiny_lm(), ADAPTER, task_type="SEQ_CLS", head="score")


# ---------------------------------------------------------------- the tiny lineage


def test_sft_stage_trains_a_bottleneck_and_a_later_stage_loads_the_chain(lifecycle, tmp_path):
    adapter = {"method": "bottleneck", "reduction_factor": 8, "placement": "houlsby", "nonlinearity": "relu"}
    params = tiny_params(sft={"adapter": adapter, "train": {"max_steps": 6, "save_steps": 3, "learning_rate": 5e-3}})
    work = make_workdir(tmp_path / "w", params)
    for name in ("data/processed", "models/base", "models/cpt"):
        shutil.copytree(lifecycle["workdir"] / name, work / name, dirs_exist_ok=True)
    metrics = run_in_process("sft", work)
    out = work / "models/sft"
    hidden, layers = params["base"]["tiny"]["hidden_size"], params["base"]["tiny"]["num_layers"]
    width = hidden // 8
    assert metrics["method"] == "bottleneck"
    assert metrics["trainable_params"] == 2 * layers * (2 * hidden * width + width + hidden)
    assert metrics["eval_loss"] < metrics["eval_loss_before"]
    assert bottleneck.is_bottleneck_dir(out) and (out / bottleneck.WEIGHTS).exists()
    assert not (out / "model.safetensors").exists()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "../cpt"

    # a later stage (sft again, LoRA) trains over the chain cpt <- sft(bottleneck); its output loads through it
    (work / "models/sft").rename(work / "models/sft_bn")
    params2 = tiny_params(sft={"model": "models/sft_bn", "adapter": {"method": "lora", "lora_r": 4, "lora_alpha": 8},
                               "train": {"max_steps": 2, "save_steps": 100}})
    (work / "params.yaml").write_text(__import__("yaml").safe_dump(params2, sort_keys=False))
    later = run_in_process("sft", work)
    assert later["method"] == "lora"
    model, tokenizer = load_model(work / "models/sft"), load_tokenizer(work / "models/sft")
    assert bottleneck.carries(model)  # the bottleneck is in the loaded model, the LoRA merged
    ids = tokenizer("Sort the numbers.", return_tensors="pt")
    with torch.no_grad():
        assert model(**ids).logits.isfinite().all()
    assert is_adapter_dir(work / "models/sft")
