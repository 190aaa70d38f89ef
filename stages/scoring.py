"""Scoring shared by the stages that measure models: perplexity, batched generation, answer checks."""

from __future__ import annotations

import math
import re

import torch

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


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy completions for chat prompts (lists of messages), batched with left padding."""
    model.eval()
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    for i in range(0, len(prompts), batch_size):
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                 for p in prompts[i : i + batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        outputs.extend(tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return [o.strip() for o in outputs]


@torch.no_grad()
def sample(model, tokenizer, prompts: list[list[dict]], k: int, temperature: float, max_new_tokens: int,
           batch_size: int) -> list[list[str]]:
    """k sampled completions (pure temperature sampling) per chat prompt, batched with left padding."""
    model.eval()
    tokenizer.padding_side = "left"
    out: list[list[str]] = []
    for i in range(0, len(prompts), batch_size):
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                 for p in prompts[i : i + batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        ids = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                             num_return_sequences=k, max_new_tokens=max_new_tokens,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        flat = tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        out += [[t.strip() for t in flat[j : j + k]] for j in range(0, len(flat), k)]
    return out


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
