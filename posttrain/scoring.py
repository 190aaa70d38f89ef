"""Scoring shared by the stages that measure models: perplexity, generation (posttrain.decoding), answer checks."""

from __future__ import annotations

import math
import re
import statistics
import time

import torch

from posttrain.chat import encode_prompts, prompt_and_answer_ids
from posttrain.decoding import DecodeConfig, decode_prompts

REFUSAL_MARKERS = ("i can't help", "i cannot help", "i can not help", "i won't help", "i'm sorry, but")


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], block_size: int, batch_size: int = 16) -> float:
    """Token-level perplexity of `texts` concatenated (eos between) and cut into full blocks."""
    model.eval()
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    n_blocks = len(ids) // block_size
    if n_blocks == 0:
        raise ValueError(f"eval text has {len(ids)} tokens, fewer than one block of {block_size}")
    blocks = torch.tensor(ids[: n_blocks * block_size]).view(n_blocks, block_size)
    total, count = 0.0, 0
    for i in range(0, n_blocks, batch_size):
        batch = blocks[i : i + batch_size].to(model.device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int,
             decode: DecodeConfig, desc: str = "generate") -> list[str]:
    """Greedy completions for chat prompts (lists of messages), decoded as params.yaml `defaults.decode` says."""
    return [k[0] for k in decode_prompts(model, tokenizer, prompts, max_new_tokens, batch_size, decode, desc=desc)]


def sample(model, tokenizer, prompts: list[list[dict]], k: int, temperature: float, max_new_tokens: int,
           batch_size: int, decode: DecodeConfig, desc: str = "sample") -> list[list[str]]:
    """k sampled completions (pure temperature sampling) per chat prompt."""
    return decode_prompts(model, tokenizer, prompts, max_new_tokens, batch_size, decode, num_return_sequences=k,
                          temperature=temperature, desc=desc)


def normalise(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def exact_match(prediction: str, answer: str) -> bool:
    return normalise(prediction) == normalise(answer)


def final_answer(text: str) -> str | None:
    """The value after the last '####' marker (GSM8K style), else None."""
    match = re.findall(r"####\s*(-?[\d.,]+)", text)
    return match[-1].replace(",", "").rstrip(".") if match else None


def is_refusal(text: str) -> bool:
    t = text.strip().lower()
    return any(t.startswith(m) or m in t[:80] for m in REFUSAL_MARKERS)


@torch.no_grad()
def answer_perplexity(model, tokenizer, prompts: list[list[dict]], answers: list[str], batch_size: int) -> float:
    """Perplexity of `answers` (the teacher's) given their prompts, on the answer tokens only."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(prompts), batch_size):
        ids, labels = [], []
        for p, a in zip(prompts[i: i + batch_size], answers[i: i + batch_size]):
            h, t = prompt_and_answer_ids(tokenizer, p, a)
            ids.append(h + t)
            labels.append([-100] * len(h) + t)
        width = max(map(len, ids))
        pad = tokenizer.pad_token_id
        x = torch.tensor([s + [pad] * (width - len(s)) for s in ids], device=model.device)
        y = torch.tensor([s + [-100] * (width - len(s)) for s in labels], device=model.device)
        # the mask by length: a tokenizer whose pad is its eos (SmolLM2) has eos tokens inside the prompts too
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in ids], device=model.device)
        logits = model(input_ids=x, attention_mask=mask).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y[:, 1:].reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        total += loss.item()
        count += int((y[:, 1:] != -100).sum())
    return float(torch.tensor(total / max(count, 1)).exp())


@torch.no_grad()
def generation_speed(models: dict, prompts, max_new_tokens: int, rounds: int) -> dict[str, float]:
    """Greedy tokens/s of each (model, tokenizer) on the same prompts, each generating exactly max_new_tokens.

    Rounds alternate between the models so that load from other processes hits them alike; the first
    round warms up and is dropped, the median of the others is kept.
    """
    batches = {}
    for name, (model, tok) in models.items():
        batches[name] = encode_prompts(tok, prompts, model.device)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds + 1):
        for name, (model, tok) in models.items():
            model.eval()
            start = time.perf_counter()
            model.generate(**batches[name], max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                           do_sample=False, pad_token_id=tok.pad_token_id)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: len(prompts) * max_new_tokens / statistics.median(t[1:]) for name, t in times.items()}
