"""align: preference optimisation of the sft model with TRL, `method` picking the algorithm.

  dpo (default) DPOTrainer on pairs; kto KTOTrainer (pairs unpaired into good/bad); orpo trl.experimental ORPO
  grpo / rloo   online RL (TRL 1.x has no PPOTrainer): samples scored by the reward model (models/reward) plus
                an exact-answer reward where a prompt is checkable; KL to the reference weighted by `beta`

dpo / kto / orpo pairs: `data` (train_file) or `policy` (the model's own samples, best over worst by the reward
model, right over wrong where checkable: posttrain/train/policy_pairs.py).

The reference is `model` itself: with a PEFT method the sft weights with the new adapter off (TRL's
`disable_adapter`, no second copy; an sft LoRA is merged first), with full training the sft folder's weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from posttrain.core.config import AdapterConfig, ConfigError, TrackingConfig, TrainConfig
from posttrain.data.verifiable import prompt_rows, verifiable_reward
from posttrain.evaluation.decoding import DecodeConfig
from posttrain.model.loading import (is_adapter_dir, load_for_training, load_model, load_tokenizer, local_path,
                                     trainable_share)
from posttrain.model.reward_model import load_reward_model, preference_rows, require_reward_model, trl_pairs
from posttrain.train.cli import run_stage
from posttrain.train.distributed import main_first
from posttrain.train.harness import TrainingStage, make_trainable
from posttrain.train.policy_pairs import policy_pairs
from posttrain.train.training import logged, trainer_args

STAGE = "align"
OFFLINE = ("dpo", "kto", "orpo")
ONLINE = ("grpo", "rloo")


@dataclass(frozen=True)
class GenerationConfig:
    num_generations: int  # completions sampled per prompt (the group the advantage / the pair is drawn from)
    max_completion_length: int
    temperature: float
    batch_size: int  # prompts per sampling batch (pairs: policy)
    max_prompts: int  # pairs: policy: prompts sampled; 0 = as many as training uses (max_steps x batch x accum)


@dataclass(frozen=True)
class AlignConfig:
    seed: int
    tracking: TrackingConfig
    enabled: bool  # false: switched off, out_dir passes the input model on (no weights copied)
    method: Literal["dpo", "kto", "orpo", "grpo", "rloo"]
    model: str  # policy start and reference
    train_file: str  # preference pairs (dpo / kto / orpo), any layout the readers know
    eval_file: str
    pairs: Literal["data", "policy"]  # dpo / kto / orpo: train_file's pairs, or the model's samples ranked by reward
    min_reward_gap: float  # pairs: policy: keep a prompt only if its best and worst sample differ by more
    prompts_files: list[str]  # grpo / rloo: JSONL rows with "prompt" (messages) and optional "answer"
    reward_model: str  # grpo / rloo, and dpo / kto / orpo with pairs: policy
    verifiable_reward_weight: float  # grpo / rloo: exact-answer reward; policy pairs: bonus for matching chosen
    verified_pairs: bool  # policy pairs: a checkable prompt ('#### N') pairs a right sample over a wrong one, or none
    beta: float  # KL strength (dpo / kto / grpo / rloo); the odds-ratio weight for orpo
    sft_weight: float  # dpo: weight of an SFT term (NLL of the chosen reply) added to the DPO loss (0 = pure DPO)
    generation: GenerationConfig
    decode: DecodeConfig  # params.yaml defaults.decode: how policy pairs are sampled
    adapter: AdapterConfig
    train: TrainConfig
    out_dir: str

    def __post_init__(self):
        g = self.generation
        if (self.method in ONLINE or self.pairs == "policy") and g.num_generations < 2:
            raise ConfigError(f"[align.generation.num_generations] must be >= 2 for {self.method}"
                              f"{' with pairs: policy' if self.method in OFFLINE else ''}, got {g.num_generations}")
        if self.method in ONLINE and (self.train.batch_size * self.train.grad_accum) % g.num_generations:
            raise ConfigError(f"[align.train] batch_size * grad_accum ({self.train.batch_size} * "
                              f"{self.train.grad_accum}) must be a multiple of generation.num_generations "
                              f"({g.num_generations}) for {self.method}")
        if self.beta < 0:
            raise ConfigError(f"[align.beta] must be >= 0, got {self.beta}")
        if self.sft_weight < 0:
            raise ConfigError(f"[align.sft_weight] must be >= 0, got {self.sft_weight}")


# ---------------------------------------------------------------- the reference


def reference_dir(model_path: str, scratch: Path) -> str:
    """A folder holding the full weights of `model_path`: itself, or its adapter chain merged into `scratch`."""
    if not is_adapter_dir(local_path(model_path)):
        return local_path(model_path)
    with main_first():  # the main process writes it; the others find it there
        if not (scratch / "model.safetensors").exists():
            load_model(model_path).save_pretrained(scratch, safe_serialization=True)
            load_tokenizer(model_path).save_pretrained(scratch)
    return str(scratch)


def load_data(cfg: AlignConfig) -> dict:
    """The method's rows, validated before anything is written (bad rows raise with file and row)."""
    if cfg.method in OFFLINE:
        return {"train": preference_rows(cfg.train_file), "eval": preference_rows(cfg.eval_file)}
    return {"prompts": prompt_rows(cfg.prompts_files)}


