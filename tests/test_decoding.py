"""posttrain.evaluation.decoding: the compact engine gives model.generate's greedy answers while finished rows leave
the batch."""

from __future__ import annotations

import pytest
import torch

from posttrain.core.config import ConfigError, load_config
from posttrain.evaluation.decoding import DecodeConfig, compact_decode, decode_prompts, length_batches


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2)
    m = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(20)  # peaked logits: greedy choices far from ties, so batch shapes cannot flip them
    return m


def left_padded(rows: list[list[int]]):
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def until(row: list[int], stop: int) -> list[int]:
    return row[: row.index(stop) + 1] if stop in row else row


def test_compact_greedy_equals_generate_and_drops_finished_rows(model):
    ids, mask = left_padded([[5, 9, 13, 7], [3, 4], [20, 21, 22], [40, 41, 42, 43, 44, 45]])
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:].tolist()
    # a stop token that one row emits early and the others later or never: rows finish at different steps
    stop = next(t for t in free[0][1:6] if sum(t in r for r in free) < len(free))
    batch_sizes = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: batch_sizes.append(kw["input_ids"].shape[0]),
                                           with_kwargs=True)
    try:
        ours = compact_decode(model, ids, mask, 12, [stop])
    finally:
        hook.remove()
    theirs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                            eos_token_id=stop, pad_token_id=0)[:, ids.shape[1]:].tolist()
    assert ours == [until(r, stop) for r in theirs]
    assert any(len(r) < 12 for r in ours) and batch_sizes[0] == 4
    assert min(batch_sizes) < 4  # a finished row was dropped from later steps
    assert batch_sizes == sorted(batch_sizes, reverse=True)


def test_sampling_is_seeded_and_gives_k_per_prompt(lifecycle):
    from posttrain.model.loading import load_model, load_tokenizer

    sft = lifecycle["workdir"] / "models/sft"
    model, tok = load_model(sft), load_tokenizer(sft)
    prompts = [[{"role": "user", "content": "What is 2 plus 3?"}], [{"role": "user", "content": "Count the words.\n\nred"}]]
    cfg = DecodeConfig(engine="compact", sort_by_length=True)
    torch.manual_seed(1)
    a = decode_prompts(model, tok, prompts, 8, 2, cfg, num_return_sequences=3, temperature=1.0)
    torch.manual_seed(1)
    b = decode_prompts(model, tok, prompts, 8, 2, cfg, num_return_sequences=3, temperature=1.0)
    assert a == b and [len(x) for x in a] == [3, 3]
    greedy = decode_prompts(model, tok, prompts, 8, 2, cfg)
    hf = decode_prompts(model, tok, prompts, 8, 2, DecodeConfig(engine="hf", sort_by_length=False))
    assert greedy == hf  # the two engines agree on a trained model's greedy answers


def test_length_batches_sort_or_keep_order():
    assert length_batches([3, 9, 1, 7], 2) == [[1, 3], [0, 2]]
    assert length_batches([3, 9, 1, 7], 2, sort=False) == [[0, 1], [2, 3]]


def test_an_unknown_engine_stops_at_load(tmp_path):
    import yaml

    from stages.evaluate import EvaluateConfig

    params = yaml.safe_load(open("params.yaml"))
    params["defaults"]["decode"]["engine"] = "fast"
    with pytest.raises(ConfigError, match=r"\[evaluate.decode.engine\] must be one of \['compact', 'hf'\], got 'fast'"):
        load_config("evaluate", EvaluateConfig, params=params)
