"""The SFT mixture: instruction, refusal and chain-of-thought examples drawn at configured ratios (largest-remainder
counts, repeats only where a kind has too few), and the prompt-completion / preference rows they are written as
(TRL's conversational layouts).
"""

from __future__ import annotations

import random
from collections import Counter

from posttrain.data.readers import DataError, Problem
from posttrain.data.splitting import assistant, prompt_of


def mixture_counts(size: int, ratios: dict[str, float]) -> dict[str, int]:
    """Largest-remainder rounding: counts sum to `size`, each within 1 of size * ratio."""
    exact = {k: size * r for k, r in ratios.items()}
    counts = {k: int(x) for k, x in exact.items()}
    by_remainder = sorted(ratios, key=lambda k: (exact[k] - counts[k], -list(ratios).index(k)), reverse=True)
    for k in by_remainder[: size - sum(counts.values())]:
        counts[k] += 1
    return counts


def build_mixture(train: dict[str, list[dict]], size: int, ratios: dict[str, float], seed: int):
    """[(kind, row)] of `size` drawn at `ratios`; with replacement only for a kind with too few rows."""
    rng = random.Random(f"{seed}:mixture")
    picked, report = [], {}
    for kind, want in mixture_counts(size, ratios).items():
        pool = train.get(kind, [])
        if want and not pool:
            raise DataError([Problem("prepare.mixture", f"'{kind}' has ratio {ratios[kind]} but no train examples")])
        if want <= len(pool):
            rows = rng.sample(pool, want)
        else:  # every example once, then repeats drawn at random
            rows = rng.sample(pool, len(pool)) + rng.choices(pool, k=want - len(pool))
        picked += [(kind, row) for row in rows]
        report[kind] = {"count": want, "share": want / size, "target": ratios[kind], "available": len(pool),
                        "upsampled": want > len(pool), "repeated": max(0, want - len(pool))}
    rng.shuffle(picked)
    by_source = Counter(row["_source"] for _, row in picked)
    sources = {src: {"count": n, "share": n / size} for src, n in sorted(by_source.items())}
    return picked, {"size": size, "kinds": report, "sources": sources}


def sft_row(kind: str, row: dict) -> dict:
    if kind == "instruction":
        completion = [row["messages"][-1]]
    elif kind == "refusal":
        completion = assistant(row["response"])
    else:
        completion = assistant(f"{row['rationale']}\n#### {row['answer']}")
    return {"prompt": prompt_of(kind, row), "completion": completion, "source": kind}


def preference_row(row: dict) -> dict:
    return {"prompt": row["prompt"], "chosen": assistant(row["chosen"]), "rejected": assistant(row["rejected"])}


def outputs(train: dict, held: dict, prompts: list[dict], mixture: list, sft_kinds: list[str],
            judge: list[dict]) -> dict[str, list]:
    """File name -> rows of every prepared file (empty where a kind has no source), from the train and eval splits,
    the prompts, the mixture [(kind, row)] and the judge's pairs."""
    return {
        "corpus_train.jsonl": [{"text": r["text"]} for r in train["corpus"]],
        "corpus_eval.jsonl": [{"text": r["text"]} for r in held["corpus"]],
        "sft_train.jsonl": [sft_row(kind, r) for kind, r in mixture],
        "sft_eval.jsonl": [sft_row(kind, r) for kind in sft_kinds for r in held[kind]],
        "eval_instruction.jsonl": [{"prompt": prompt_of("instruction", r), "answer": r["messages"][-1]["content"]}
                                   for r in held["instruction"]],
        "eval_cot.jsonl": [{"prompt": prompt_of("cot", r), "answer": r["answer"]} for r in held["cot"]],
        "eval_harmful.jsonl": [{"prompt": prompt_of("refusal", r)} for r in held["refusal"]],
        "eval_benign.jsonl": [{"prompt": prompt_of("instruction", r)} for r in held["instruction"]],
        "preference_train.jsonl": [preference_row(r) for r in train["preference"]],
        "preference_eval.jsonl": [preference_row(r) for r in held["preference"]],
        "preference_judge.jsonl": [preference_row(r) for r in judge],
        "prompts.jsonl": [{"prompt": prompt_of("prompt", r), "answer": r["answer"]} for r in prompts],
    }
