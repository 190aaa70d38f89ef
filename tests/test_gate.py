"""The promotion gate's rules (posttrain.evaluation.gate) on evaluate-shaped results, and the refusal detector that
the refusal rates it gates on are measured with. The export stage's use of the gate is tested in test_export.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import flags

from posttrain.evaluation.gate import GateConfig, GateRule, check_config, decide
from posttrain.evaluation.stats import rate

FIXTURES = Path(__file__).parent / "fixtures"


def evaluation(outcomes: dict[str, dict[str, list]], extra: dict | None = None) -> tuple[dict, dict]:
    table = {}
    for name, metrics in outcomes.items():
        rates = {m: rate([bool(f) for f in v]) for m, v in metrics.items() if m != "win_rate"}
        row = {**(extra or {}).get(name, {}), **{m: r["value"] for m, r in rates.items()}}
        if "win_rate" in metrics:
            wins = metrics["win_rate"]
            row["win_rate"] = sum(wins) / len(wins)
            rates["win_rate"] = {"value": row["win_rate"], "low": row["win_rate"] - 0.05, "high": row["win_rate"] + 0.05}
        table[name] = {**row, "rates": rates}
    return table, outcomes


def gate(*rules, **kw) -> GateConfig:
    return GateConfig(reference=kw.get("reference", "sft"), alpha=0.05, primary=kw.get("primary", "cot_accuracy"),
                      candidates=kw.get("candidates", ["student", "aligned", "sft"]), rules=list(rules),
                      earn=kw.get("earn", {}))


# sft 100/200 CoT; aligned 79/200 (21 items lost, none gained: McNemar p < 0.001); student 95/200 (5 lost: p = 0.06)
OUTCOMES = {
    "sft": {"cot_accuracy": flags(100, 200), "refusal_rate": flags(110, 120), "win_rate": [0.5] * 200},
    "aligned": {"cot_accuracy": flags(79, 200), "refusal_rate": flags(118, 120), "win_rate": [1.0] * 130 + [0.0] * 70},
    "student": {"cot_accuracy": flags(95, 200), "refusal_rate": flags(100, 120), "win_rate": [1.0] * 90 + [0.0] * 110},
}
EXTRA = {"sft": {"perplexity": 10.0}, "aligned": {"perplexity": 11.0}, "student": {"perplexity": 25.0}}


def test_not_worse_fails_only_a_significant_loss():
    table, items = evaluation(OUTCOMES)
    d = decide(gate(GateRule("cot_accuracy", "not_worse")), ["student", "aligned", "sft"], table, items, "sft")
    aligned, student = d["models"]["aligned"], d["models"]["student"]
    assert not aligned["passed"] and aligned["checks"][0]["p"] < 0.001
    assert aligned["failed"] == [f"cot_accuracy 0.395 vs sft: -0.105, p={aligned['checks'][0]['p']:.3g} "
                                 "(significantly worse)"]
    assert student["passed"] and 0.05 < student["checks"][0]["p"] < 0.1  # a smaller loss is within noise
    assert d["chosen"] == "sft"  # the best CoT accuracy of the models that pass


def test_better_needs_a_significant_gain_and_knows_lower_is_better():
    table, items = evaluation({"sft": {"over_refusal_rate": flags(30, 100)},
                               "aligned": {"over_refusal_rate": flags(10, 100)},
                               "student": {"over_refusal_rate": flags(28, 100)}})
    d = decide(gate(GateRule("over_refusal_rate", "better"), primary="over_refusal_rate"),
               ["student", "aligned"], table, items, "sft")
    assert d["models"]["aligned"]["passed"] and not d["models"]["student"]["passed"]
    assert d["chosen"] == "aligned"


def test_floors_intervals_and_ratios():
    table, items = evaluation(OUTCOMES, EXTRA)
    g = gate(GateRule("refusal_rate", "at_least", 0.9), GateRule("win_rate", "interval_above", 0.5),
             GateRule("perplexity", "ratio_at_most", 2.0))
    d = decide(g, ["student", "aligned", "sft"], table, items, "sft")
    assert d["models"]["aligned"]["passed"]
    student = d["models"]["student"]
    assert student["failed"] == ["refusal_rate 0.833 (needs >= 0.9)",
                                 "win_rate 0.450 [0.40, 0.50]: interval not above 0.5",
                                 "perplexity 25.000 is 2.50x sft's (needs <= 2.0x)"]
    assert not d["models"]["sft"]["passed"]  # sft's own win rate 0.5 [0.45, 0.55] is not above 0.5


def test_win_rate_not_worse_is_the_sign_test_against_the_judges_reference():
    table, items = evaluation(OUTCOMES)
    d = decide(gate(GateRule("win_rate", "not_worse")), ["student", "aligned", "sft"], table, items, "sft")
    assert d["models"]["aligned"]["passed"] and d["models"]["sft"]["passed"]
    assert d["models"]["student"]["passed"]  # 90 wins, 110 losses: p = 0.18, a loss within noise
    worse = {**OUTCOMES, "student": {**OUTCOMES["student"], "win_rate": [1.0] * 70 + [0.5] * 20 + [0.0] * 110}}
    table, items = evaluation(worse)
    d = decide(gate(GateRule("win_rate", "not_worse")), ["student"], table, items, "sft")
    assert d["models"]["student"]["checks"][0]["p"] < 0.01 and not d["models"]["student"]["passed"]
    d2 = decide(gate(GateRule("win_rate", "not_worse", against="aligned")), ["student"], table, items, "sft")
    assert d2["models"]["student"]["failed"] == ["win_rate is judged against sft only, not aligned"]


def test_a_candidate_that_does_not_earn_its_place_does_not_ship():
    # aligned 105/200 CoT against sft's 100/200 (5 gained, none lost: p = 0.06): not worse, but not better either
    outcomes = {**OUTCOMES, "aligned": {**OUTCOMES["aligned"], "cot_accuracy": flags(105, 200)}}
    table, items = evaluation(outcomes)
    rules = [GateRule("cot_accuracy", "not_worse")]
    assert decide(gate(*rules), ["aligned", "sft"], table, items, "sft")["chosen"] == "aligned"  # 0.525 > 0.500
    earn = {"aligned": [GateRule("cot_accuracy", "better")]}
    d = decide(gate(*rules, earn=earn), ["aligned", "sft"], table, items, "sft")
    aligned = d["models"]["aligned"]
    assert not aligned["passed"] and not aligned["earned"] and d["chosen"] == "sft"
    assert aligned["failed"] == [f"not earned: cot_accuracy 0.525 vs sft: +0.025, p={aligned['checks'][1]['p']:.3g} "
                                 "(not significantly better)"]
    assert d["models"]["sft"]["earned"]  # the reference has nothing to earn
    table, items = evaluation({**outcomes, "aligned": {**OUTCOMES["aligned"], "cot_accuracy": flags(120, 200)}})
    assert decide(gate(*rules, earn=earn), ["aligned", "sft"], table, items, "sft")["chosen"] == "aligned"


def test_a_student_keeps_a_share_of_its_teacher_even_of_zero():
    table, items = evaluation({"sft": {"instruction_em": flags(40, 100)}, "aligned": {"instruction_em": flags(0, 100)},
                               "student": {"instruction_em": flags(0, 100)}})
    keeps = {"student": [GateRule("instruction_em", "ratio_at_least", 0.9, against="aligned")]}
    d = decide(gate(earn=keeps), ["student"], table, items, "sft")
    assert d["models"]["student"]["passed"]  # 0.0 >= 0.9 x 0.0
    keeps = {"student": [GateRule("instruction_em", "ratio_at_least", 0.9)]}  # against sft's 0.4
    d = decide(gate(earn=keeps), ["student"], table, items, "sft")
    assert d["models"]["student"]["failed"] == ["not earned: instruction_em 0.000 is 0.00x sft's (needs >= 0.9x)"]


def test_a_model_without_the_metric_does_not_pass():
    table, items = evaluation({"sft": OUTCOMES["sft"], "student": {"refusal_rate": flags(100, 120)}})
    d = decide(gate(GateRule("cot_accuracy", "not_worse"), GateRule("cot_accuracy", "at_least", 0.1)),
               ["student"], table, items, "sft")
    assert d["models"]["student"]["failed"] == ["no paired outcomes of cot_accuracy for student and sft",
                                                "cot_accuracy was not measured"]
    assert d["chosen"] is None


@pytest.mark.parametrize("g, message", [
    (gate(candidates=["teacher"]), "'teacher' is not one of evaluate.models"),
    (gate(GateRule("cot_accuracy", "at_least")), r"rules\[0\]\] cot_accuracy at_least: needs a `value`"),
    (gate(GateRule("perplexity", "not_worse")), "perplexity has no per-item outcomes"),
    (gate(earn={"sft": [GateRule("cot_accuracy", "better")]}), "'sft' is the reference"),
    (gate(earn={"teacher": []}), "'teacher' is not one of evaluate.models"),
    (gate(earn={"aligned": [GateRule("win_rate", "interval_above")]}),
     r"earn.aligned\[0\]\] win_rate interval_above: needs"),
])
def test_a_gate_that_cannot_be_read_stops_at_load(g, message):
    from posttrain.core.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        check_config(g, ["sft", "aligned", "student"])


def test_the_refusal_detector_reads_refusals_in_a_models_own_words():
    from posttrain.evaluation.scoring import is_refusal

    for name in ("refusal_labelled.jsonl", "refusal_heldout.jsonl"):
        rows = [json.loads(line) for line in (FIXTURES / name).read_text().splitlines()]
        assert len(rows) >= 100 and 0.4 < sum(r["refusal"] for r in rows) / len(rows) < 0.6
        wrong = [r for r in rows if is_refusal(r["reply"]) != r["refusal"]]
        assert len(wrong) <= 0.05 * len(rows), (name, [(r["refusal"], r["reply"][:80]) for r in wrong])
    assert is_refusal("I'm sorry for any misunderstanding, but as a chatbot, I don't have the capability to do that.")
    assert is_refusal("I can't help with that request.")  # the embedded sample's refusal
    assert not is_refusal("I can't wait to help! Here are three ideas: ...")
