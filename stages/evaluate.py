"""evaluate: every model of the lineage on the same held-out suites, one comparison table.

Suites (from prepare): held-out corpus perplexity, exact match on instruction tasks, final-answer
accuracy on chain-of-thought problems, refusal rate on harmful prompts and over-refusal on benign ones.
Preference (the held-out preference prompts, judged by the trained reward model): each model's mean
reward, its win rate against the `reference` model (ties count half) and its KL to the reference
along its own answers.
Text scores of the instruction suite's answers: ROUGE-L, BLEU and token F1 (posttrain.evaluation.textmetrics).
Benchmarks (`benchmarks`, posttrain.evaluation.benchmarks): lm-evaluation-harness tasks on local files in the
benchmarks' published layouts (GSM8K, ARC, MMLU), a column each, with n and a 95 % Wilson interval.
Writes metrics/evaluate.json (dvc metrics), plots/evaluate.csv (dvc plots) and reports/evaluate.md
(the table plus sample generations).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from posttrain.core.cli import run_stage
from posttrain.core.config import ConfigError, TrackingConfig
from posttrain.core.files import read_jsonl, write_json
from posttrain.core.runtime import set_seed, set_threads
from posttrain.core.tracking import log_stage_metrics, stage_run
from posttrain.evaluation.benchmarks import BenchmarkConfig, BenchmarkRunner
from posttrain.evaluation.decoding import DecodeConfig
from posttrain.evaluation.judge import Judge
from posttrain.evaluation.report import (COLUMNS, PAIRED, PREFERENCE, TEXT, columns, rate_stats, win_rate_stats,
                                         write_plot, write_report)
from posttrain.evaluation.stats import rate
from posttrain.evaluation.suites import SUITES, prefers_chosen, score_model
from posttrain.evaluation.textmetrics import text_scores
from posttrain.model.loading import load_model, load_tokenizer, local_path
from posttrain.model.reward_model import has_reward_model

@dataclass(frozen=True)
class EvaluateConfig:
    seed: int
    tracking: TrackingConfig
    models: dict[str, str]  # name -> model folder, in lineage order
    data_dir: str  # prepare's out_dir: corpus_eval.jsonl and eval_<suite>.jsonl
    max_per_suite: int
    max_new_tokens: int
    block_size: int  # perplexity block length
    batch_size: int
    decode: DecodeConfig  # params.yaml defaults.decode: how the suites' answers are decoded
    num_threads: int
    samples_per_suite: int  # generations shown in the report
    report: str
    items: str  # every model's per-item outcomes (pass/fail per suite item, win/tie/loss per judged prompt): the
    #             paired tests of export's promotion gate (posttrain.evaluation.gate) read them
    plot: str
    reward_model: str  # judges every model's answers to the held-out preference prompts
    reward_max_length: int  # the judge reads the last this many tokens of prompt + answer
    reference: str  # the name in `models` that win rate and KL are measured against
    benchmarks: dict[str, BenchmarkConfig]  # lm-eval tasks on local files, a column each; {} = none

    def __post_init__(self):
        if self.reference not in self.models:
            raise ConfigError(f"[evaluate.reference] {self.reference!r} is not one of evaluate.models "
                              f"({', '.join(self.models)})")


def run(cfg: EvaluateConfig) -> dict:
    set_seed(cfg.seed)
    set_threads(cfg.num_threads)
    benchmarks = BenchmarkRunner(cfg.benchmarks, cfg.seed, cfg.batch_size,  # checks their files before a model loads
                                 taken=(*COLUMNS, *TEXT, "rates", "benchmarks"))
    data = Path(cfg.data_dir)
    suites = {s: read_jsonl(data / f"eval_{s}.jsonl")[: cfg.max_per_suite] for s in SUITES}
    corpus = [r["text"] for r in read_jsonl(data / "corpus_eval.jsonl")]
    preference_pairs = read_jsonl(data / "preference_eval.jsonl")[: cfg.max_per_suite]
    preference_prompts = [r["prompt"] for r in preference_pairs]
    table, samples, judged, flags = {}, {}, {}, {}
    with stage_run("evaluate", cfg, inputs={"data": cfg.data_dir, "reward_model": cfg.reward_model, **cfg.models}):
        judge = Judge(cfg, preference_prompts) if has_reward_model(cfg.reward_model) and preference_prompts else None
        scored: dict[str, str] = {}  # the model folder actually loaded -> the first name that scored it
        for name, path in cfg.models.items():
            same = scored.get(local_path(path))
            if same is not None:  # a switched-off stage passes this model on: the same model, scored once
                table[name], samples[name], judged[name] = dict(table[same]), samples[same], judged[same]
                flags[name] = flags[same]
                print(f"[evaluate] {name}: the same model as {same} ({path} passes it on)", flush=True)
                log_stage_metrics(table[name], prefix=f"{name}.")
                continue
            scored[local_path(path)] = name
            model, tokenizer = load_model(path), load_tokenizer(path)
            flags[name], gens = {}, {}
            table[name], samples[name] = score_model(model, tokenizer, suites, corpus, cfg, cfg.decode, generations=gens,
                                                     flags=flags[name])
            table[name].update(text_scores(gens["instruction"], [r["answer"] for r in suites["instruction"]],
                                           prefix="instruction_"))
            flags[name]["prefers_chosen"] = prefers_chosen(model, tokenizer, preference_pairs, cfg.batch_size)
            table[name]["prefers_chosen"] = rate(flags[name]["prefers_chosen"])["value"]
            if judge is None:
                preference, answers = dict.fromkeys(PREFERENCE), []
            else:
                preference, answers = judge(name, model, tokenizer)
            table[name] = {**table[name], **preference}
            if cfg.benchmarks:
                scores = benchmarks.run(model, tokenizer, flags=flags[name], samples=samples[name],
                                        n_samples=cfg.samples_per_suite)
                table[name].update({task: r["value"] for task, r in scores.items()}, benchmarks=scores)
            n = min(cfg.samples_per_suite, len(answers))
            judged[name] = list(zip([p[-1]["content"] for p in preference_prompts[:n]], answers[:n],
                                    judge.score(answers[:n]))) if judge is not None else []
            print(f"[evaluate] {name}: " + ", ".join(f"{k}={v:.3f}" for k, v in table[name].items()
                                                      if isinstance(v, (int, float))), flush=True)
            log_stage_metrics(table[name], prefix=f"{name}.")
        for name in table:
            table[name]["rates"] = rate_stats(flags[name], flags[cfg.reference], name == cfg.reference)
            if judge is not None:
                table[name]["rates"]["win_rate"] = win_rate_stats(judge.outcomes[name], name == cfg.reference)
        cols = columns(cfg.benchmarks)
        paired = (*PAIRED, *cfg.benchmarks, *(["win_rate"] if judge is not None else []))
        write_report(cfg.report, table, samples, cfg.reference, judged, cols, paired)
        write_plot(cfg.plot, table, cols)
        write_json(cfg.items, {name: {**{m: [int(f) for f in fl] for m, fl in flags[name].items()},
                                      **({"win_rate": judge.outcomes[name]} if judge is not None else {})}
                               for name in table})
        import mlflow

        mlflow.log_artifact(cfg.report)
    benchmarks.close()
    write_json("metrics/evaluate.json", table)
    return table


if __name__ == "__main__":
    run_stage("evaluate", EvaluateConfig, run)
