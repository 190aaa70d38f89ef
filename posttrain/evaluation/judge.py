"""evaluate's judge: a trained reward model scoring every model's answers to the held-out preference prompts
against the reference model's answers (reward_score, win_rate, kl_to_ref)."""

from __future__ import annotations

from posttrain.evaluation.scoring import generate
from posttrain.evaluation.suites import kl_along, win_rate, wins
from posttrain.model.loading import load_model, load_tokenizer
from posttrain.model.reward_model import load_reward_model, reward_scores


class Judge:
    """The reward model and the reference's answers and rewards on the held-out preference prompts; `cfg` is
    evaluate's config (reward_model, models, reference, decoding and batch settings)."""

    def __init__(self, cfg, prompts: list[list[dict]]):
        self.cfg, self.prompts = cfg, prompts
        self.reward, self.reward_tokenizer = load_reward_model(cfg.reward_model), load_tokenizer(cfg.reward_model)
        path = cfg.models[cfg.reference]
        self.ref, self.ref_tokenizer = load_model(path), load_tokenizer(path)
        self.ref_answers = generate(self.ref, self.ref_tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size,
                                    cfg.decode)
        self.ref_rewards = self.score(self.ref_answers)
        self.outcomes: dict[str, list[float]] = {}  # per model, per prompt: 1 win, 0.5 tie, 0 loss against the reference

    def score(self, answers: list[str]) -> list[float]:
        """Rewards of answers to the first len(answers) prompts."""
        prompts = self.prompts[: len(answers)]
        return reward_scores(self.reward, self.reward_tokenizer, prompts, answers, self.cfg.batch_size,
                             self.cfg.reward_max_length)

    def __call__(self, name: str, model, tokenizer) -> tuple[dict, list[str]]:
        """reward_score, win_rate and kl_to_ref of one model, and its answers."""
        if name == self.cfg.reference:  # already generated and scored; KL to itself is 0
            rewards = self.ref_rewards
            self.outcomes[name] = [0.5] * len(rewards)
            return {"reward_score": sum(rewards) / len(rewards), "win_rate": 0.5, "kl_to_ref": 0.0}, self.ref_answers
        answers = generate(model, tokenizer, self.prompts, self.cfg.max_new_tokens, self.cfg.batch_size,
                           self.cfg.decode)
        rewards = self.score(answers)
        self.outcomes[name] = wins(rewards, self.ref_rewards)
        same_vocab = tokenizer.get_vocab() == self.ref_tokenizer.get_vocab()
        return {
            "reward_score": sum(rewards) / len(rewards),
            "win_rate": win_rate(rewards, self.ref_rewards),
            "kl_to_ref": kl_along(model, self.ref, tokenizer, self.prompts, answers, self.cfg.batch_size)
            if same_vocab else None,  # token-level KL needs one vocabulary
        }, answers