def build_trainer(cfg: AlignConfig, ckpt_dir: Path, data: dict):
    """The TRL trainer for `cfg.method` on `data` (load_data's rows), its policy loaded from cfg.model,
    which is also the reference."""
    from datasets import Dataset

    if cfg.method in OFFLINE:
        data = {"train_dataset": trl_pairs(data["train"]), "eval_dataset": trl_pairs(data["eval"])}
    else:
        data = {"train_dataset": Dataset.from_list(data["prompts"])}
    tokenizer = load_tokenizer(cfg.model)
    model = load_for_training(cfg.model, cfg.adapter)
    model, pc = make_trainable(model, cfg.adapter, trainer_applies_peft=True)
    if pc is None:  # full / freeze: TRL loads its reference from here, so it must be the sft weights
        model.config._name_or_path = reference_dir(cfg.model, ckpt_dir / "reference")
    common = dict(max_length=cfg.train.max_length, per_device_eval_batch_size=cfg.train.batch_size, beta=cfg.beta,
                  report_to=cfg.tracking.report_to, held_out=True)  # the eval pairs: eval_loss every train.eval_steps
    if cfg.method == "dpo":
        from trl import DPOConfig, DPOTrainer

        losses = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, cfg.sft_weight]} if cfg.sft_weight else {}
        args = trainer_args(DPOConfig, cfg.train, ckpt_dir, cfg.seed, **common, **losses)
        return DPOTrainer(model=model, args=args, processing_class=tokenizer, peft_config=pc, **data)
    if cfg.method == "kto":
        from trl import KTOConfig, KTOTrainer

        args = trainer_args(KTOConfig, cfg.train, ckpt_dir, cfg.seed, **common)
        return KTOTrainer(model=model, args=args, processing_class=tokenizer, peft_config=pc, **data)
    if cfg.method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args = trainer_args(ORPOConfig, cfg.train, ckpt_dir, cfg.seed, **common)
        return ORPOTrainer(model=model, args=args, processing_class=tokenizer, peft_config=pc, **data)
    return _online_trainer(cfg, ckpt_dir, model, tokenizer, pc, data)


def _online_trainer(cfg: AlignConfig, ckpt_dir: Path, model, tokenizer, pc, data: dict):
    if cfg.method == "grpo":
        from trl import GRPOConfig as Config, GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config, RLOOTrainer as Trainer
    reward_funcs, reward_tokenizers, weights = [load_reward_model(m := cfg.reward_model)], [load_tokenizer(m)], [1.0]
    if cfg.verifiable_reward_weight > 0:
        reward_funcs.append(verifiable_reward)
        reward_tokenizers.append(None)
        weights.append(cfg.verifiable_reward_weight)
    g = cfg.generation
    args = trainer_args(
        Config, cfg.train, ckpt_dir, cfg.seed, report_to=cfg.tracking.report_to, beta=cfg.beta,
        num_generations=g.num_generations, max_completion_length=g.max_completion_length, temperature=g.temperature,
        reward_weights=weights)
    return Trainer(model=model, reward_funcs=reward_funcs, args=args, processing_class=tokenizer,
                   reward_processing_classes=reward_tokenizers, peft_config=pc, **data)


# ---------------------------------------------------------------- the stage


TRACKED = {"dpo": ["loss", "rewards/margins", "rewards/accuracies"], "kto": ["loss", "kl"],
           "orpo": ["loss", "rewards/margins", "rewards/accuracies", "log_odds_ratio"],
           "grpo": ["reward", "kl"], "rloo": ["reward", "kl"]}  # first and last logged value go into the metrics


def run(cfg: AlignConfig) -> dict:
    stage = TrainingStage(STAGE, cfg)
    if not cfg.enabled:
        return stage.pass_through(cfg.model)
    inputs = ({"model": cfg.model, "train": cfg.train_file, "eval": cfg.eval_file} if cfg.method in OFFLINE
              else {"model": cfg.model, **{f"prompts{i}": p for i, p in enumerate(cfg.prompts_files)}})
    if cfg.method in ONLINE or cfg.pairs == "policy":  # the reward model is read: an input
        require_reward_model(cfg.reward_model, "align.reward_model",
                             "enable reward, or use a method of dpo / kto / orpo with align.pairs: data")
        inputs["reward_model"] = cfg.reward_model
    stage.seed()
    data = load_data(cfg)
    with stage.run(inputs):
        pair_stats = {}
        if cfg.method in OFFLINE and cfg.pairs == "policy":
            with stage.cleared_on_failure(ValueError):
                data["train"], pair_stats = policy_pairs(cfg, data["train"], stage.ckpt_dir / "policy_pairs.jsonl")
        trainer = build_trainer(cfg, stage.ckpt_dir, data)
        result = stage.train(trainer)
        metrics = {"method": cfg.method, "adapter": cfg.adapter.method, **pair_stats, **result,
                   **trainable_share(trainer.model)}
        for key in TRACKED[cfg.method]:
            metrics[f"train_{key}_first"], metrics[f"train_{key}_last"] = logged(trainer, key)
        if cfg.method in OFFLINE:
            metrics.update({k: v for k, v in trainer.evaluate().items() if k.startswith("eval_") and "runtime" not in k
                            and "per_second" not in k})
        return stage.finish(metrics, tokenizer=trainer.processing_class, base_path=cfg.model, trainer=trainer)


if __name__ == "__main__":
    run_stage(STAGE, AlignConfig, run, launchable=True)
