"""Prompts with checkable answers: reading them, and checking a reply against a known answer.

A reply is right when its final answer ('#### N') is the known one, or, where the reference has none, when its
whole text matches (posttrain.evaluation.scoring.exact_match). The online RL trainers use `verifiable_reward` beside the
reward model; policy pairs (posttrain.train.policy_pairs) use `matches` to favour a sample that agrees with the
pair's chosen reply.
"""

from __future__ import annotations

from posttrain.core.files import read_jsonl
from posttrain.evaluation.scoring import exact_match, final_answer


def verifiable_reward(prompts, completions, answer, **_) -> list[float | None]:
    """1 if the completion's final answer ('#### N', else the whole reply) is the known answer, 0 if not,
    None for prompts without one (TRL then leaves this reward out for them)."""
    out: list[float | None] = []
    for completion, ans in zip(completions, answer):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        if ans is None:
            out.append(None)
        else:
            final = final_answer(text)
            out.append(float(final == ans if final is not None else exact_match(text, ans)))
    return out


def prompt_rows(paths: list[str]) -> list[dict]:
    """{"prompt": messages, "answer": str | None} from every file, deduplicated by prompt, first kept."""
    import json

    seen, rows = set(), []
    for path in paths:
        for n, r in enumerate(read_jsonl(path), 1):
            if not isinstance(r.get("prompt"), list) or not r["prompt"]:
                raise ValueError(f"{path} line {n}: 'prompt' must be a non-empty message list, got {r.get('prompt')!r}")
            key = json.dumps(r["prompt"], sort_keys=True)
            if key not in seen:
                seen.add(key)
                rows.append({"prompt": r["prompt"], "answer": r.get("answer")})
    if not rows:
        raise ValueError(f"{', '.join(paths)}: no prompts")
    return rows



def matches(reply: str, reference: str) -> bool:
    """A reply verified against a known-good one: the same '#### N' final answer, else the same text."""
    final = final_answer(reference)
    return final_answer(reply) == final if final is not None else exact_match(reply, reference)
