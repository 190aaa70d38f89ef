"""reward: a reward model trained on preference pairs with TRL's RewardTrainer.

The backbone is a causal LM (the sft model by default, or any Hugging Face id / local path) turned into
a sequence classifier with one output (`num_labels=1`): the scalar reward read at the last real token of
prompt + reply under the chat template. Full, freeze or PEFT training; a PEFT run saves the adapter and
the score head (`modules_to_save`), and `load_reward_model` rebuilds the scorer from either form.
Metrics: pairwise accuracy and mean margin on the held-out pairs, before and after training.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from stages.common import atomic_dir, set_seed, write_json
from stages.config import AdapterConfig, TrackingConfig, TrainConfig, cli
from stages.models import (_require_qlora, _resolve, apply_freeze, base_of_adapter, is_adapter_dir, load_model,
                           load_tokenizer, peft_config, save_model, trainable_share)
from stages.tracking import log_model_dir, log_stage_metrics, stage_run
from stages.training import clear_checkpoints, fingerprint, prepare_checkpoints, train_with_resume, trainer_args


@dataclass(frozen=True)
class RewardStageConfig:
    seed: int
    tracking: TrackingConfig
    model: str  # backbone: a stage's folder (adapter chains are merged), a Hugging Face id or a local path
    train_file: str  # preference pairs, in any layout stages.readers reads (validated before training)
    eval_file: str  # held-out pairs: pairwise accuracy and mean margin
    center_rewards_coefficient: float  # pulls rewards towards mean zero (0 = off)
    eval_batch_size: int
    adapter: AdapterConfig
    train: TrainConfig
    out_dir: str


# ---------------------------------------------------------------- the scorer


def sequence_classifier(path: str | Path, quantize: bool = False):
    """A one-output sequence classifier on the causal LM at `path` (a PEFT chain is merged first)."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(path)
    kwargs = {"num_labels": 1, "pad_token_id": tokenizer.pad_token_id, "use_safetensors": True}
    if quantize:
        _require_qlora()
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
    if not is_adapter_dir(_resolve(str(path))):
        return AutoModelForSequenceClassification.from_pretrained(_resolve(str(path)), **kwargs)
    merged = load_model(path)
    if hasattr(merged, "peft_config"):
        raise RuntimeError(f"{path} is a prompt-learning adapter; a reward model cannot be built on it. "
                           "Use a LoRA-family or full method upstream.")
    with tempfile.TemporaryDirectory() as tmp:  # the merged weights, read back with a score head
        merged.save_pretrained(tmp, safe_serialization=True)
        return AutoModelForSequenceClassification.from_pretrained(tmp, **kwargs)


def load_reward_model(path: str | Path):
    """The trained reward model at `path`: full weights, or an adapter + score head over its backbone."""
    from transformers import AutoModelForSequenceClassification

    path = _resolve(str(path))
    if not is_adapter_dir(path):
        return AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True)
    from peft import PeftModel

    model = PeftModel.from_pretrained(sequence_classifier(base_of_adapter(path)), path)
    return model if model.peft_config["default"].is_prompt_learning else model.merge_and_unload()


@torch.no_grad()
def reward_scores(model, tokenizer, prompts: list[list[dict]], replies: list[str], batch_size: int) -> list[float]:
    """The reward of each (prompt messages, assistant reply), scored as TRL's trainers score it."""
    if len(prompts) != len(replies):
        raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies")
    model.eval()
    scores: list[float] = []
    for i in range(0, len(prompts), batch_size):
        texts = [tokenizer.apply_chat_template(p + [{"role": "assistant", "content": r}], tokenize=False)
                 for p, r in zip(prompts[i : i + batch_size], replies[i : i + batch_size])]
        enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right",
                        add_special_tokens=False).to(model.device)
        scores += model(**enc).logits[:, 0].float().tolist()
    return scores


def pairwise(model, tokenizer, pairs: list[dict], batch_size: int) -> dict[str, float]:
    """Held-out pairwise accuracy (chosen scored above rejected) and mean margin."""
    prompts = [r["prompt"] for r in pairs]
    chosen = reward_scores(model, tokenizer, prompts, [r["chosen"] for r in pairs], batch_size)
    rejected = reward_scores(model, tokenizer, prompts, [r["rejected"] for r in pairs], batch_size)
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {"accuracy": sum(m > 0 for m in margins) / len(margins), "margin": sum(margins) / len(margins)}


# ---------------------------------------------------------------- the stage


def preference_rows(path: str) -> list[dict]:
    """Validated pairs {"prompt": messages, "chosen": str, "rejected": str}; bad rows raise DataError."""
    from stages.readers import read_source  # pandera: only the stages that read pairs pay its import

    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in read_source(path, "preference").rows]
    if not rows:
        raise ValueError(f"{path}: no preference pairs")
    return rows


def trl_pairs(rows: list[dict]):
    """TRL's conversational preference form: prompt messages, one-message chosen / rejected."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])


def run(cfg: RewardStageConfig) -> dict:
    from peft import get_peft_model
    from trl import RewardConfig, RewardTrainer

    set_seed(cfg.seed)
    train_rows, eval_rows = preference_rows(cfg.train_file), preference_rows(cfg.eval_file)
    inputs = {"model": cfg.model, "train": cfg.train_file, "eval": cfg.eval_file}
    ckpt_dir, resume = prepare_checkpoints("reward", fingerprint(cfg, inputs))
    with stage_run("reward", cfg, inputs=inputs):
        tokenizer = load_tokenizer(cfg.model)
        model = sequence_classifier(cfg.model, quantize=cfg.adapter.method == "qlora")
        before = pairwise(model, tokenizer, eval_rows, cfg.eval_batch_size)
        apply_freeze(model, cfg.adapter)
        if cfg.adapter.method == "freeze":
            model.score.weight.requires_grad = True  # the new head always trains
        if (pc := peft_config(cfg.adapter, task_type="SEQ_CLS")) is not None:
            pc.modules_to_save = ["score"]  # the head is new: train it and save it with the adapter
            model = get_peft_model(model, pc)
        args = trainer_args(
            RewardConfig, cfg.train, ckpt_dir, cfg.seed, max_length=cfg.train.max_length,
            center_rewards_coefficient=cfg.center_rewards_coefficient or None,
            per_device_eval_batch_size=cfg.eval_batch_size,
        )
        trainer = RewardTrainer(model=model, args=args, train_dataset=trl_pairs(train_rows),
                                processing_class=tokenizer)
        result = train_with_resume(trainer, resume)
        # scored like `before` and like a reload of the saved model: without the trainer's mixed-precision wrapper
        after = pairwise(trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False), tokenizer,
                         eval_rows, cfg.eval_batch_size)
        metrics = {"eval_accuracy": after["accuracy"], "eval_margin": after["margin"],
                   "eval_accuracy_before": before["accuracy"], "eval_margin_before": before["margin"],
                   "eval_pairs": len(eval_rows), **result, **trainable_share(trainer.model),
                   "method": cfg.adapter.method}
        with atomic_dir(cfg.out_dir) as tmp:
            save_model(trainer.model, tokenizer, tmp, base_path=cfg.model)
        log_stage_metrics(metrics)
        log_model_dir(cfg.out_dir, cfg)
    write_json("metrics/reward.json", metrics)
    clear_checkpoints("reward")
    return metrics


if __name__ == "__main__":
    from stages.readers import DataError

    try:
        cli("reward", RewardStageConfig, run)
    except DataError as e:  # bad preference pairs: file, row, column and check named; nothing written
        raise SystemExit(f"data error: {e}")
