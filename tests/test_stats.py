"""The intervals and paired tests evaluate reports (posttrain.stats), against values computed by hand or by
scipy's own implementations where it is installed."""

from __future__ import annotations

import math

import pytest

from posttrain.stats import mcnemar, paired_bootstrap, rate, wilson


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
