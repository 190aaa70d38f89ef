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

import csv
from dataclasses import dataclass
from pathlib import Path

from posttrain.core.cli import run_stage
from posttrain.core.config import ConfigError, TrackingConfig
from posttrain.core.files import read_jsonl, write_json
from posttrain.core.markdown import markdown_table
from posttrain.core.runtime import set_seed, set_threads
from posttrain.core.tracking import log_stage_metrics, stage_run
from posttrain.evaluation.benchmarks import BenchmarkConfig, BenchmarkRunner
from posttrain.evaluation.decoding import DecodeConfig
from posttrain.evaluation.scoring import generate
from posttrain.evaluation.stats import mcnemar, paired_bootstrap, rate
from posttrain.evaluation.suites import RATES, SUITES, kl_along, prefers_chosen, score_model, win_rate, wins
from posttrain.evaluation.textmetrics import text_scores
from posttrain.model.loading import load_model, load_tokenizer, local_path
from posttrain.model.reward_model import has_reward_model, load_reward_model, reward_scores

PREFERENCE = ("reward_score", "win_rate", "kl_to_ref")  # judged on the held-out preference prompts
PAIRED = (*RATES, "prefers_chosen")  # rates over the same items for every model: McNemar against the reference
COLUMNS = ("perplexity", "instruction_em", "cot_accuracy", "refusal_rate", "over_refusal_rate", "prefers_chosen",
           *PREFERENCE, "params")
TEXT = ("instruction_rougeL", "instruction_bleu", "instruction_f1")  # the instruction suite's answers vs its references


def columns(benchmarks) -> tuple[str, ...]:
    """The table's columns: the suites', the text scores, one per benchmark, the judge's, params."""
    suites = COLUMNS[: -len(PREFERENCE) - 1]
    return (*suites, *TEXT, *benchmarks, *PREFERENCE, "params")


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


class Judge:
    """The reward model and the reference's answers and rewards on the held-out preference prompts."""

    def __init__(self, cfg: EvaluateConfig, prompts: list[list[dict]]):
        self.cfg, self.prompts = cfg, prompts
        self.reward, self.reward_tokenizer = load_reward_model(cfg.reward_model), load_tokenizer(cfg.reward_model)
        path = cfg.models[cfg.reference]
        self.ref, self.ref_tokenizer = load_model(path), load_tokenizer(path)
        self.ref_answers = generate(self.ref, self.ref_tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size,
                                    cfg.decode)
        self.ref_rewards = self.score(self.ref_answers)
        self.outcomes: dict[str, list[float]] = {}  # per model, per prompt: 1 win, 0.5 tie, 0 loss against the reference

    def score(self, answers: list[str]) -> list[float]:
        """Rewards of answers to the first len(answers) prompts."""
        prompts = self.prompts[: len(answers)]
        return reward_scores(self.reward, self.reward_tokenizer, prompts, answers, self.cfg.batch_size,
                             self.cfg.reward_max_length)

    def __call__(self, name: str, model, tokenizer) -> tuple[dict, list[str]]:
        """reward_score, win_rate and kl_to_ref of one model, and its answers."""
        if name == self.cfg.reference:  # already generated and scored; KL to itself is 0
            rewards = self.ref_rewards
            self.outcomes[name] = [0.5] * len(rewards)
            return {"reward_score": sum(rewards) / len(rewards), "win_rate": 0.5, "kl_to_ref": 0.0}, self.ref_answers
        answers = generate(model, tokenizer, self.prompts, self.cfg.max_new_tokens, self.cfg.batch_size,
                           self.cfg.decode)
        rewards = self.score(answers)
        self.outcomes[name] = wins(rewards, self.ref_rewards)
        same_vocab = tokenizer.get_vocab() == self.ref_tokenizer.get_vocab()
        return {
            "reward_score": sum(rewards) / len(rewards),
            "win_rate": win_rate(rewards, self.ref_rewards),
            "kl_to_ref": kl_along(model, self.ref, tokenizer, self.prompts, answers, self.cfg.batch_size)
            if same_vocab else None,  # token-level KL needs one vocabulary
        }, answers


