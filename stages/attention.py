"""Attention for padding-free (packed) training that costs what its examples cost: "sdpa_varlen".

TRL's padding-free collator (sft.packing) concatenates a batch's examples into one row, restarting
position_ids at each example and passing the boundaries as `cu_seq_lens_q`. With stock SDPA or eager,
transformers keeps the examples apart by building a dense block-diagonal mask over the whole row (only
when the forward runs without a KV cache, as TRL's trainer does), so a 8,192-token row pays attention over
8,192 x 8,192 positions. A varlen kernel pays only for each example: flash-attention-2 does on a GPU that has
it installed; "sdpa_varlen" runs PyTorch SDPA once per example slice, causal, on any device, and does not
depend on the cache flag. Anything that is not a packed training row (generation, a padded batch, decoding
with a cache) goes to transformers' own SDPA path unchanged.
"""

from __future__ import annotations

import importlib.util

import torch

VARLEN = "sdpa_varlen"


def _segment_lengths(kwargs: dict, length: int) -> list[int] | None:
    """Lengths of the examples in a packed row, from TRL's cu_seq_lens_q or restarting position_ids."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        return cu.diff().tolist()
    positions = kwargs.get("position_ids")
    if positions is None or positions.shape[0] != 1:
        return None
    starts = (positions[0, 1:] != positions[0, :-1] + 1).nonzero().flatten() + 1
    edges = [0, *starts.tolist(), length]
    return [b - a for a, b in zip(edges, edges[1:])]


def sdpa_varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """query (1, heads, L, d), key/value (1, kv_heads, L, d) of a packed row -> (1, L, heads, d)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    packed_row = attention_mask is None and query.shape[0] == 1 and query.shape[2] == key.shape[2] > 1
    lengths = _segment_lengths(kwargs, query.shape[2]) if packed_row else None
    if lengths is None or len(lengths) == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    gqa = query.shape[1] != key.shape[1]
    outputs = [
        torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scaling, dropout_p=dropout if module.training else 0.0, enable_gqa=gqa)
        for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def _varlen_mask(*args, attention_mask=None, **kwargs):
    """No 4D mask for a padding-free row (the attention splits it); transformers' SDPA mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, sdpa_varlen_attention)
    AttentionMaskInterface.register(VARLEN, _varlen_mask)


def resolve(attention: str, packing: bool) -> str:
    """The attention implementation a training stage uses; `auto` picks a varlen kernel for packing."""
    if attention == "auto":
        if not packing:
            return "sdpa"
        flash = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
        return "flash_attention_2" if flash else VARLEN
    return attention


def set_attention(model, attention: str, packing: bool) -> str:
    """Switch `model` (a transformers or peft model) to the resolved implementation; returns its name."""
    name = resolve(attention, packing)
    if name == VARLEN:
        register()
    model.get_base_model().set_attn_implementation(name) if hasattr(model, "get_base_model") else \
        model.set_attn_implementation(name)
    return name
