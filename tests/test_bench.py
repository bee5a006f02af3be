"""Bookkeeping of the benchmark scripts (no measuring): how bench/ferplus_cpu.py pools seeds."""
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import ferplus_cpu  # noqa: E402


def _m(acc, t, cpu="X"):
    return {"ferplus_valid_acc": acc, "val_acc": acc, "train_time_s": t, "machine": {"cpu": cpu}}


def test_ferplus_cpu_seeds_pool_on_one_cpu_only():
    assert ferplus_cpu.entry_key("esr4", 0) == "esr4" and ferplus_cpu.entry_key("esr4", 2) == "esr4-s2"
    entries = {"esr4": _m(0.80, 300.0), "esr4-s1": _m(0.82, 320.0), "esr4-s2": _m(0.50, 900.0, cpu="Y"),
               "esr4_div": _m(0.79, 500.0), "esr4_div_r16": _m(0.70, 600.0), "plain_cnn": _m(0.73, 360.0)}
    out = ferplus_cpu.over_seeds(entries)
    assert set(out) == {"esr4"}                   # esr4_div_r16 is its own entry, not a seed of esr4_div
    e = out["esr4"]
    assert e["seeds"] == [0, 1] and e["n"] == 2 and e["cpu"] == "X"     # the other CPU's seed is not pooled
    assert math.isclose(e["ferplus_valid_acc"]["mean"], 0.81) and math.isclose(e["ferplus_valid_acc"]["sd"], 0.02 / math.sqrt(2))
    assert e["train_time_s"]["min"] == 300.0 and e["ferplus_valid_acc_softmax_mean"]["n"] == 0
