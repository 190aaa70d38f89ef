"""cpt: continued pretraining on raw domain text (causal LM over packed blocks), full or PEFT.

Metrics: held-out perplexity before and after, so the effect of the stage is in its own numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from posttrain.core.config import AdapterConfig, TrackingConfig, TrainConfig
from posttrain.core.files import require_rows
from posttrain.evaluation.scoring import perplexity
from posttrain.model.kernels import resolve as resolve_kernels, trainer_kwargs as kernel_kwargs
from posttrain.model.lm_head import set_loss_head
from posttrain.model.loading import load_for_training, load_tokenizer, trainable_share
from posttrain.train.cli import run_stage
from posttrain.train.harness import TrainingStage, make_trainable
from posttrain.train.training import trainer_args

STAGE = "cpt"


@dataclass(frozen=True)
class CPTConfig:
    seed: int
    tracking: TrackingConfig
    enabled: bool  # false: switched off, out_dir passes the input model on (no weights copied)
    model: str  # the model to continue from (a stage's folder, a Hugging Face id or path)
    train_file: str
    eval_file: str
    adapter: AdapterConfig
    loss_head: Literal["auto", "fused", "compact"]  # auto: TRL's fused kernel on a GPU, compact on CPU
    kernels: Literal["auto", "torch", "liger"]  # auto: Liger's fused RMSNorm/RoPE/SwiGLU where installed on a GPU
    compile: bool  # torch.compile the model (transformers' torch_compile, inductor); pays off on fixed shapes
    train: TrainConfig  # train.max_length is the packed block size
    out_dir: str


def training_args(cfg: CPTConfig, output_dir):
    """The SFTConfig this stage trains with (bench/throughput.py measures exactly these settings)."""
    from trl import SFTConfig

    return trainer_args(
        SFTConfig, cfg.train, output_dir, cfg.seed, report_to=cfg.tracking.report_to, held_out=True,
        dataset_text_field="text", max_length=cfg.train.max_length,
        packing=True, packing_strategy="wrapped",  # fixed blocks: classic pretraining packing
        torch_compile=cfg.compile, **kernel_kwargs(resolve_kernels(cfg.kernels)),
    )


def run(cfg: CPTConfig) -> dict:
    from datasets import Dataset
    from trl import SFTTrainer

    stage = TrainingStage(STAGE, cfg)
    if not cfg.enabled:
        return stage.pass_through(cfg.model)
    stage.seed()
    hint = "add a source of kind corpus to prepare.sources, or set cpt.enabled: false"
    train_texts = [r["text"] for r in require_rows(cfg.train_file, "cpt.train_file", hint)]
    eval_texts = [r["text"] for r in require_rows(cfg.eval_file, "cpt.eval_file", hint)]
    resolve_kernels(cfg.kernels)  # kernels this machine lacks stop the stage here, before anything is written
    with stage.run({"model": cfg.model, "train": cfg.train_file, "eval": cfg.eval_file}):
        tokenizer = load_tokenizer(cfg.model)
        model = load_for_training(cfg.model, cfg.adapter)
        ppl_before = perplexity(model, tokenizer, eval_texts, cfg.train.max_length)

        model = make_trainable(model, cfg.adapter)
        train_ds = Dataset.from_list([{"text": t} for t in train_texts])
        # the held-out text, packed like the training text, only where train.eval_steps asks for its loss curve
        eval_ds = Dataset.from_list([{"text": t} for t in eval_texts]) if cfg.train.eval_steps else None
        trainer = SFTTrainer(model=model, args=training_args(cfg, stage.ckpt_dir), train_dataset=train_ds,
                             eval_dataset=eval_ds, processing_class=tokenizer)
        set_loss_head(trainer, cfg.loss_head)
        result = stage.train(trainer)
        ppl_after = perplexity(trainer.model, tokenizer, eval_texts, cfg.train.max_length)
        metrics = {"perplexity_before": ppl_before, "perplexity_after": ppl_after, **result,
                   **trainable_share(trainer.model)}
        return stage.finish(metrics, tokenizer=tokenizer, base_path=cfg.model, trainer=trainer)


if __name__ == "__main__":
    run_stage(STAGE, CPTConfig, run, launchable=True)
