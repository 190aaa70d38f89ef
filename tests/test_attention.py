"""sdpa_varlen (and torch_varlen on a GPU): a packed (padding-free) batch trains exactly like the padded one, and
nothing else changes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_workdir, run_in_process, tiny_params


def _model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                         attention_dropout=0.0)
    return LlamaForCausalLM(config)


def _examples():
    g = torch.Generator().manual_seed(1)
    rows = []
    for n, prompt in ((9, 3), (23, 10), (5, 2), (16, 6)):
        ids = torch.randint(3, 97, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})  # loss on the completion
    return rows


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_packed_batch_trains_exactly_like_the_padded_batch():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from posttrain.model.attention import set_attention, torch_varlen_problem

    rows = _examples()
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(rows)
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed

    # Called with the model's default use_cache, where stock SDPA lets packed examples see each other
    # (transformers builds its block mask only without a cache): a varlen path that fell back would fail here.
    model = _model().train()
    loss_padded, grads_padded = _loss_and_grads(model, padded)
    # on a GPU machine auto picks torch_varlen, which hands a CPU model's packed rows to sdpa_varlen
    assert set_attention(model, "auto", packing=True) == ("sdpa_varlen" if torch_varlen_problem() else "torch_varlen")
    loss_packed, grads_packed = _loss_and_grads(model, packed)

    assert loss_packed == pytest.approx(loss_padded, abs=1e-5)
    for name, grad in grads_padded.items():
        torch.testing.assert_close(grads_packed[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch_varlen is PyTorch's FlashAttention: CUDA only")
def test_torch_varlen_packed_batch_trains_like_the_padded_batch_on_a_gpu():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from posttrain.model.attention import set_attention, torch_varlen_problem

    assert torch_varlen_problem() is None
    rows = _examples()

    def on_gpu(batch):  # the padding-free batch also holds ints (max_length_q / max_length_k)
        return {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}

    padded = on_gpu(DataCollatorForLanguageModeling(pad_token_id=0)(rows))
    packed = on_gpu(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows))
    model = _model().to("cuda", torch.bfloat16).train()  # GQA: 4 query heads, 2 key/value heads
    loss_padded, grads_padded = _loss_and_grads(model, padded)
    assert set_attention(model, "auto", packing=True) == "torch_varlen"
    loss_packed, grads_packed = _loss_and_grads(model, packed)

    assert loss_packed == pytest.approx(loss_padded, rel=2e-2)  # bf16: FlashAttention and SDPA round differently
    for name, grad in grads_padded.items():
        torch.testing.assert_close(grads_packed[name], grad, atol=2e-2, rtol=5e-2, msg=name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU error")
def test_torch_varlen_without_a_gpu_stops_sft_before_anything_is_written(lifecycle, tmp_path):
    import shutil

    workdir = make_workdir(tmp_path / "w", tiny_params(sft={"packing": True, "attention": "torch_varlen",
                                                            "out_dir": "models/sft_tv"}))
    shutil.copytree(lifecycle["workdir"] / "data", workdir / "data", dirs_exist_ok=True)
    shutil.copytree(lifecycle["workdir"] / "models" / "cpt", workdir / "models" / "cpt", dirs_exist_ok=True)
    with pytest.raises(ValueError, match=r"attention: torch_varlen cannot run here: it needs a CUDA GPU"):
        run_in_process("sft", workdir)
    assert not (workdir / "models/sft_tv").exists() and not (workdir / "metrics/sft.json").exists()
    assert not (workdir / "checkpoints/sft").exists() and not (tmp_path / "mlflow.db").exists()  # no MLflow run


def test_torch_varlen_hands_a_cpu_models_packed_rows_to_sdpa_varlen():
    """On a GPU machine `auto` picks torch_varlen before the Trainer moves the model; a model still on the CPU
    (evaluated or scored there) must not reach the CUDA-only kernel (NotImplementedError on the H100)."""
    from posttrain.model.attention import TORCH_VARLEN, register

    model = _model().eval()
    seqs = [torch.randint(3, 97, (n,)) for n in (7, 12, 4)]
    with torch.no_grad():
        alone = [model(input_ids=s[None]).logits[0] for s in seqs]
        register()
        model.set_attn_implementation(TORCH_VARLEN)  # what auto resolves to on a GPU machine
        ids = torch.cat(seqs)[None]
        positions = torch.cat([torch.arange(len(s)) for s in seqs])[None]
        packed = model(input_ids=ids, position_ids=positions).logits[0].split([7, 12, 4])
    for a, b in zip(alone, packed):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_packed_rows_without_cu_seq_lens_are_split_by_position_ids():
    from posttrain.model.attention import set_attention

    model = _model().eval()
    seqs = [torch.randint(3, 97, (n,)) for n in (7, 12, 4)]
    with torch.no_grad():
        alone = [model(input_ids=s[None]).logits[0] for s in seqs]
        set_attention(model, "auto", packing=True)
        ids = torch.cat(seqs)[None]
        positions = torch.cat([torch.arange(len(s)) for s in seqs])[None]
        packed = model(input_ids=ids, position_ids=positions).logits[0].split([7, 12, 4])
    for a, b in zip(alone, packed):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_generation_is_unchanged_by_the_switch():
    from posttrain.model.attention import set_attention

    model = _model().eval()
    prompts = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    before = model.generate(prompts, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    set_attention(model, "auto", packing=True)
    after = model.generate(prompts, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(before, after)


def test_auto_without_packing_keeps_stock_sdpa():
    from posttrain.model.attention import set_attention

    model = _model()
    assert set_attention(model, "auto", packing=False) == "sdpa"
    assert model.config._attn_implementation == "sdpa"


def test_an_unknown_attention_is_refused_at_load(tmp_path):
    from posttrain.core.config import ConfigError, load_config
    from stages.sft import SFTStageConfig

    workdir = make_workdir(tmp_path / "w", tiny_params(sft={"attention": "flash"}))
    with pytest.raises(ConfigError, match=r"sft.attention"):
        load_config("sft", SFTStageConfig, workdir / "params.yaml")


def test_sft_stage_with_packing_trains_and_saves_a_loadable_model(lifecycle, tmp_path):
    import shutil

    from posttrain.model.loading import load_model

    workdir = make_workdir(tmp_path / "w", tiny_params(sft={"packing": True, "out_dir": "models/sft_packed"}))
    shutil.copytree(lifecycle["workdir"] / "data", workdir / "data", dirs_exist_ok=True)
    shutil.copytree(lifecycle["workdir"] / "models" / "cpt", workdir / "models" / "cpt", dirs_exist_ok=True)
    metrics = run_in_process("sft", workdir)
    assert metrics["eval_loss"] < metrics["eval_loss_before"]
    config = json.loads((workdir / "models/sft_packed/config.json").read_text())
    assert "sdpa_varlen" not in json.dumps(config)  # a later stage's process needs no registration to load it
    assert load_model(workdir / "models/sft_packed") is not None
