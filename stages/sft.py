"""sft: supervised fine-tuning on the prepared mixture with TRL's SFTTrainer.

The data is in TRL's conversational prompt-completion form, so the chat template is applied and the
loss falls on the completion only. `adapter.method` picks full / freeze / a PEFT method; PEFT runs
save only the adapter, which later stages load through posttrain.model.loading.load_model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from posttrain.core.config import AdapterConfig, TrackingConfig, TrainConfig
from posttrain.core.files import require_rows
from posttrain.model.attention import resolve as resolve_attention, set_attention
from posttrain.model.kernels import resolve as resolve_kernels, trainer_kwargs as kernel_kwargs
from posttrain.model.lm_head import set_loss_head
from posttrain.model.loading import load_for_training, load_tokenizer, trainable_share
from posttrain.train.cli import run_stage
from posttrain.train.harness import TrainingStage, make_trainable
from posttrain.train.training import trainer_args

STAGE = "sft"


@dataclass(frozen=True)
class SFTStageConfig:
    seed: int
    tracking: TrackingConfig
    enabled: bool  # false: switched off, out_dir passes the input model on (no weights copied)
    model: str
    train_file: str
    eval_file: str
    packing: bool  # pack examples into max_length rows, padding-free (each example attends only to itself)
    attention: Literal["auto", "sdpa", "eager", "sdpa_varlen", "torch_varlen", "flash_attention_2",
                       "flash_attention_3"]
    loss_head: Literal["auto", "fused", "compact"]  # auto: TRL's fused kernel on a GPU, compact on CPU
    kernels: Literal["auto", "torch", "liger"]  # auto: Liger's fused RMSNorm/RoPE/SwiGLU where installed on a GPU
    compile: bool  # torch.compile the model (transformers' torch_compile, inductor); pays off on fixed shapes
    sampling: Literal["random", "group_by_length"]  # group_by_length batches similar lengths: less padding
    adapter: AdapterConfig
    train: TrainConfig
    out_dir: str


def _dataset(path: str, key: str):
    from datasets import Dataset

    hint = "add instruction, refusal or cot sources to prepare.sources, or set sft.enabled: false"
    rows = require_rows(path, key, hint)
    return Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])


def training_args(cfg: SFTStageConfig, output_dir):
    """The SFTConfig this stage trains with (bench/throughput.py measures exactly these settings)."""
    from trl import SFTConfig

    return trainer_args(
        SFTConfig, cfg.train, output_dir, cfg.seed, report_to=cfg.tracking.report_to, held_out=True,
        max_length=cfg.train.max_length, packing=cfg.packing, completion_only_loss=True,
        train_sampling_strategy=cfg.sampling, per_device_eval_batch_size=cfg.train.batch_size,
        torch_compile=cfg.compile, **kernel_kwargs(resolve_kernels(cfg.kernels)),
    )


def run(cfg: SFTStageConfig) -> dict:
    from trl import SFTTrainer

    stage = TrainingStage(STAGE, cfg)
    if not cfg.enabled:
        return stage.pass_through(cfg.model)
    stage.seed()
    train_ds, eval_ds = _dataset(cfg.train_file, "sft.train_file"), _dataset(cfg.eval_file, "sft.eval_file")
    attention = resolve_attention(cfg.attention, cfg.packing)  # a kernel this machine lacks stops here, first
    resolve_kernels(cfg.kernels)  # likewise Liger's kernels where they cannot run
    with stage.run({"model": cfg.model, "train": cfg.train_file, "eval": cfg.eval_file}):
        tokenizer = load_tokenizer(cfg.model)
        model = load_for_training(cfg.model, cfg.adapter)
        set_attention(model, attention, cfg.packing)
        model = make_trainable(model, cfg.adapter)
        trainer = SFTTrainer(model=model, args=training_args(cfg, stage.ckpt_dir), train_dataset=train_ds,
                             eval_dataset=eval_ds, processing_class=tokenizer)
        set_loss_head(trainer, cfg.loss_head)
        eval_loss_before = trainer.evaluate()["eval_loss"]
        result = stage.train(trainer)
        metrics = {**result, "eval_loss_before": eval_loss_before, "eval_loss": trainer.evaluate()["eval_loss"],
                   **trainable_share(trainer.model),
                   "method": cfg.adapter.method}
        return stage.finish(metrics, tokenizer=tokenizer, base_path=cfg.model, trainer=trainer)


if __name__ == "__main__":
    run_stage(STAGE, SFTStageConfig, run, launchable=True)
