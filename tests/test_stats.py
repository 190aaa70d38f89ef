"""The intervals and paired tests evaluate reports (posttrain.evaluation.stats), against values computed by hand or by
scipy's own implementations where it is installed."""

from __future__ import annotations

import math

import pytest

from posttrain.evaluation.stats import mcnemar, paired_bootstrap, rate, wilson


def test_wilson_interval_matches_the_formula_and_reads_na_when_empty():
    low, high = wilson(8, 200)
    assert (round(low, 4), round(high, 4)) == (0.0204, 0.0769)  # 8 of 200 (the "rft lowers CoT" example)
    assert wilson(0, 10)[0] == 0.0 and 0.25 < wilson(0, 10)[1] < 0.35  # never a zero-width interval at 0
    assert wilson(0, 0) is None
    assert rate([]) == {"value": None, "n": 0, "low": None, "high": None}


def test_mcnemar_exact_p_values():
    # 10 items told apart, all in favour of a: two-sided binomial p = 2 * 0.5**10
    a = [True] * 10 + [True] * 5
    b = [False] * 10 + [True] * 5
    assert mcnemar(a, b) == pytest.approx(2 * 0.5**10)
    assert mcnemar(a, a) == 1.0  # nothing tells them apart
    assert mcnemar([True, False], [False, True]) == 1.0
    # 2 of 200 prompts (the "aligned beats sft on EM" example) is no evidence
    assert mcnemar([True, True] + [False] * 198, [False] * 200) == 0.5
    assert mcnemar([], []) is None
    with pytest.raises(ValueError, match="different lengths"):
        mcnemar([True], [])


def test_mcnemar_agrees_with_scipys_binomial_test():
    scipy_stats = pytest.importorskip("scipy.stats")
    a = [True] * 7 + [False] * 2 + [True] * 20
    b = [False] * 7 + [True] * 2 + [True] * 20
    assert mcnemar(a, b) == pytest.approx(scipy_stats.binomtest(2, 9, 0.5).pvalue)


def test_paired_bootstrap_brackets_the_mean_difference():
    a = [1.0, 2.0, 3.0, 4.0] * 10
    b = [0.5, 1.5, 2.5, 3.5] * 10
    out = paired_bootstrap(a, b)
    assert out["diff"] == pytest.approx(0.5) and out["low"] == pytest.approx(0.5) and out["high"] == pytest.approx(0.5)
    noisy = paired_bootstrap([1.0, 0.0] * 20, [0.0, 1.0] * 20)
    assert noisy["low"] < 0 < noisy["high"] and math.isclose(noisy["diff"], 0.0, abs_tol=1e-12)


def test_prefers_chosen_reads_the_models_own_likelihood(lifecycle):
    """Batched and padded, prefers_chosen decides as one unpadded sequence at a time does: the mean log-probability
    per token of the reply after its prompt, chosen against rejected."""
    import torch

    from posttrain.core.files import read_jsonl
    from posttrain.evaluation.chat import prompt_and_answer_ids
    from posttrain.evaluation.suites import prefers_chosen
    from posttrain.model.loading import load_model, load_tokenizer

    sft = lifecycle["workdir"] / "models/sft"
    model, tok = load_model(sft), load_tokenizer(sft)
    rows = read_jsonl(lifecycle["workdir"] / "data/processed/sft_train.jsonl")[:24]
    pairs = [{"prompt": a["prompt"], "chosen": a["completion"][-1]["content"],
              "rejected": b["completion"][-1]["content"]} for a, b in zip(rows, rows[1:] + rows[:1])]

    def mean_logp(messages, reply):
        head, tail = prompt_and_answer_ids(tok, messages, reply)
        ids = torch.tensor([head + tail])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        return logp[len(head) - 1 :].gather(-1, ids[0, len(head):, None]).mean().item()

    expected = [mean_logp(p["prompt"], p["chosen"]) > mean_logp(p["prompt"], p["rejected"]) for p in pairs]
    assert 0 < sum(expected) < len(expected)  # both outcomes occur: the comparison is tested both ways
    assert prefers_chosen(model, tok, pairs, batch_size=5) == expected
    as_prepared = [{**p, "chosen": [{"role": "assistant", "content": p["chosen"]}],  # prepare's layout
                    "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]
    assert prefers_chosen(model, tok, as_prepared, batch_size=5) == expected
