"""The promotion gate: what a model must show in evaluate's results before export ships it (params.yaml export.gate).

Each rule reads one metric of metrics/evaluate.json and, for the paired tests, the per-item outcomes evaluate
writes beside it (reports/evaluate_items.json): the same items scored for two models, so a difference is judged by
McNemar's exact test (win rate: the exact sign test on the prompts that were not ties), not by its third decimal.

    not_worse        not significantly worse than `against` (default: gate.reference) at gate.alpha
    better           significantly better than `against` at gate.alpha
    at_least/at_most the value is >= / <= `value`
    interval_above   the 95 % interval's low end is above `value` (e.g. win_rate above 0.5)
    interval_below   the 95 % interval's high end is below `value`
    ratio_at_least   value >= `value` x against's (a student keeping 90 % of its teacher: 0.9)
    ratio_at_most    value <= `value` x against's (perplexity within 2x: 2.0)

`rules` hold for every model judged; `earn` adds, per candidate, what that model's stage is for (aligned: the judge
prefers it; rft: better worked answers; the student: most of its teacher's scores). A candidate that does not earn
its place does not ship: the reference (sft) ships instead, and the report says which stage did not help.

"Worse" knows each metric's direction: lower is better for perplexity, over_refusal_rate and kl_to_ref.
A model missing a metric fails the rule that reads it (a gate that cannot see does not pass).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from posttrain.core.config import ConfigError
from posttrain.evaluation.stats import mcnemar

LOWER_IS_BETTER = frozenset({"perplexity", "over_refusal_rate", "kl_to_ref"})
PAIRED_TESTS = ("not_worse", "better")
RATIO_TESTS = ("ratio_at_least", "ratio_at_most")
WIN_RATE = "win_rate"  # judged against evaluate.reference only: its items are wins/ties/losses against that model


@dataclass(frozen=True)
class GateRule:
    metric: str  # a column of metrics/evaluate.json
    test: Literal["not_worse", "better", "at_least", "at_most", "interval_above", "interval_below",
                  "ratio_at_least", "ratio_at_most"]
    value: float | None = None  # the threshold (at_*, interval_*) or the ratio (ratio_*)
    against: str = ""  # paired and ratio tests: the evaluate.models name compared with ("": gate.reference)


@dataclass(frozen=True)
class GateConfig:
    reference: str  # the evaluate.models name the paired tests are against by default
    alpha: float  # a difference counts when its paired test gives p < alpha
    primary: str  # export.model auto: among the models that pass, the best of this metric ships
    candidates: list[str]  # export.model auto: the evaluate.models names considered; a tie goes to the earlier
    rules: list[GateRule] = field(default_factory=list)
    # per candidate, beyond `rules`: what it must show to ship instead of the reference (its stage's purpose)
    earn: dict[str, list[GateRule]] = field(default_factory=dict)


def check_config(gate: GateConfig, models: list[str]) -> None:
    """Stop before anything loads when the gate names a model evaluate does not score, or a rule cannot be read."""
    known = ", ".join(models)
    earn_rules = [r for rules in gate.earn.values() for r in rules]
    against = [r.against for r in gate.rules + earn_rules if r.against]
    for name in (gate.reference, *gate.candidates, *gate.earn, *against):
        if name not in models:
            raise ConfigError(f"[export.gate] {name!r} is not one of evaluate.models ({known})")
    if gate.reference in gate.earn:
        raise ConfigError(f"[export.gate.earn] {gate.reference!r} is the reference: it ships when no other candidate "
                          "earns its place, so it has nothing to earn")
    if not 0 < gate.alpha < 1:
        raise ConfigError(f"[export.gate.alpha] must be between 0 and 1, got {gate.alpha}")
    placed = [(f"rules[{i}]", r) for i, r in enumerate(gate.rules)]
    placed += [(f"earn.{n}[{i}]", r) for n, rules in gate.earn.items() for i, r in enumerate(rules)]
    for place, r in placed:
        where = f"[export.gate.{place}] {r.metric} {r.test}"
        if r.test not in PAIRED_TESTS and r.value is None:
            raise ConfigError(f"{where}: needs a `value`")
        if r.test in PAIRED_TESTS and r.metric == "perplexity":
            raise ConfigError(f"{where}: perplexity has no per-item outcomes to pair; use at_most or ratio_at_most")


def _higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


def _interval(row: dict, metric: str) -> tuple[float | None, float | None]:
    r = (row.get("rates") or {}).get(metric) or (row.get("benchmarks") or {}).get(metric) or {}
    return r.get("low"), r.get("high")


def _paired(rule: GateRule, name: str, against: str, items: dict, reference_of_judge: str, alpha: float) -> dict:
    """McNemar's test of `name` against `against` on the same items (win rate: the sign test against the judge's
    reference); the diff is the difference in rates (win rate: from 0.5)."""
    metric = rule.metric
    if metric == WIN_RATE:
        if against != reference_of_judge:
            return {"passed": False, "why": f"win_rate is judged against {reference_of_judge} only, not {against}"}
        outcomes = (items.get(name) or {}).get(WIN_RATE)
        if not outcomes:
            return {"passed": False, "why": "no judged win-rate outcomes (no judge model?)"}
        mine, theirs = [o == 1.0 for o in outcomes], [o == 0.0 for o in outcomes]
        diff = sum(outcomes) / len(outcomes) - 0.5
    else:
        mine, theirs = (items.get(name) or {}).get(metric), (items.get(against) or {}).get(metric)
        if not mine or not theirs or len(mine) != len(theirs):
            return {"passed": False, "why": f"no paired outcomes of {metric} for {name} and {against}"}
        diff = sum(mine) / len(mine) - sum(theirs) / len(theirs)
    p = 1.0 if name == against else mcnemar(mine, theirs)
    gain = diff if _higher_is_better(metric) else -diff
    significant = p is not None and p < alpha
    passed = not (significant and gain < 0) if rule.test == "not_worse" else significant and gain > 0
    return {"passed": passed, "diff": diff, "p": p, "n": len(mine)}


def judge_model(gate: GateConfig, name: str, table: dict, items: dict, reference_of_judge: str) -> list[dict]:
    """Every rule's outcome for one model: the rule, the figures it read, passed and, where it failed, why."""
    results = []
    row = table.get(name) or {}
    earn = gate.earn.get(name, [])
    for rule, is_earn in [(r, False) for r in gate.rules] + [(r, True) for r in earn]:
        against = rule.against or gate.reference
        value = row.get(rule.metric)
        out: dict = {"metric": rule.metric, "test": rule.test, "value": value, "earn": is_earn}
        if rule.test in PAIRED_TESTS:
            out["against"] = against
            out.update(_paired(rule, name, against, items, reference_of_judge, gate.alpha))
        elif value is None:
            out.update(passed=False, why=f"{rule.metric} was not measured")
        elif rule.test in ("at_least", "at_most"):
            out["threshold"] = rule.value
            out["passed"] = value >= rule.value if rule.test == "at_least" else value <= rule.value
        elif rule.test in ("interval_above", "interval_below"):
            low, high = _interval(row, rule.metric)
            bound = low if rule.test == "interval_above" else high
            out.update(threshold=rule.value, low=low, high=high)
            out["passed"] = bound is not None and (bound > rule.value if rule.test == "interval_above"
                                                   else bound < rule.value)
            if bound is None:
                out["why"] = f"{rule.metric} has no interval"
        else:  # ratio tests
            theirs = (table.get(against) or {}).get(rule.metric)
            out.update(against=against, threshold=rule.value)
            if theirs is None:
                out.update(passed=False, why=f"{against} has no {rule.metric}")
            else:  # value >= ratio x theirs, not value / theirs: 90 % of a teacher's 0.0 is 0.0, not a division by 0
                out.update(ratio=value / theirs if theirs else None, theirs=theirs)
                bound = rule.value * theirs
                out["passed"] = value >= bound if rule.test == "ratio_at_least" else value <= bound
        if not out["passed"] and "why" not in out:
            out["why"] = describe(out)
        results.append(out)
    return results


