"""evaluate: every model of the lineage on the same held-out suites, one comparison table.

Suites (from prepare): held-out corpus perplexity, exact match on instruction tasks, final-answer
accuracy on chain-of-thought problems, refusal rate on harmful prompts and over-refusal on benign ones.
Writes metrics/evaluate.json (dvc metrics), plots/evaluate.csv (dvc plots) and reports/evaluate.md
(the table plus sample generations).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from stages.common import read_jsonl, set_seed, set_threads, write_json
from stages.config import TrackingConfig, cli
from stages.models import load_model, load_tokenizer
from stages.scoring import exact_match, final_answer, generate, is_refusal, perplexity
from stages.tracking import log_stage_metrics, stage_run

SUITES = ("instruction", "cot", "harmful", "benign")
COLUMNS = ("perplexity", "instruction_em", "cot_accuracy", "refusal_rate", "over_refusal_rate", "params")


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
    num_threads: int
    samples_per_suite: int  # generations shown in the report
    report: str
    plot: str


def score_model(model, tokenizer, suites: dict[str, list[dict]], corpus: list[str], cfg: EvaluateConfig,
                generations: dict | None = None):
    """All suite scores of one model, plus a few sample generations per suite.

    `generations`, if given, receives every suite's generations (suite -> list of str).
    """
    gens = {s: generate(model, tokenizer, [r["prompt"] for r in rows], cfg.max_new_tokens, cfg.batch_size)
            for s, rows in suites.items()}
    if generations is not None:
        generations.update(gens)
    share = lambda flags: sum(flags) / max(len(flags), 1)  # noqa: E731
    scores = {
        "perplexity": perplexity(model, tokenizer, corpus, cfg.block_size, cfg.batch_size),
        "instruction_em": share([exact_match(g, r["answer"]) for g, r in zip(gens["instruction"], suites["instruction"])]),
        "cot_accuracy": share([final_answer(g) == r["answer"] for g, r in zip(gens["cot"], suites["cot"])]),
        "refusal_rate": share([is_refusal(g) for g in gens["harmful"]]),
        "over_refusal_rate": share([is_refusal(g) for g in gens["benign"]]),
        "params": sum(p.numel() for p in model.parameters()),
    }
    samples = [(s, rows[i]["prompt"][-1]["content"], gens[s][i], rows[i].get("answer", ""))
               for s, rows in suites.items() for i in range(min(cfg.samples_per_suite, len(rows)))]
    return scores, samples


def write_report(path: str, table: dict[str, dict], samples: dict[str, list]) -> None:
    lines = ["# Evaluation", "", "| model | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, row in table.items():
        cells = [f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Sample generations", "", "| model | suite | prompt | generation | reference |", "|---|---|---|---|---|"]
    esc = lambda t: str(t).replace("|", "\\|").replace("\n", " ⏎ ")  # noqa: E731
    for name, rows in samples.items():
        lines += [f"| {name} | {s} | {esc(p)} | {esc(g)} | {esc(a)} |" for s, p, g, a in rows]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")


def write_plot(path: str, table: dict[str, dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", *COLUMNS])
        for name, row in table.items():
            writer.writerow([name, *(row[c] for c in COLUMNS)])


def run(cfg: EvaluateConfig) -> dict:
    set_seed(cfg.seed)
    set_threads(cfg.num_threads)
    data = Path(cfg.data_dir)
    suites = {s: read_jsonl(data / f"eval_{s}.jsonl")[: cfg.max_per_suite] for s in SUITES}
    corpus = [r["text"] for r in read_jsonl(data / "corpus_eval.jsonl")]
    table, samples = {}, {}
    with stage_run("evaluate", cfg, inputs={"data": cfg.data_dir, **cfg.models}):
        for name, path in cfg.models.items():
            model, tokenizer = load_model(path), load_tokenizer(path)
            table[name], samples[name] = score_model(model, tokenizer, suites, corpus, cfg)
            print(f"[evaluate] {name}: " + ", ".join(f"{k}={v:.3f}" for k, v in table[name].items()), flush=True)
            log_stage_metrics(table[name], prefix=f"{name}.")
        write_report(cfg.report, table, samples)
        write_plot(cfg.plot, table)
        import mlflow

        mlflow.log_artifact(cfg.report)
    write_json("metrics/evaluate.json", table)
    return table


if __name__ == "__main__":
    cli("evaluate", EvaluateConfig, run)