def rate_stats(flags: dict[str, list[bool]], reference: dict[str, list[bool]], is_reference: bool) -> dict:
    """Each rate's n and 95 % Wilson interval, and against the reference model (the same items): the
    difference and McNemar's exact p-value."""
    out = {}
    for metric, passed in flags.items():
        r = rate(passed)
        if not is_reference and passed:
            ref = reference[metric]
            r["diff_vs_reference"] = sum(passed) / len(passed) - sum(ref) / len(ref)
            r["p_vs_reference"] = mcnemar(passed, ref)
        out[metric] = r
    return out


def win_rate_stats(outcomes: list[float], is_reference: bool) -> dict:
    """The win rate's n and 95 % percentile bootstrap interval (resampling prompts), and against the reference
    (whose win rate is 0.5 by definition) the difference from 0.5 and the exact sign test on the prompts that
    were not ties (McNemar's test on wins against losses)."""
    boot = paired_bootstrap(outcomes, [0.0] * len(outcomes))
    r = {"value": boot["diff"], "n": len(outcomes), "low": boot["low"], "high": boot["high"]}
    if not is_reference:
        r["diff_vs_reference"] = boot["diff"] - 0.5
        r["p_vs_reference"] = mcnemar([o == 1.0 for o in outcomes], [o == 0.0 for o in outcomes])
    return r


def _cell(row: dict, column: str) -> str:
    value = row[column]
    if value is None:
        return "n/a"
    if not isinstance(value, float):
        return str(value)
    r = row.get("rates", {}).get(column)
    return f"{value:.3f} [{r['low']:.2f}, {r['high']:.2f}]" if r else f"{value:.3f}"


def write_report(path: str, table: dict[str, dict], samples: dict[str, list], reference: str = "",
                 judged: dict[str, list] | None = None, cols: tuple[str, ...] = COLUMNS,
                 paired: tuple[str, ...] = PAIRED) -> None:
    lines = ["# Evaluation", "", markdown_table(["model", *cols], [[name, *(_cell(row, c) for c in cols)]
                                                                  for name, row in table.items()])]
    first = next(iter(table.values()), {})
    sizes = ", ".join(f"{m} n={r['n']}" for m, r in first.get("rates", {}).items())
    lines += ["", f"Rates with their 95 % Wilson interval [low, high]; {sizes}. A difference between two models is "
              "real when McNemar's test on the same items says so (below), not when a third decimal differs."]
    if reference:
        def vs_reference(r: dict) -> str:
            if r.get("p_vs_reference") is None:
                return "n/a"
            return f"{r['diff_vs_reference']:+.3f}, p={r['p_vs_reference']:.3f}"

        lines += ["", f"## Against {reference} (the same items)", "",
                  markdown_table(["model", *(f"{m}: diff, p" for m in paired)],
                                 [[name, *(vs_reference(row.get("rates", {}).get(m, {})) for m in paired)]
                                  for name, row in table.items() if name != reference])]
        lines += ["", f"reward_score: mean reward-model score of the model's answers to the held-out preference "
                  f"prompts; win_rate: share of those prompts where it beats {reference}'s answer (ties half), "
                  "with a 95 % bootstrap interval over the prompts; against the reference its diff is from 0.5 and its "
                  "p the exact sign test on the prompts that were not ties; "
                  f"kl_to_ref: KL(model || {reference}) summed over the answer's tokens, mean per prompt (nats). "
                  "prefers_chosen: share of the held-out human-labelled pairs where the model itself gives the "
                  "chosen reply the higher mean log-likelihood per token (no judge involved)."]
    generations = [[name, *row] for name, rows in samples.items() for row in rows]
    generations += [[name, "preference", p, g, f"reward {r:.2f}"] for name, rows in (judged or {}).items()
                    for p, g, r in rows]
    lines += ["", "## Sample generations", "",
              markdown_table(["model", "suite", "prompt", "generation", "reference"], generations, cell=str)]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")


def write_plot(path: str, table: dict[str, dict], cols: tuple[str, ...] = COLUMNS) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", *cols])
        for name, row in table.items():
            writer.writerow([name, *(row[c] for c in cols)])


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
