"""Training a reward model on preference pairs with TRL's RewardTrainer: what the reward stage (the reward
align optimises against) and the judge stage (an independent one that evaluate scores with) both run.

The backbone is a causal LM (the sft model by default, or any Hugging Face id / local path) turned into
a sequence classifier with one output (`num_labels=1`): the scalar reward read at the last real token of
prompt + reply under the chat template. Full, freeze or PEFT training; a PEFT run saves the adapter and
the score head (`modules_to_save`), and `posttrain.model.reward_model.load_reward_model` rebuilds the scorer from
either form. Metrics: pairwise accuracy and mean margin on the held-out pairs, before and after training.
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.core.config import AdapterConfig, TrackingConfig, TrainConfig
from posttrain.model.loading import load_tokenizer, trainable_share
from posttrain.model.reward_model import pairwise, preference_rows, sequence_classifier, trl_pairs
from posttrain.train.harness import TrainingStage, make_trainable
from posttrain.train.training import trainer_args


@dataclass(frozen=True)
class RewardTrainingConfig:
    seed: int
    tracking: TrackingConfig
    enabled: bool  # false: switched off, out_dir passes the input model on (no weights copied)
    model: str  # backbone: a stage's folder (adapter chains are merged), a Hugging Face id or a local path
    train_file: str  # preference pairs, in any layout posttrain.data.readers reads (validated before training)
    eval_file: str  # held-out pairs: pairwise accuracy and mean margin
    center_rewards_coefficient: float  # pulls rewards towards mean zero (0 = off)
    eval_batch_size: int
    adapter: AdapterConfig
    train: TrainConfig
    out_dir: str


def train_reward_model(name: str, cfg: RewardTrainingConfig) -> dict:
    """Train (or, switched off, pass on nothing) the reward model of stage `name`; its metrics."""
    from trl import RewardConfig, RewardTrainer

    stage = TrainingStage(name, cfg)
    if not cfg.enabled:
        return stage.pass_through(None)
    stage.seed()
    train_rows, eval_rows = preference_rows(cfg.train_file), preference_rows(cfg.eval_file)
    with stage.run({"model": cfg.model, "train": cfg.train_file, "eval": cfg.eval_file}):
        tokenizer = load_tokenizer(cfg.model)
        model = sequence_classifier(cfg.model, quantize=cfg.adapter.method == "qlora")
        before = pairwise(model, tokenizer, eval_rows, cfg.eval_batch_size, cfg.train.max_length)
        # the score head is new: it always trains, and a PEFT run saves it with the adapter
        model = make_trainable(model, cfg.adapter, task_type="SEQ_CLS", head="score")
        args = trainer_args(
            RewardConfig, cfg.train, stage.ckpt_dir, cfg.seed, report_to=cfg.tracking.report_to, held_out=True,
            max_length=cfg.train.max_length,
            center_rewards_coefficient=cfg.center_rewards_coefficient or None,
            per_device_eval_batch_size=cfg.eval_batch_size,
        )
        trainer = RewardTrainer(model=model, args=args, train_dataset=trl_pairs(train_rows),
                                eval_dataset=trl_pairs(eval_rows) if cfg.train.eval_steps else None,
                                processing_class=tokenizer)
        result = stage.train(trainer)
        # scored like `before` and like a reload of the saved model: without the trainer's mixed-precision wrapper
        after = pairwise(trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False), tokenizer,
                         eval_rows, cfg.eval_batch_size, cfg.train.max_length)
        metrics = {"eval_accuracy": after["accuracy"], "eval_margin": after["margin"],
                   "eval_accuracy_before": before["accuracy"], "eval_margin_before": before["margin"],
                   "eval_pairs": len(eval_rows), **result, **trainable_share(trainer.model),
                   "method": cfg.adapter.method}
        return stage.finish(metrics, tokenizer=tokenizer, base_path=cfg.model, trainer=trainer)
