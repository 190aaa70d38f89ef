"""Step time of preference training against SFT, side by side in one run, on the same model and data.

    .venv/bin/python bench/preference_step_time.py          # after `dvc repro align` (models/sft, models/reward)
    .venv/bin/python bench/preference_step_time.py --steps 12 --online rloo

SFT trains on prompt + chosen; DPO on prompt + chosen / rejected; the online method (GRPO or RLOO) samples
`num_generations` completions per prompt and scores them with the reward model. All three use the same
starting model, the same pairs, the `align` section's adapter, batch size, max_length, beta and generation
settings from params.yaml, and TRL's trainers as the stages build them (posttrain.train.training.trainer_args).
Step time = median wall time of a training step after `--warmup` steps (a callback times each step).
Nothing is written outside a temporary directory and nothing is logged to MLflow.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import TrainerCallback  # noqa: E402

from posttrain.core.config import load_config  # noqa: E402
from posttrain.core.runtime import set_seed  # noqa: E402
from posttrain.model.loading import load_for_training, load_tokenizer, peft_config  # noqa: E402
from posttrain.model.reward_model import load_reward_model, preference_rows, trl_pairs  # noqa: E402
from posttrain.train.training import trainer_args  # noqa: E402
from stages.align import AlignConfig  # noqa: E402


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def args_for(config_cls, cfg: AlignConfig, out: str, **extra):
    train = dataclasses.replace(cfg.train, logging_steps=cfg.train.max_steps, save_steps=10**6)  # one log: token count
    args = trainer_args(config_cls, train, out, cfg.seed, **extra)
    args.report_to, args.save_strategy = [], "no"
    return args


def timed(name: str, make_trainer, warmup: int) -> dict:
    timer = StepTimer()
    trainer = make_trainer()
    trainer.add_callback(timer)
    trainer.train()
    steps = timer.times[warmup:] or timer.times
    tokens = max((h.get("num_tokens", 0) for h in trainer.state.log_history), default=0)
    print(f"  {name}: {len(timer.times)} steps, median {statistics.median(steps):.3f} s/step", flush=True)
    return {"step_s": statistics.median(steps), "tokens_per_step": tokens / max(len(timer.times), 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--steps", type=int, default=8, help="training steps per method")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    parser.add_argument("--online", choices=["grpo", "rloo"], default="grpo")
    parser.add_argument("--pairs", type=int, default=512, help="preference pairs used (first n)")
    a = parser.parse_args(argv)

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    cfg = load_config("align", AlignConfig, a.params)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=a.steps, warmup_ratio=0.0))
    rows = preference_rows(cfg.train_file)[: a.pairs]
    tokenizer = load_tokenizer(cfg.model)
    sft_data = Dataset.from_list([{"prompt": r["prompt"], "completion": [{"role": "assistant", "content": r["chosen"]}]}
                                  for r in rows])
    pairs = trl_pairs(rows)
    prompts = Dataset.from_list([{"prompt": r["prompt"]} for r in rows])
    print(f"model {cfg.model}, {len(rows)} pairs from {cfg.train_file}, adapter {cfg.adapter.method}, "
          f"batch {cfg.train.batch_size}, {a.steps} steps each ({a.warmup} warm-up)", flush=True)

    def policy():
        set_seed(cfg.seed)
        return load_for_training(cfg.model, cfg.adapter)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["sft"] = timed("sft", lambda: SFTTrainer(
            model=policy(), processing_class=tokenizer, train_dataset=sft_data, peft_config=peft_config(cfg.adapter),
            args=args_for(SFTConfig, cfg, tmp, max_length=cfg.train.max_length, completion_only_loss=True)), a.warmup)
        results["dpo"] = timed("dpo", lambda: DPOTrainer(
            model=policy(), processing_class=tokenizer, train_dataset=pairs, peft_config=peft_config(cfg.adapter),
            args=args_for(DPOConfig, cfg, tmp, max_length=cfg.train.max_length, beta=cfg.beta)), a.warmup)
        if a.online == "grpo":
            from trl import GRPOConfig as Config, GRPOTrainer as Trainer
        else:
            from trl import RLOOConfig as Config, RLOOTrainer as Trainer
        g = cfg.generation
        results[a.online] = timed(a.online, lambda: Trainer(
            model=policy(), processing_class=tokenizer, train_dataset=prompts, peft_config=peft_config(cfg.adapter),
            reward_funcs=load_reward_model(cfg.reward_model),
            reward_processing_classes=load_tokenizer(cfg.reward_model),
            args=args_for(Config, cfg, tmp, beta=cfg.beta, num_generations=g.num_generations,
                          max_completion_length=g.max_completion_length, temperature=g.temperature)), a.warmup)

    sft = results["sft"]["step_s"]
    print("\n| method | s/step | x SFT | tokens/step |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['step_s']:.3f} | {r['step_s'] / sft:.2f} | {r['tokens_per_step']:.0f} |")
    print(f"\nDPO / SFT step time: {results['dpo']['step_s'] / sft:.2f}x;  "
          f"{a.online.upper()} / SFT: {results[a.online]['step_s'] / sft:.2f}x")
    return results


if __name__ == "__main__":
    main()
