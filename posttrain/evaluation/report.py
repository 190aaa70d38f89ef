"""evaluate's comparison table: its columns, each rate's interval and paired test against the reference model,
and the report (reports/evaluate.md) and plot file (plots/evaluate.csv) it is written to."""

from __future__ import annotations

import csv
from pathlib import Path

from posttrain.core.markdown import markdown_table
from posttrain.evaluation.stats import mcnemar, paired_bootstrap, rate
from posttrain.evaluation.suites import RATES

PREFERENCE = ("reward_score", "win_rate", "kl_to_ref")  # judged on the held-out preference prompts
PAIRED = (*RATES, "prefers_chosen")  # rates over the same items for every model: McNemar against the reference
COLUMNS = ("perplexity", "instruction_em", "cot_accuracy", "refusal_rate", "over_refusal_rate", "prefers_chosen",
           *PREFERENCE, "params")
TEXT = ("instruction_rougeL", "instruction_bleu", "instruction_f1")  # the instruction suite's answers vs its references


def columns(benchmarks) -> tuple[str, ...]:
    """The table's columns: the suites', the text scores, one per benchmark, the judge's, params."""
    suites = COLUMNS[: -len(PREFERENCE) - 1]
    return (*suites, *TEXT, *benchmarks, *PREFERENCE, "params")


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


def cell(row: dict, column: str) -> str:
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
    lines = ["# Evaluation", "", markdown_table(["model", *cols], [[name, *(cell(row, c) for c in cols)]
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