def describe(r: dict) -> str:
    """One rule's outcome in words, e.g. `cot_accuracy 0.310 vs sft: -0.105, p=0.001 (significantly worse)`."""
    m, t = r["metric"], r["test"]
    if "why" in r and "p" not in r and "ratio" not in r and "low" not in r:
        return r["why"]
    v = "n/a" if r.get("value") is None else f"{r['value']:.3f}"
    if t in PAIRED_TESTS:
        verdict = ("not significantly worse" if t == "not_worse" else "significantly better") if r["passed"] else \
            ("significantly worse" if t == "not_worse" else "not significantly better")
        return f"{m} {v} vs {r['against']}: {r['diff']:+.3f}, p={r['p']:.3g} ({verdict})"
    if t.startswith("interval"):
        low, high = r.get("low"), r.get("high")
        ci = "no interval" if low is None else f"[{low:.2f}, {high:.2f}]"
        side = "above" if t == "interval_above" else "below"
        return f"{m} {v} {ci}: interval {'' if r['passed'] else 'not '}{side} {r['threshold']}"
    if t in RATIO_TESTS:
        op = ">=" if t == "ratio_at_least" else "<="
        times = f"{r['ratio']:.2f}x" if r.get("ratio") is not None else f"vs {r['theirs']:.3f},"
        return f"{m} {v} is {times} {r['against']}'s (needs {op} {r['threshold']}x)"
    op = ">=" if t == "at_least" else "<="
    return f"{m} {v} (needs {op} {r['threshold']})"


