"""Policy pairs: preference pairs made from the model's own samples, ranked by a trained reward model.

For each prompt the policy samples `generation.num_generations` replies; the reward model scores them, plus
`verifiable_reward_weight` for a reply that matches the pair's chosen one (posttrain.data.verifiable.matches); the
best and the worst become chosen and rejected when their rewards differ by more than `min_reward_gap`
(on-policy pairs, as in iterative / rejection-sampling DPO). With `verified_pairs`, a prompt whose chosen reply has a
checkable final answer ('#### N') gives a pair only from a right sample (chosen) and a wrong one (rejected), as in
Iterative Reasoning Preference Optimization (Pang et al. 2024): the reward model never ranks a wrong answer over a
right one there, so DPO does not push the model away from answers it got right. The pairs are cached next to the checkpoints, so a
resumed run trains on the same ones; under a multi-process launch each process samples and scores its share of
the prompts (posttrain.train.distributed).

`cfg` is the preference stage's config: model, reward_model, train_file, min_reward_gap,
verifiable_reward_weight, verified_pairs, generation (num_generations, max_completion_length, temperature, batch_size,
max_prompts), decode and train.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.data.verifiable import matches
from posttrain.evaluation.scoring import final_answer, sample
from posttrain.model.loading import load_model, load_tokenizer
from posttrain.model.reward_model import load_reward_model, reward_scores
from posttrain.train.distributed import cached_rows, split_work
from posttrain.train.training import examples_needed


def policy_pairs(cfg, rows: list[dict], cache: Path) -> tuple[list[dict], dict]:
    """For each prompt of `rows`, the model's own samples ranked by the reward model plus
    `verifiable_reward_weight` for a sample that matches the pair's chosen reply: (best, worst).
    Under a multi-process launch each process samples and scores its share of the prompts."""
    rows = rows[: cfg.generation.max_prompts or examples_needed(cfg.train)]  # sampling is slow: no more than used
    pairs = cached_rows(cache, lambda: _sampled_pairs(cfg, rows))
    return pairs, {"policy_prompts": len(rows), "policy_pairs": len(pairs),
                   "policy_pair_gap": sum(p["gap"] for p in pairs) / len(pairs),
                   "policy_chosen_verified": sum(p["chosen_verified"] for p in pairs) / len(pairs)}


def _sampled_pairs(cfg, rows: list[dict]) -> list[dict]:
    pairs = split_work(lambda share: _ranked_pairs(cfg, share), rows, "policy samples")
    if not pairs:
        raise ValueError(f"pairs: policy: no prompt of {cfg.train_file} gave two samples whose rewards differ "
                         f"by more than min_reward_gap={cfg.min_reward_gap}; lower it or sample more "
                         "(generation.num_generations)")
    return pairs


def _ranked_pairs(cfg, rows: list[dict]) -> list[dict]:
    """The (best, worst) pair of each prompt of `rows` whose samples' rewards differ by more than min_reward_gap."""
    g = cfg.generation
    prompts = [r["prompt"] for r in rows]
    model, tokenizer = load_model(cfg.model), load_tokenizer(cfg.model)
    samples = sample(model, tokenizer, prompts, g.num_generations, g.temperature, g.max_completion_length,
                     g.batch_size, cfg.decode, desc="policy samples")
    del model
    reward, reward_tokenizer = load_reward_model(cfg.reward_model), load_tokenizer(cfg.reward_model)
    scores = reward_scores(reward, reward_tokenizer, [p for p, s in zip(prompts, samples) for _ in s],
                           [x for s in samples for x in s], g.batch_size, cfg.train.max_length,
                           desc="reward of samples")
    k, w = g.num_generations, cfg.verifiable_reward_weight
    pairs = [pair_of(row, replies, scores[i * k : (i + 1) * k], w, cfg.min_reward_gap, cfg.verified_pairs)
             for i, (row, replies) in enumerate(zip(rows, samples))]
    return [p for p in pairs if p is not None]


def pair_of(row: dict, replies: list[str], rewards: list[float], weight: float, min_gap: float,
            verified_pairs: bool) -> dict | None:
    """The (chosen, rejected) pair of one prompt's samples, or None: the best and worst by reward plus `weight` for
    a reply matching the row's chosen one; with `verified_pairs` and a checkable chosen reply ('#### N'), the best
    right reply over the worst wrong one."""
    verified = [matches(x, row["chosen"]) for x in replies]
    total = [r + weight * v for r, v in zip(rewards, verified)]
    ranked = sorted(zip(total, verified, replies), key=lambda t: t[0])
    if verified_pairs and final_answer(row["chosen"]) is not None:
        right, wrong = [t for t in ranked if t[1]], [t for t in ranked if not t[1]]
        if not (right and wrong and right[-1][2] and wrong[0][2]):
            return None
        (high, _, best), (low, _, worst) = right[-1], wrong[0]
        return {"prompt": row["prompt"], "chosen": best, "rejected": worst, "gap": high - low, "chosen_verified": True}
    (low, _, worst), (high, best_verified, best) = ranked[0], ranked[-1]
    if high - low > min_gap and best and worst and best != worst:
        return {"prompt": row["prompt"], "chosen": best, "rejected": worst, "gap": high - low,
                "chosen_verified": best_verified}
    return None
