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


SWEEP = REPO / "notebooks" / "sweeps" / "study_ferplus_cpu.yaml"
#: per-epoch columns kept in each run's record (the diagnostics figure)
SERIES = ("train_karg_sp_q50", "train_S_offdiag_sp", "train_gradshare_D_sp", "val_acc_vote")
#: preset fields a study variant may change (the rest is the protocol)
VARIANT_KEYS = {"model"}
VARIANT_OPTIONS = {"gamma", "diagonal", "normalize"}


def protocol_fingerprint(train_cfg: dict) -> str:
    """sha256 (12 hex) of what the protocol fixes: the ``ferplus_cpu`` preset's fields as the run
    had them, without what a variant changes (model, gamma, diagonal)."""
    from fer_lab.presets import preset_fields

    keys = sorted(set(preset_fields("ferplus_cpu")) - VARIANT_KEYS - {"preset"})
    fixed = {k: train_cfg.get(k) for k in keys}
    fixed["model_options"] = {k: v for k, v in sorted((train_cfg.get("model_options") or {}).items())
                              if k not in VARIANT_OPTIONS}
    return hashlib.sha256(json.dumps(fixed, sort_keys=True, default=str).encode()).hexdigest()[:12]


def current_fingerprint() -> str:
    from fer_lab.presets import preset_fields

    return protocol_fingerprint(preset_fields("ferplus_cpu"))


def run_record(run: Path) -> dict:
    """The numbers of one finished run."""
    import pandas as pd
    import torch

    from fer_lab.analysis import branch_agreement
    from fer_lab.runs import load_run, read_json, write_json

    m = read_json(run / "metrics.json")
    h = pd.read_csv(run / "history.csv")
    last = h.iloc[-1]
    cfg = read_json(run / "config.json")["train"]
    rec = {"run": run.name, "protocol": protocol_fingerprint(cfg), "seed": cfg["seed"],
           "train_time_s": m["train_time_s"],
           "epochs": len(h), "holdout_acc": m["selected"]["val_score"],
           "valid_acc_vote": m["test"]["acc_vote"], "valid_acc_softmax_mean": m["test"]["acc_ensemble"],
           "valid_acc_branches": [m["test"][k] for k in sorted(m["test"]) if k.startswith("acc_branch_")],
           "saturation_warnings": len(m.get("saturation_warnings", []))}
    for t in ("sp", "ch"):
        for col, key in ((f"train_karg_{t}_q50", f"karg_median_{t}"), (f"train_S_offdiag_{t}", f"S_offdiag_{t}"),
                         (f"train_gradshare_D_{t}", f"gradshare_{t}"), (f"val_D_{t}", f"D_{t}"),
                         (f"train_gamma_{t}", f"gamma_{t}")):
            if col in h:
                rec[key] = float(last[col])
    cache = run / "agreement.json"
    if cache.is_file():
        agree = read_json(cache)
    else:
        r = load_run(run)
        torch.set_num_threads(2)
        agree = branch_agreement(r.load_model(), r.eval_dataset("test"))
        write_json(cache, agree)
    rec.update({k: v for k, v in agree.items() if k.endswith("_mean") or k == "n"})
    rec["series"] = {c: [float(x) for x in h[c]] for c in SERIES if c in h}
    return rec


def collect(batch: Path, previous: dict | None) -> dict[str, list]:
    """``{variant: [record]}``: the batch's finished runs, plus the runs recorded in ``previous``
    (the committed JSON) that the batch does not hold, when their protocol is the current one."""
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
    if (batch / "summary.csv").is_file():
        for row in pd.read_csv(batch / "summary.csv").itertuples():
            if row.status == "done" and (batch / row.run / "metrics.json").is_file():
                rec = run_record(batch / row.run)
                if rec["protocol"] == now:
                    runs.setdefault(row.variant, {})[row.run] = rec
    return {v: sorted(r.values(), key=lambda x: x["seed"]) for v, r in runs.items()}


def todo(recorded: dict[str, list]) -> list[str]:
    """Runs of the study sweep with no record under the current protocol."""
    from fer_lab.batch import load_sweep

    have = {rec["run"] for recs in recorded.values() for rec in recs}
    return [name for name, _ in load_sweep(SWEEP).points() if name not in have]


def _stats(values) -> dict:
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if not v.size:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else None, "n": int(v.size)}