def decide(gate: GateConfig, names: list[str], table: dict, items: dict, reference_of_judge: str) -> dict:
    """Judge every model in `names`; the one that ships is the best passing one by gate.primary (a tie: the earlier
    in `names`), or None. Returns {"models": {name: {"passed", "earned", "checks", "failed"}}, "chosen": name | None};
    `earned` is False where the `rules` pass but the model's `earn` rules do not: its stage did not help."""
    models = {}
    for name in names:
        checks = judge_model(gate, name, table, items, reference_of_judge)
        models[name] = {"passed": all(c["passed"] for c in checks), "checks": checks,
                        "earned": all(c["passed"] for c in checks if c["earn"]),
                        "failed": [("not earned: " if c["earn"] else "") + c["why"] for c in checks if not c["passed"]],
                        "primary": (table.get(name) or {}).get(gate.primary)}
    passing = [n for n in names if models[n]["passed"] and models[n]["primary"] is not None]
    sign = 1 if _higher_is_better(gate.primary) else -1
    chosen = max(passing, key=lambda n: (sign * models[n]["primary"], -names.index(n)), default=None)
    return {"models": models, "chosen": chosen, "primary": gate.primary, "reference": gate.reference,
            "alpha": gate.alpha}


def summary_lines(decision: dict) -> list[str]:
    """The gate's verdict in Markdown: what shipped and, per model, whether it passed and which rules failed."""
    chosen = decision["chosen"]
    lines = [f"Paired tests against {decision['reference']} at alpha {decision['alpha']}; among the models that pass, "
             f"the best {decision['primary']} ships. Shipped: **{chosen or 'none'}**.", "",
             f"| model | passed | earned its place | {decision['primary']} | failed rules |", "|---|---|---|---|---|"]
    for name, m in decision["models"].items():
        primary = "n/a" if m["primary"] is None else f"{m['primary']:.3f}"
        passed, earned = ("yes" if m["passed"] else "no"), ("yes" if m["earned"] else "no")
        lines.append(f"| {name} | {passed} | {earned} | {primary} | {'; '.join(m['failed']) or '-'} |")
    idle = [n for n, m in decision["models"].items() if not m["earned"]]
    if idle:
        lines += ["", f"Did not earn their place (export.gate.earn: their stage did not help here): {', '.join(idle)}."]
    return lines


def rule_lines(decision: dict) -> list[str]:
    """Every rule's figures for every model, in Markdown."""
    lines = ["| model | rule | figures | passed |", "|---|---|---|---|"]
    for name, m in decision["models"].items():
        for c in m["checks"]:
            rule = f"{c['metric']} {c['test']}" + (" (earn)" if c["earn"] else "")
            lines.append(f"| {name} | {rule} | {describe(c)} | {'yes' if c['passed'] else 'no'} |")
    return lines
