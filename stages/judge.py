"""judge: an independent reward model that evaluate scores every model's answers with (reward_score, win_rate).

Trained like reward (posttrain/train/reward_training.py) but on a disjoint part of the preference pairs
(prepare's preference_judge.jsonl), which neither reward nor align ever sees: the aligned policy is never
judged by the model it was trained against.
"""

from __future__ import annotations

from posttrain.train.cli import run_stage
from posttrain.train.reward_training import RewardTrainingConfig, train_reward_model

STAGE = "judge"


def run(cfg: RewardTrainingConfig) -> dict:
    return train_reward_model(STAGE, cfg)


if __name__ == "__main__":
    run_stage(STAGE, RewardTrainingConfig, run, launchable=True)