def summarise(runs: dict[str, list], batch: Path) -> dict:
    variants = {}
    for v in [v for v in ORDER if v in runs] + sorted(set(runs) - set(ORDER)):
        recs = runs[v]
        keys = sorted({k for r in recs for k, x in r.items()
                       if isinstance(x, (int, float)) and not isinstance(x, bool) and k != "seed"})
        variants[v] = {"label": LABELS.get(v, v), "runs": recs, **{k: _stats([r.get(k) for r in recs]) for k in keys}}
    return {"what": "FER+ (majority labels), ferplus_cpu protocol, selected on a 10 % hold-out of FER2013Train, "
                    "FER2013Valid reported; mean, sd (ddof 1) and n over seeds", "batch": str(batch),
            "protocol": current_fingerprint(), "variants": variants, "todo": todo(runs)}


def _fmt(s: dict, scale: float = 100.0, digits: int = 1) -> str:
    if not s or s["mean"] is None:
        return "-"
    sd = f" ± {s['sd'] * scale:.{digits}f}" if s["sd"] is not None else ""
    return f"{s['mean'] * scale:.{digits}f}{sd}"


def _sci(s: dict) -> str:
    if not s or s["mean"] is None:
        return "-"
    sd = f" ± {s['sd']:.1e}" if s["sd"] is not None else ""
    return f"{s['mean']:.2g}{sd}"


def markdown(result: dict) -> str:
    head = ("| variant | n | FER2013Valid vote % | softmax mean % | hold-out % | train s | median kernel arg "
            "(sp / ch) | mean S off-diag (sp) | gradient share (sp) | disagreement % | attention overlap | "
            "feature-map overlap |")
    lines = [head, "|" + "---|" * 12]
    for v, s in result["variants"].items():
        karg = f"{_sci(s.get('karg_median_sp'))} / {_sci(s.get('karg_median_ch'))}" if "karg_median_sp" in s else "-"
        lines.append(f"| {s['label']} | {s['valid_acc_vote']['n']} | {_fmt(s['valid_acc_vote'])} | "
                     f"{_fmt(s['valid_acc_softmax_mean'])} | {_fmt(s['holdout_acc'])} | "
                     f"{_fmt(s['train_time_s'], 1, 0)} | {karg} | {_sci(s.get('S_offdiag_sp'))} | "
                     f"{_sci(s.get('gradshare_sp'))} | {_fmt(s.get('disagreement_mean'))} | "
                     f"{_fmt(s.get('overlap_attention_mean'), 1, 3)} | {_fmt(s.get('overlap_features_mean'), 1, 3)} |")
    lines.append("")
    lines.append("Kernel arguments, S and gradient share: last epoch, training split; ESR-4 (no CBAM) monitors "
                 "its pooled feature maps, the others the last CBAM's maps; a term not in the loss has no "
                 "gradient share. Disagreement and overlap: FER2013Valid, pairs of branches.")
    return "\n".join(lines)


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
    fig, axes = plt.subplots(1, 3, figsize=(11.0, 3.0))
    for i, v in enumerate(names):
        for j, rec in enumerate(result["variants"][v]["runs"]):
            h = rec.get("series", {})
            kw = dict(color=viz.PALETTE[i % len(viz.PALETTE)], lw=1, alpha=0.85,
                      label=result["variants"][v]["label"] if j == 0 else None)
            for ax, col in zip(axes, ("train_karg_sp_q50", "train_S_offdiag_sp", "train_gradshare_D_sp")):
                if col in h:
                    ax.plot(np.arange(1, len(h[col]) + 1), np.clip(h[col], viz.LOG_FLOOR, None), **kw)
    axes[0].axhspan(0.1, 10, color="#EEEEEE", zorder=0)
    axes[1].set_ylim(viz.LOG_FLOOR / 2, 1.5)
    for ax, title in zip(axes, ("median kernel argument, spatial term", "mean off-diagonal of S, spatial",
                                "share of the loss gradient, spatial term")):
        ax.set_yscale("log")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize=6)
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
    runs = collect(args.batch, previous)
    if args.todo:
        print(" ".join(todo(runs)))
        return 0
    if not runs:
        print(f"no finished run in {args.batch} nor in {saved}: run the study sweep first", file=sys.stderr)
        return 1
    result = summarise(runs, args.batch)
    C.save("ferplus_study", result)
    figures(result, REPO / "docs")
    print(markdown(result))
    print(json.dumps({v: s["valid_acc_vote"] for v, s in result["variants"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
