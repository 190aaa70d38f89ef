"""reward: the reward model align optimises against (policy pairs, GRPO / RLOO), trained on the preference
pairs with TRL's RewardTrainer (posttrain/train/reward_training.py). Metrics: held-out pairwise accuracy and margin."""

from __future__ import annotations

from posttrain.train.cli import run_stage
from posttrain.train.reward_training import RewardTrainingConfig, train_reward_model

STAGE = "reward"


def run(cfg: RewardTrainingConfig) -> dict:
    return train_reward_model(STAGE, cfg)


if __name__ == "__main__":
    run_stage(STAGE, RewardTrainingConfig, run, launchable=True)
