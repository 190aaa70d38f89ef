"""Batched decoding for the steps that generate (evaluate's suites, rft's samples, distill's teacher answers,
align's policy pairs): prompts grouped by length, and finished rows dropped from the batch as they finish.

`model.generate` keeps every row of a batch in every forward pass until the last row ends, so a batch where
one answer runs to max_new_tokens and the others stop after a few tokens costs as much as if all ran long.
The `compact` engine runs the same greedy (or temperature) decoding step by step and, whenever rows hit eos,
selects the rest out of the batch and out of the KV cache (transformers' DynamicCache.batch_select_indices),
so later steps compute only unfinished rows. Greedy answers equal `model.generate`'s (tested). It decodes
plainly (argmax, or softmax at a temperature): logits processors a model's generation_config may add
(repetition_penalty, no_repeat_ngram_size, ...) are not applied. `hf` is the plain `model.generate` call, which
applies them, kept as the reference. params.yaml `defaults.decode` holds the choice; bench/generation.py
measures both against a plain generate loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch

from posttrain.evaluation.chat import encode_prompts, prompt_text


@dataclass(frozen=True)
class DecodeConfig:
    engine: Literal["compact", "hf"]  # compact: finished rows leave the batch and its KV cache | hf: model.generate
    sort_by_length: bool  # batch prompts of similar length together (less left padding), longest first


def length_batches(lengths: list[int], batch_size: int, sort: bool = True) -> list[list[int]]:
    """Indices in batches; sorted: of similar length, longest first (little padding, the memory peak at once)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort else list(range(len(lengths)))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def progress(total: int, desc: str):
    """A progress bar on stderr (prompts done, tokens/s in its postfix) for steps that generate or score."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="prompt", dynamic_ncols=True, leave=False)


def _stop_ids(tokenizer, model) -> list[int]:
    ids = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
    return sorted({ids} if isinstance(ids, int) else set(ids or []))


@torch.no_grad()
def compact_decode(model, input_ids, attention_mask, max_new_tokens: int, stop_ids: list[int],
                   temperature: float = 0.0) -> list[list[int]]:
    """New token ids per row (up to and including its stop token), greedy at temperature 0, else sampled
    from softmax(logits / temperature); rows leave the batch and its KV cache when they stop."""
    from transformers import DynamicCache

    n = input_ids.shape[0]
    out: list[list[int]] = [[] for _ in range(n)]
    if max_new_tokens <= 0 or n == 0:
        return out
    stops = torch.tensor(stop_ids, device=input_ids.device)
    rows = torch.arange(n, device=input_ids.device)  # which original row each live row is
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding: positions start at 0
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                   past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    next_position = positions[:, -1] + 1
    mask = attention_mask
    for step in range(max_new_tokens):
        logits = logits.float()
        if temperature > 0:
            token = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1).squeeze(-1)
        else:
            token = logits.argmax(-1)
        for row, t in zip(rows.tolist(), token.tolist()):
            out[row].append(t)
        if step == max_new_tokens - 1:
            break
        live = ~torch.isin(token, stops)
        if not live.all():
            if not live.any():
                break
            keep = live.nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            rows, token, mask, next_position = rows[keep], token[keep], mask[keep], next_position[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_position[:, None],
                       past_key_values=cache, use_cache=True).logits[:, -1]
        next_position = next_position + 1
    return out


@torch.no_grad()
def decode_prompts(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int,
                   decode: DecodeConfig, num_return_sequences: int = 1, temperature: float = 0.0,
                   desc: str = "generate", stats: dict | None = None) -> list[list[str]]:
    """`num_return_sequences` completions per chat prompt (lists of messages), greedy at temperature 0, else
    pure temperature sampling; batches of `batch_size` prompts, left-padded; a progress bar with tokens/s.
    `stats`, if given, receives new_tokens: the tokens generated, each row's up to and including its eos."""
    model.eval()
    k = num_return_sequences
    outputs: list[list[str]] = [[] for _ in prompts]
    stop_ids = _stop_ids(tokenizer, model)
    lengths = [len(prompt_text(tokenizer, p)) for p in prompts]
    start, tokens = time.perf_counter(), 0
    with progress(len(prompts), desc) as bar:
        for batch in length_batches(lengths, batch_size, decode.sort_by_length):
            enc = encode_prompts(tokenizer, [prompts[i] for i in batch], model.device)
            if decode.engine == "compact":
                ids, mask = enc["input_ids"], enc["attention_mask"]
                if k > 1:
                    ids, mask = ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
                new = compact_decode(model, ids, mask, max_new_tokens, stop_ids, temperature)
            else:
                sampling = ({"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
                            if temperature > 0 else {"do_sample": False})
                ids = model.generate(**enc, max_new_tokens=max_new_tokens, num_return_sequences=k,
                                     eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id, **sampling)
                new = [until_stop(row, stop_ids) for row in ids[:, enc["input_ids"].shape[1]:].tolist()]
            tokens += sum(map(len, new))
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            for j, i in enumerate(batch):
                outputs[i] = [t.strip() for t in texts[j * k : (j + 1) * k]]
            bar.update(len(batch))
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):.0f} tok/s")
    if stats is not None:
        stats["new_tokens"] = tokens
    return outputs


def until_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    """A generated row up to and including its first stop token (model.generate pads finished rows after it)."""
    for i, t in enumerate(ids):
        if t in stop_ids:
            return ids[: i + 1]
    return ids
