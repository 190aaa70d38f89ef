"""Attention for padding-free (packed) training that costs what its examples cost: "sdpa_varlen".

TRL's padding-free collator (sft.packing) concatenates a batch's examples into one row, restarting
position_ids at each example and passing the boundaries as `cu_seq_lens_q`. With stock SDPA or eager,
transformers keeps the examples apart by building a dense block-diagonal mask over the whole row (only
when the forward runs without a KV cache, as TRL's trainer does), so a 8,192-token row pays attention over
8,192 x 8,192 positions. A varlen kernel pays only for each example: flash-attention-2 does on a GPU that has
it installed; "torch_varlen" is the same FlashAttention kernel as built into PyTorch (torch.nn.attention.varlen,
CUDA only, no extra package); "sdpa_varlen" runs PyTorch SDPA once per example slice, causal, on any device.
Neither depends on the cache flag. Anything that is not a packed training row (generation, a padded batch, decoding
with a cache) goes to transformers' own SDPA path unchanged.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect

import torch

VARLEN = "sdpa_varlen"
TORCH_VARLEN = "torch_varlen"


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


def torch_varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """A packed row through PyTorch's built-in FlashAttention varlen kernel, one call for all its examples."""
    from torch.nn.attention.varlen import varlen_attn

    packed_row = attention_mask is None and query.shape[0] == 1 and query.shape[2] == key.shape[2] > 1
    cu = kwargs.get("cu_seq_lens_q")
    if packed_row and cu is not None:  # TRL's collator: boundaries already on the GPU, no host sync per layer
        cu, longest = cu.to(torch.int32), kwargs.get("max_length_q")
        longest = int(longest) if longest is not None else int(cu.diff().max())
    elif packed_row and kwargs.get("position_ids") is not None:
        lengths = _segment_lengths(kwargs, query.shape[2])
        cu = torch.tensor([0, *lengths], device=query.device).cumsum(0).to(torch.int32)
        longest = max(lengths)
    # not a packed row, a CPU tensor (a model evaluated off the GPU) or dropout (the kernel takes none): SDPA
    if cu is None or not packed_row or not query.is_cuda or (dropout and module.training):
        return sdpa_varlen_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                     **kwargs)
    # (1, heads, L, d) -> (L, heads, d); FlashAttention runs in half precision only
    half = query.dtype if query.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    q, k, v = (t[0].transpose(0, 1).to(half) for t in (query, key, value))
    causal, takes_scale, takes_gqa = _varlen_signature()
    extra = dict(causal)
    if takes_scale:
        extra["scale"] = scaling
    elif scaling is not None and scaling != q.shape[-1] ** -0.5:  # torch 2.10's always scales by 1/sqrt(d)
        q = q * (scaling * q.shape[-1] ** 0.5)
    if q.shape[1] != k.shape[1]:  # grouped-query attention
        if takes_gqa:
            extra["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    out = varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, longest, longest, **extra)
    return out.to(query.dtype)[None], None


@functools.cache
def _varlen_signature() -> tuple[dict, bool, bool]:
    """How this torch's varlen_attn spells causal masking (2.10: is_causal; later: window_size), and whether it
    takes `scale` and `enable_gqa`."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    return causal, "scale" in params, "enable_gqa" in params


@functools.cache
def torch_varlen_problem() -> str | None:
    """Why torch_varlen cannot train here (None when it can): tried once, forward and backward, on the GPU."""
    if not torch.cuda.is_available():
        return "it needs a CUDA GPU (torch.cuda.is_available() is False)"
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (PyTorch 2.10 or newer has it)"
    from torch.nn.attention.varlen import varlen_attn

    try:
        q = torch.randn(12, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        cu = torch.tensor([0, 5, 12], device="cuda", dtype=torch.int32)
        varlen_attn(q, q, q, cu, cu, 7, 7, **_varlen_signature()[0]).sum().backward()
    except Exception as error:  # noqa: BLE001 - any failure means: not on this GPU / build
        return f"torch.nn.attention.varlen failed on this GPU: {type(error).__name__}: {error}"
    return None


def _varlen_mask(*args, attention_mask=None, **kwargs):
    """No 4D mask for a padding-free row (the attention splits it); transformers' SDPA mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, sdpa_varlen_attention)
    AttentionMaskInterface.register(VARLEN, _varlen_mask)
    AttentionInterface.register(TORCH_VARLEN, torch_varlen_attention)
    AttentionMaskInterface.register(TORCH_VARLEN, _varlen_mask)


def resolve(attention: str, packing: bool) -> str:
    """The attention implementation a training stage uses; `auto` picks a varlen kernel for packing:
    flash-attention-2 where installed on a GPU, else PyTorch's own varlen kernel on a GPU, else sdpa_varlen."""
    if attention == "auto":
        if not packing:
            return "sdpa"
        if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
        return TORCH_VARLEN if torch_varlen_problem() is None else VARLEN
    if attention == TORCH_VARLEN and torch_varlen_problem() is not None:
        raise ValueError(f"attention: {TORCH_VARLEN} cannot run here: {torch_varlen_problem()}. "
                         f"Use attention: auto (picks {VARLEN} without it) or {VARLEN}.")
    return attention


def set_attention(model, attention: str, packing: bool) -> str:
    """Switch `model` (a transformers or peft model) to the resolved implementation; returns its name."""
    name = resolve(attention, packing)
    if name in (VARLEN, TORCH_VARLEN):
        register()
    model.get_base_model().set_attn_implementation(name) if hasattr(model, "get_base_model") else \
        model.set_attn_implementation(name)
    return name
