"""Summarise the FER+ diversity study (``notebooks/sweeps/study_ferplus_cpu.yaml``).

For every finished run of the batch: FER2013Valid accuracy of the vote and of the softmax
mean, the hold-out accuracy it was selected on, training time, the diversity diagnostics of
its last epoch (median kernel argument, mean off-diagonal of S, share of the loss gradient),
the branches' pairwise prediction disagreement and the overlap of their spatial maps on
FER2013Valid (:func:`fer_lab.analysis.branch_agreement`, cached in the run as
``agreement.json``). Per variant: mean, sd and n over seeds. Writes
``bench/results/ferplus_study.json`` (small, committed), ``docs/study_*.png`` figures (no
face images) and prints the README table.

The study is longer than one working session on 2 cores (15 runs of 10-20 minutes), and run
directories under ``outputs/`` do not outlive the machine, so every run's record (numbers and
per-epoch diagnostics) is kept in the committed JSON: runs recorded there count even when their
directory is gone, as long as they were trained with the current protocol (a fingerprint of
the ``ferplus_cpu`` preset's fields; records of another protocol are dropped and reported).
``--todo`` prints the runs still missing, for the batch's ``--runs``:

    python bench/ferplus_study.py [--batch outputs/batches/study-ferplus-cpu]
    python -m fer_lab batch notebooks/sweeps/study_ferplus_cpu.yaml --set data_root=... \
        --runs $(python bench/ferplus_study.py --todo)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import _common as C
import numpy as np

REPO = Path(__file__).resolve().parents[1]
BATCH = REPO / "outputs" / "batches" / "study-ferplus-cpu"
ORDER = ["esr4", "esr4_att", "esr4_div", "esr4_div_median", "esr4_div_zero"]
LABELS = {"esr4": "ESR-4", "esr4_att": "ESR-4 + CBAM", "esr4_div": "ESR*-4, gamma 10",
          "esr4_div_median": "ESR*-4, gamma median", "esr4_div_zero": "ESR*-4, gamma 10, zero diagonal"}
#: the differences the study asks about (Welch tests over seeds): CBAM's cost, each diversity term
#: against the same model without it, the paper's term against the public code's zero diagonal and
#: against the calibrated bandwidth
PAIRS = [("esr4_att", "esr4"), ("esr4_div", "esr4_att"), ("esr4_div_median", "esr4_att"),
         ("esr4_div_zero", "esr4_att"), ("esr4_div", "esr4_div_zero"), ("esr4_div", "esr4_div_median"),
         ("esr4_div", "esr4")]


SWEEP = REPO / "notebooks" / "sweeps" / "study_ferplus_cpu.yaml"
#: preset fields a study variant may change (the rest is the protocol)
VARIANT_KEYS = {"model"}
VARIANT_OPTIONS = {"gamma", "diagonal", "normalize"}


def protocol_fingerprint(train_cfg: dict) -> str:
    """sha256 (12 hex) of what the protocol fixes: the ``ferplus_cpu`` preset's fields as the run
    had them (``config.json``'s ``train``, flat or tree), without what a variant changes (model,
    gamma, diagonal)."""
    from fer_lab.config import TrainConfig
    from fer_lab.presets import preset_fields

    train_cfg = TrainConfig.from_dict(train_cfg).flat()
    keys = sorted(set(preset_fields("ferplus_cpu")) - VARIANT_KEYS - {"preset"})
    fixed = {k: train_cfg.get(k) for k in keys}
    fixed["model_options"] = {k: v for k, v in sorted((train_cfg.get("model_options") or {}).items())
                              if k not in VARIANT_OPTIONS}
    return hashlib.sha256(json.dumps(fixed, sort_keys=True, default=str).encode()).hexdigest()[:12]


def current_fingerprint() -> str:
    from fer_lab.presets import preset_fields

    return protocol_fingerprint(preset_fields("ferplus_cpu"))


def run_record(run: Path) -> dict:
    """The numbers of one finished run (:func:`fer_lab.report.run_diagnostics`) and its protocol."""
    from fer_lab.report import run_diagnostics
    from fer_lab.runs import read_json

    return {**run_diagnostics(run), "protocol": protocol_fingerprint(read_json(run / "config.json")["train"])}


def collect(batch: Path, previous: dict | None) -> tuple[dict[str, list], int]:
    """``({variant: [record]}, n)``: the batch's finished runs (``n`` of them), plus the runs recorded
    in ``previous`` (the committed JSON) that the batch does not hold, when their protocol is the
    current one."""
    import pandas as pd

    now = current_fingerprint()
    runs: dict[str, dict[str, dict]] = {}
    for v, s in ((previous or {}).get("variants") or {}).items():
        for rec in s.get("runs", []):
            if rec.get("protocol") != now:
                print(f"dropped {rec.get('run', v)}: trained with protocol {rec.get('protocol')}, "
                      f"the preset is now {now}", file=sys.stderr)
                continue
            runs.setdefault(v, {})[rec["run"]] = rec
    n = 0
    if (batch / "summary.csv").is_file():
        for row in pd.read_csv(batch / "summary.csv").itertuples():
            if row.status == "done" and (batch / row.run / "metrics.json").is_file():
                rec = run_record(batch / row.run)
                if rec["protocol"] == now:
                    runs.setdefault(row.variant, {})[row.run] = rec
                    n += 1
    return {v: sorted(r.values(), key=lambda x: x["seed"]) for v, r in runs.items()}, n


def todo(recorded: dict[str, list]) -> list[str]:
    """Runs of the study sweep with no record under the current protocol."""
    from fer_lab.batch import load_sweep

    have = {rec["run"] for recs in recorded.values() for rec in recs}
    return [name for name, _ in load_sweep(SWEEP).points() if name not in have]


def summarise(runs: dict[str, list], batch: Path) -> dict:
    from fer_lab.report import study_comparisons, study_summary

    ordered = {v: runs[v] for v in [v for v in ORDER if v in runs] + sorted(set(runs) - set(ORDER))}
    variants = study_summary(ordered, LABELS)
    return {"what": "FER+ (majority labels), ferplus_cpu protocol, selected on a 10 % hold-out of FER2013Train, "
                    "FER2013Valid reported; mean, sd (ddof 1) and n over seeds; comparisons: Welch t-tests over "
                    "seeds, two-sided p, uncorrected (Bonferroni threshold 0.05 / number of pairs)",
            "batch": str(batch), "protocol": current_fingerprint(), "variants": variants,
            "comparisons": study_comparisons(variants, PAIRS), "todo": todo(runs)}


def markdown(result: dict) -> str:
    from fer_lab.report import comparisons_markdown, study_markdown

    n = len(result.get("comparisons", []))
    return "\n".join([study_markdown(result["variants"]), "",
                      "Kernel arguments and S: last epoch, training split; gradient share: first batch of the last epoch; ESR-4 (no CBAM) monitors "
                      "its pooled feature maps, the others the last CBAM's maps; a term not in the loss has no "
                      "gradient share. Disagreement and overlap: FER2013Valid, pairs of branches.", "",
                      comparisons_markdown(result.get("comparisons", [])), "",
                      f"Welch t-tests over seeds (df by Welch-Satterthwaite), two-sided p, uncorrected; with {n} "
                      f"comparisons the Bonferroni threshold for 5 % is p < {0.05 / max(n, 1):.3f}."])


def figures(result: dict, docs: Path) -> list[Path]:
    """Accuracy per variant (each seed a point) and the diagnostics over epochs, one colour per variant."""
    import matplotlib.pyplot as plt

    from fer_lab import viz

    viz.set_style()
    written = []
    names = list(result["variants"])
    fig, ax = plt.subplots(figsize=(6.2, 3.0))
    for i, v in enumerate(names):
        recs = result["variants"][v]["runs"]
        for j, key in enumerate(("valid_acc_vote", "valid_acc_softmax_mean")):
            ys = [100 * r[key] for r in recs]
            ax.scatter([i + (j - 0.5) * 0.25] * len(ys), ys, s=14, color=viz.PALETTE[j],
                       label=("vote", "softmax mean")[j] if i == 0 else None)
            ax.hlines(np.mean(ys), i + (j - 0.5) * 0.25 - 0.1, i + (j - 0.5) * 0.25 + 0.1, color=viz.PALETTE[j])
    ax.set_xticks(range(len(names)), [result["variants"][v]["label"].replace(", ", "\n") for v in names], fontsize=7)
    ax.set_ylabel("FER2013Valid accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written += viz.save_figure(fig, docs, "study_accuracy", formats=("png",))
    axes = viz.plot_study_series(result["variants"], {
        "train_karg_sp_q50": "median kernel argument, spatial term\n(grey: 0.1-10, where exp(-x) is neither ~1 nor ~0)",
        "train_S_offdiag_sp": "mean off-diagonal of S, spatial",
        "train_gradshare_D_sp": "share of the loss gradient, spatial term\n(first batch of each epoch)"})
    fig = axes[0].figure
    axes[0].axhspan(0.1, 10, color="#EEEEEE", zorder=0)
    axes[1].set_ylim(viz.LOG_FLOOR / 2, 1.5)
    fig.tight_layout()
    written += viz.save_figure(fig, docs, "study_diagnostics", formats=("png",))
    plt.close("all")
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=Path, default=BATCH)
    ap.add_argument("--todo", action="store_true", help="print the runs not recorded yet (for batch --runs) and exit")
    args = ap.parse_args(argv)
    saved = C.RESULTS / "ferplus_study.json"
    previous = json.loads(saved.read_text()) if saved.is_file() else None
    runs, from_batch = collect(args.batch, previous)
    if args.todo:
        print(" ".join(todo(runs)))
        return 0
    if not runs:
        print(f"no finished run in {args.batch} nor in {saved}: run the study sweep first", file=sys.stderr)
        return 1
    result = summarise(runs, args.batch)
    if previous and not from_batch:
        # every record is the saved one: keep where and from which batch it was trained
        result.update({k: previous[k] for k in ("machine", "batch") if k in previous})
    C.save("ferplus_study", result)
    figures(result, REPO / "docs")
    print(markdown(result))
    print(json.dumps({v: s["valid_acc_vote"] for v, s in result["variants"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
