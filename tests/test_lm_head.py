"""The compact LM head returns what TRL's fused head returns (loss, per-token fields, gradients)."""

from __future__ import annotations

import pytest
import torch


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True))


def _batch(padding_free: bool):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    g = torch.Generator().manual_seed(3)
    rows = []
    for n, prompt in ((11, 4), (19, 8), (6, 2)):
        ids = torch.randint(3, 101, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free)(rows)


@pytest.mark.parametrize("padding_free", [False, True])
def test_compact_head_matches_trls_fused_head(padding_free):
    from trl.trainer.utils import add_fused_lm_head

    from posttrain.model.lm_head import add_compact_lm_head

    fused, compact = _model(), _model()
    for m in (fused, compact):
        add_fused_lm_head(m, outputs=("log_probs", "entropy", "is_top1"))
    add_compact_lm_head(compact)
    batch = _batch(padding_free)
    results = {}
    for name, m in (("fused", fused), ("compact", compact)):
        out = m(**batch, fused_lm_head=True)
        out.loss.backward()
        results[name] = (out, {n: p.grad for n, p in m.named_parameters()})
    (f, f_grads), (c, c_grads) = results["fused"], results["compact"]
    torch.testing.assert_close(c.loss, f.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c.log_probs, f.log_probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c.entropy, f.entropy, atol=1e-4, rtol=1e-4)
    assert torch.equal(c.is_top1.bool(), f.is_top1.bool()) and torch.equal(c.label_mask, f.label_mask)
    for name, grad in f_grads.items():
        torch.testing.assert_close(c_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_compact_head_leaves_the_plain_forward_alone():
    from trl.trainer.utils import add_fused_lm_head

    from posttrain.model.lm_head import add_compact_lm_head

    model = _model().eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    before = model(input_ids=ids).logits
    add_fused_lm_head(model)
    add_compact_lm_head(model)
    torch.testing.assert_close(model(input_ids=ids).logits, before)
    assert model(input_ids=ids, labels=ids).loss.isfinite()


def test_unknown_loss_head_is_refused():
    from posttrain.model.lm_head import resolve

    with pytest.raises(ValueError, match="loss_head must be one of"):
        resolve("liger")


def test_auto_means_the_fused_kernel_on_a_gpu_and_compact_on_cpu():
    from posttrain.model.lm_head import resolve

    assert resolve("auto", "cuda") == "fused" and resolve("auto", "cpu") == "compact"
    assert resolve("fused", "cpu") == "fused" and resolve("compact", "cuda") == "compact"
