"""rft: rejection-sampling fine-tuning on the prompts whose answers can be checked exactly.

1. take the chain-of-thought prompts of the SFT training data (completion ends in '#### <answer>');
2. sample `num_samples` completions per prompt from the sft model (temperature sampling; under a multi-process
   launch each process samples its share of the prompts, posttrain.train.distributed);
3. keep the completions whose final answer is right (each distinct one once);
4. fine-tune the sft model on them, with `replay` mixture rows per kept sample so that the other skills of the
   mixture are not trained away, with TRL's SFTTrainer (loss on the completion).
Metrics: kept share, and held-out chain-of-thought accuracy (greedy) before and after.
If no sample is right, nothing can be trained: models/rft is the sft model unchanged (trained: false).
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.core.config import AdapterConfig, ConfigError, TrackingConfig, TrainConfig
from posttrain.core.files import read_jsonl
from posttrain.evaluation.decoding import DecodeConfig
from posttrain.evaluation.scoring import final_answer, generate, sample
from posttrain.model.loading import load_for_training, load_tokenizer, trainable_share
from posttrain.train.cli import run_stage
from posttrain.train.distributed import cached_rows, split_work
from posttrain.train.harness import TrainingStage, make_trainable
from posttrain.train.training import trainer_args

STAGE = "rft"


@dataclass(frozen=True)
class RFTConfig:
    seed: int
    tracking: TrackingConfig
    enabled: bool  # false: switched off, out_dir passes the input model on (no weights copied)
    model: str  # the sampler and the starting point
    train_file: str  # prompt-completion rows; those whose completion has a '#### N' answer are used
    eval_file: str  # {"prompt", "answer"} held out: accuracy before / after
    max_prompts: int
    num_samples: int  # k completions per prompt
    temperature: float
    max_new_tokens: int
    batch_size: int  # prompts per generation batch
    decode: DecodeConfig  # params.yaml defaults.decode
    max_eval: int
    replay: float  # mixture rows (train_file) trained alongside the kept samples, per kept sample: no forgetting
    adapter: AdapterConfig
    train: TrainConfig
    out_dir: str

    def __post_init__(self):
        for key in ("max_prompts", "num_samples", "max_new_tokens", "batch_size", "max_eval"):
            if getattr(self, key) < 1:
                raise ConfigError(f"[rft.{key}] must be >= 1, got {getattr(self, key)}")
        if self.temperature <= 0:
            raise ConfigError(f"[rft.temperature] must be > 0 (sampling), got {self.temperature}")


def checkable(path: str, limit: int) -> list[dict]:
    """{"prompt", "answer"} for the rows whose completion carries a final answer, first `limit` distinct prompts."""
    seen, rows = set(), []
    for r in read_jsonl(path):
        answer = final_answer(r["completion"][-1]["content"])
        key = str(r["prompt"])
        if answer is not None and key not in seen:
            seen.add(key)
            rows.append({"prompt": r["prompt"], "answer": answer})
    if not rows:
        raise ConfigError(f"[rft.train_file] {path}: no row has a completion with a '#### <answer>' final answer to "
                          "check; add a cot source to prepare.sources, or set rft.enabled: false")
    return rows[:limit]


def accuracy(model, tokenizer, rows: list[dict], cfg: RFTConfig) -> float:
    gens = generate(model, tokenizer, [r["prompt"] for r in rows], cfg.max_new_tokens, cfg.batch_size, cfg.decode,
                    desc="held-out cot")
    return sum(final_answer(g) == r["answer"] for g, r in zip(gens, rows)) / len(rows)


def keep_correct(rows: list[dict], samples: list[list[str]]) -> list[dict]:
    """Prompt-completion rows for each distinct verified-correct sample."""
    kept = []
    for row, completions in zip(rows, samples):
        for text in dict.fromkeys(completions):
            if final_answer(text) == row["answer"]:
                kept.append({"prompt": row["prompt"], "completion": [{"role": "assistant", "content": text}]})
    return kept


def replayed(cfg: RFTConfig, kept: int) -> list[dict]:
    """A seeded draw of the SFT mixture, `replay` rows per kept sample: a second SFT pass on the mixture plus
    the verified samples, so what sft taught besides arithmetic is not trained away."""
    import random

    rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in read_jsonl(cfg.train_file)]
    return random.Random(cfg.seed).sample(rows, min(len(rows), round(cfg.replay * kept)))


def run(cfg: RFTConfig) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    stage = TrainingStage(STAGE, cfg)
    if not cfg.enabled:
        return stage.pass_through(cfg.model)
    stage.seed()
    prompts = checkable(cfg.train_file, cfg.max_prompts)
    held_out = read_jsonl(cfg.eval_file)[: cfg.max_eval]
    with stage.run({"model": cfg.model, "train": cfg.train_file, "eval": cfg.eval_file}):
        tokenizer = load_tokenizer(cfg.model)
        model = load_for_training(cfg.model, cfg.adapter)
        acc_before = accuracy(model, tokenizer, held_out, cfg)
        # kept next to the checkpoints: a resumed run trains on the samples its checkpoint was trained on
        samples = [r["completions"] for r in cached_rows(stage.ckpt_dir / "samples.jsonl", lambda: [
            {"completions": s} for s in split_work(
                lambda share: sample(model, tokenizer, [r["prompt"] for r in share], cfg.num_samples, cfg.temperature,
                                     cfg.max_new_tokens, cfg.batch_size, cfg.decode, desc="rft samples"),
                prompts, "rft samples")])]
        right_by_prompt = [sum(final_answer(t) == r["answer"] for t in s) for r, s in zip(prompts, samples)]
        right = sum(right_by_prompt)
        kept = keep_correct(prompts, samples)
        metrics = {"prompts": len(prompts), "samples": len(prompts) * cfg.num_samples, "correct": right,
                   "kept_share": right / (len(prompts) * cfg.num_samples), "kept_distinct": len(kept),
                   "prompts_solved": sum(n > 0 for n in right_by_prompt),
                   "accuracy_before": acc_before, "trained": bool(kept), "method": cfg.adapter.method}
        trainer = None
        if kept:
            model = make_trainable(model, cfg.adapter)
            args = trainer_args(SFTConfig, cfg.train, stage.ckpt_dir, cfg.seed, report_to=cfg.tracking.report_to,
                                max_length=cfg.train.max_length,
                                completion_only_loss=True)
            rows = kept + replayed(cfg, len(kept))
            metrics["replayed"] = len(rows) - len(kept)
            trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                 processing_class=tokenizer)
            metrics.update(stage.train(trainer), **trainable_share(trainer.model))
            model = trainer.model
        else:
            print(f"[rft] no sampled completion of {len(prompts)} prompts was right: {cfg.out_dir} is "
                  f"{cfg.model} unchanged", flush=True)
        metrics["accuracy_after"] = accuracy(model, tokenizer, held_out, cfg)
        metrics["accuracy_change"] = metrics["accuracy_after"] - acc_before
        return stage.finish(metrics, model=model, tokenizer=tokenizer, base_path=cfg.model, trainer=trainer)


if __name__ == "__main__":
    run_stage(STAGE, RFTConfig, run, launchable=True)
