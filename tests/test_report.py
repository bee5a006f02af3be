"""fer_lab.report's study table from hand-made records (no training)."""
import math

from fer_lab.report import study_markdown, study_summary


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
