"""fer_lab.report's study table from hand-made records (no training)."""
import math
import statistics

import pytest

from fer_lab.report import (comparisons_markdown, study_comparisons, study_markdown, study_summary,
                             t_two_sided_p, welch_test)


def _rec(seed, vote, t, karg=None):
    r = {"run": f"v-s{seed}", "seed": seed, "valid_acc_vote": vote, "valid_acc_softmax_mean": vote + 0.01,
         "holdout_acc": vote, "train_time_s": t, "saturation_warnings": 0}
    if karg is not None:
        r["karg_median_sp"], r["karg_median_ch"] = karg, 2 * karg
    return r


def test_study_summary_mean_sd_min_over_seeds():
    recs = {"a": [_rec(0, 0.80, 900.0, 1.0), _rec(1, 0.82, 600.0, 3.0), _rec(2, 0.84, 750.0, 2.0)],
            "b": [_rec(0, 0.70, 500.0)]}
    s = study_summary(recs, labels={"a": "variant A"})
    a = s["a"]["valid_acc_vote"]
    assert math.isclose(a["mean"], 0.82) and math.isclose(a["sd"], 0.02) and a["n"] == 3   # ddof 1
    assert s["a"]["train_time_s"]["min"] == 600.0 and "seed" not in s["a"]
    assert s["b"]["valid_acc_vote"]["sd"] is None and s["b"]["label"] == "b"
    table = study_markdown(s).splitlines()
    assert len(table) == 4 and "train s (fastest)" in table[0]
    a_cells = [c.strip() for c in table[2].split("|")]
    assert a_cells[1:6] == ["variant A", "3", "82.0 ± 2.0", "83.0 ± 2.0", "82.0 ± 2.0"]
    assert a_cells[6] == "750 ± 150 (600)"
    assert a_cells[7] == "2 ± 1.0e+00 / 4 ± 2.0e+00"
    b_cells = [c.strip() for c in table[3].split("|")]
    assert b_cells[3] == "70.0" and b_cells[6] == "500" and b_cells[7] == "-"   # one seed: no sd, no fastest


def _t_pdf(t, df):
    return math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi) * (1 + t * t / df) ** (-(df + 1) / 2)


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, 7.0, -4.0])
def test_t_p_value_closed_forms_and_quadrature(t):
    # df 1 is Cauchy, df 2 has a closed form, a huge df is the normal; any df: 1 - 2 * integral_0^|t| pdf
    assert math.isclose(t_two_sided_p(t, 1.0), 1 - 2 / math.pi * math.atan(abs(t)), abs_tol=1e-12)
    assert math.isclose(t_two_sided_p(t, 2.0), 1 - abs(t) / math.sqrt(2 + t * t), abs_tol=1e-12)
    assert math.isclose(t_two_sided_p(t, 1e7), math.erfc(abs(t) / math.sqrt(2)), abs_tol=1e-6)
    for df in (2.7, 5.0, 31.0):
        n, h = 20000, abs(t) / 20000
        integral = sum(_t_pdf((i + 0.5) * h, df) for i in range(n)) * h
        assert math.isclose(t_two_sided_p(t, df), 1 - 2 * integral, abs_tol=1e-7)
    assert math.isclose(t_two_sided_p(2.776445, 4), 0.05, abs_tol=1e-6)       # t table, 95 %, df 4
    with pytest.raises(ValueError, match="df"):
        t_two_sided_p(1.0, 0)


def test_welch_test_by_hand():
    a, b = [0.80, 0.82, 0.84], [0.70, 0.71, 0.75, 0.72]
    w = welch_test(a, b)
    va, vb = 0.02 ** 2 / 3, statistics.variance(b) / 4
    assert math.isclose(w["diff"], 0.82 - 0.72) and (w["n_a"], w["n_b"]) == (3, 4)
    assert math.isclose(w["t"], 0.10 / math.sqrt(va + vb))
    assert math.isclose(w["df"], (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3))
    assert math.isclose(w["p"], t_two_sided_p(w["t"], w["df"]))
    # equal n and equal variances: Welch's t and df are Student's pooled t with 2(n - 1) df
    e = welch_test([1.0, 2.0, 3.0], [2.0, 3.0, 4.0])
    assert math.isclose(e["t"], -1 / math.sqrt(2 / 3)) and math.isclose(e["df"], 4.0)
    assert welch_test([0.8], [0.7, 0.75])["t"] is None                         # one seed: no variance
    assert welch_test([0.8, 0.8], [0.7, 0.7])["p"] is None and math.isclose(welch_test([0.8, 0.8], [0.7, 0.7])["diff"], 0.1)


def test_study_comparisons_table():
    recs = {"a": [_rec(0, 0.80, 1.0), _rec(1, 0.82, 1.0), _rec(2, 0.84, 1.0)],
            "b": [_rec(0, 0.70, 1.0), _rec(1, 0.71, 1.0), _rec(2, 0.75, 1.0)]}
    rows = study_comparisons(study_summary(recs, {"a": "A*", "b": "B*"}), [("a", "b"), ("a", "missing")])
    assert len(rows) == 1 and rows[0]["label"] == "A* - B*"
    w = welch_test([0.80, 0.82, 0.84], [0.70, 0.71, 0.75])
    assert rows[0]["valid_acc_vote"] == w
    table = comparisons_markdown(rows).splitlines()
    assert len(table) == 3
    assert table[2].startswith(f"| A\\* - B\\* | +{100 * w['diff']:.1f}, t = {w['t']:.2f} ({w['df']:.1f}), p = {w['p']:.3f} |")
