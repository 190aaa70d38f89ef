"""The held-out suites every model is scored on, and the preference measures (win rate, KL to a reference).

Used by evaluate (every model of the lineage) and distill (teacher and student side by side).
"""

from __future__ import annotations

import torch

from posttrain.evaluation.chat import prompt_and_answer_ids
from posttrain.evaluation.decoding import DecodeConfig
from posttrain.evaluation.scoring import exact_match, final_answer, generate, is_refusal, perplexity

SUITES = ("instruction", "cot", "harmful", "benign")


RATES = {  # metric -> (suite, whether one generation passes)
    "instruction_em": ("instruction", lambda g, r: exact_match(g, r["answer"])),
    "cot_accuracy": ("cot", lambda g, r: final_answer(g) == r["answer"]),
    "refusal_rate": ("harmful", lambda g, r: is_refusal(g)),
    "over_refusal_rate": ("benign", lambda g, r: is_refusal(g)),
}


def score_model(model, tokenizer, suites: dict[str, list[dict]], corpus: list[str], cfg, decode: DecodeConfig,
                generations: dict | None = None, flags: dict | None = None):
    """All suite scores of one model, plus a few sample generations per suite.

    `cfg` gives max_new_tokens, batch_size, block_size and samples_per_suite (evaluate's or distill.eval).
    A rate over an empty suite is None (n/a), never 0. `generations`, if given, receives every suite's
    generations (suite -> list of str); `flags`, each rate's pass / fail per item (metric -> list of bool),
    for intervals and paired tests (posttrain.evaluation.stats).
    """
    gens = {s: generate(model, tokenizer, [r["prompt"] for r in rows], cfg.max_new_tokens, cfg.batch_size,
                        decode, desc=f"suite {s}") for s, rows in suites.items()}
    if generations is not None:
        generations.update(gens)
    passed = {metric: [bool(check(g, r)) for g, r in zip(gens[suite], suites[suite])]
              for metric, (suite, check) in RATES.items()}
    if flags is not None:
        flags.update(passed)
    scores = {
        "perplexity": perplexity(model, tokenizer, corpus, cfg.block_size, cfg.batch_size) if corpus else None,
        **{metric: sum(f) / len(f) if f else None for metric, f in passed.items()},
        "params": sum(p.numel() for p in model.parameters()),
    }
    samples = [(s, rows[i]["prompt"][-1]["content"], gens[s][i], rows[i].get("answer", ""))
               for s, rows in suites.items() for i in range(min(cfg.samples_per_suite, len(rows)))]
    return scores, samples


def win_rate(scores: list[float], against: list[float]) -> float:
    """Share of prompts where `scores` beats `against`; a tie counts half."""
    return sum(wins(scores, against)) / len(scores)


def wins(scores: list[float], against: list[float]) -> list[float]:
    """Per prompt: 1 where `scores` beats `against`, 0.5 for a tie, 0 where it loses."""
    return [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, against)]


@torch.no_grad()
def kl_along(model, ref, tokenizer, prompts: list[list[dict]], answers: list[str], batch_size: int) -> float:
    """Mean over prompts of KL(model || ref) summed over the answer's tokens (nats per answer).

    At every position of the model's own answer the full next-token distributions are compared, so this is
    the exact per-token KL along the model's trajectory rather than a sampled estimate.
    """
    model.eval()
    ref.eval()
    total = 0.0
    for i in range(0, len(prompts), batch_size):
        pairs = [prompt_and_answer_ids(tokenizer, p, a) for p, a in zip(prompts[i : i + batch_size],
                                                                        answers[i : i + batch_size])]
        head_ids = [h for h, _ in pairs]
        full_ids = [h + t for h, t in pairs]
        width = max(map(len, full_ids))
        ids = torch.full((len(full_ids), width), tokenizer.pad_token_id)
        attention = torch.zeros_like(ids)
        scored = torch.zeros(len(full_ids), width - 1)  # position t predicts token t + 1
        for j, (h, f) in enumerate(zip(head_ids, full_ids)):
            ids[j, : len(f)], attention[j, : len(f)] = torch.tensor(f), 1
            scored[j, len(h) - 1 : len(f) - 1] = 1
        ids, attention = ids.to(model.device), attention.to(model.device)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=attention).logits[:, :-1].float(), -1)
        logq = torch.log_softmax(ref(input_ids=ids, attention_mask=attention).logits[:, :-1].float(), -1)
        kl = (logp.exp() * (logp - logq)).sum(-1)
        total += (kl.cpu() * scored).sum().item()
    return total / len(prompts)


@torch.no_grad()
def prefers_chosen(model, tokenizer, pairs: list[dict], batch_size: int) -> list[bool]:
    """Per held-out human-labelled pair: does the model give the chosen reply a higher mean log-likelihood per
    token than the rejected one? (Per token, so that a longer reply is not penalised for its length.)"""
    model.eval()
    reply = lambda x: x if isinstance(x, str) else x[-1]["content"]  # noqa: E731  (prepare writes [assistant])
    texts = [(r["prompt"], reply(r[side])) for r in pairs for side in ("chosen", "rejected")]
    means: list[float] = []
    for i in range(0, len(texts), batch_size):
        encoded = [prompt_and_answer_ids(tokenizer, p, a) for p, a in texts[i : i + batch_size]]
        width = max(len(h) + len(t) for h, t in encoded)
        ids = torch.full((len(encoded), width), tokenizer.pad_token_id)
        mask, scored = torch.zeros_like(ids), torch.zeros(len(encoded), width - 1)
        for j, (h, t) in enumerate(encoded):
            ids[j, : len(h) + len(t)], mask[j, : len(h) + len(t)] = torch.tensor(h + t), 1
            scored[j, len(h) - 1 : len(h) + len(t) - 1] = 1  # position k predicts token k + 1: the answer's
        ids, mask = ids.to(model.device), mask.to(model.device)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        token = logp.gather(-1, ids[:, 1:, None])[..., 0].cpu() * scored
        means += (token.sum(-1) / scored.sum(-1)).tolist()
    return [c > r for c, r in zip(means[0::2], means[1::2])]
