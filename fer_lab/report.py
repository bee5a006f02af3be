"""Gather finished runs into the paper's Table 1 layout, next to the published numbers.

``collect_runs`` reads run directories (or whole batch directories) into one row per
run; ``table1`` aggregates them over seeds (mean, standard deviation, count) with rows =
model variant and columns = dataset, and places the published single-run accuracies of
SPEC section 6 beside them. ``run_diagnostics``, ``study_summary`` and ``study_markdown``
report what the learners did in a diversity study (the diagnostics of the last epoch, the
branches' disagreement and overlap), over seeds; ``welch_test`` and ``study_comparisons`` say
whether two variants' means differ by more than seed noise. No training or plotting here.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import numpy as np

from . import schema
from .config import TrainConfig
from .runs import read_json

#: Table 1 row of each registered variant (the paper's wording).
VARIANT_ROWS = {
    "esr9": "ESR-9", "esr9_att": "ESR-9 + CBAM", "esr9_att_sp": "ESR-9 + CBAM + spatial div",
    "esr9_div": "ESR*-9 (+ spatial + channel div)",
    "esr15": "ESR-15", "esr15_att": "ESR-15 + CBAM", "esr15_att_sp": "ESR-15 + CBAM + spatial div",
    "esr15_div": "ESR*-15",
    "manet": "MA-Net", "manet_div": "MA-Net* (patch + branch div)",
}
#: Table 1 column of each dataset.
DATASET_COLUMNS = {"affectnet": "AffectNet-8", "ferplus": "FER+", "rafdb": "RAF-DB", "fer2013": "FER2013",
                   "synthetic": "synthetic", "folder": "image folder"}

#: Published accuracies (%, single runs selected on the evaluation split), SPEC section 6;
#: ESR rows are the diversity paper's reproductions.
PUBLISHED = {
    "esr9": {"AffectNet-8": 58.8, "FER+": 88.40, "RAF-DB": 77.96},
    "esr9_att": {"AffectNet-8": 58.95, "FER+": 88.56, "RAF-DB": 82.39},
    "esr9_att_sp": {"AffectNet-8": 59.25, "FER+": 88.59, "RAF-DB": 82.92},
    "esr9_div": {"AffectNet-8": 59.3, "FER+": 89.15, "RAF-DB": 82.95},
    "esr15": {"AffectNet-8": 58.7, "FER+": 88.59, "RAF-DB": 77.5},
    "esr15_att": {"AffectNet-8": 59.25, "FER+": 88.78, "RAF-DB": 82.82},
    "esr15_att_sp": {"AffectNet-8": 59.47, "FER+": 89.21, "RAF-DB": 82.92},
    "esr15_div": {"AffectNet-8": 60.00, "FER+": 89.34, "RAF-DB": 83.00},
    "manet": {"AffectNet-8": 59.85, "FER+": 87.49, "RAF-DB": 88.68},
    "manet_div": {"AffectNet-8": 60.02, "FER+": 88.34, "RAF-DB": 89.99},
}
#: The original papers' own numbers (ESR: Siqueira et al.; MA-Net: Zhao et al.).
PUBLISHED_ORIGINAL = {"esr9": {"AffectNet-8": 59.3, "FER+": 87.17},
                      "manet": {"AffectNet-8": 60.29, "RAF-DB": 88.40}}


def _run_dirs(paths: Iterable) -> list[Path]:
    """Run directories under ``paths`` (each a run directory or a folder holding runs)."""
    found = []
    for p in paths:
        p = Path(p)
        if (p / "config.json").is_file():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(c.parent for c in p.rglob("config.json") if (c.parent / "history.csv").exists()))
    return found


def collect_runs(paths: Iterable) -> "pd.DataFrame":  # noqa: F821
    """One row per finished run found under ``paths``.

    Columns: ``run`` (path), ``model``, ``variant`` (the model plus what the run changed in the
    diversity term, e.g. ``esr9_div, gamma median``), ``dataset``, ``seed``, ``gamma``, ``diagonal``,
    ``terms``, ``head`` (the selected head), ``test_acc`` / ``val_acc`` (that head, in %),
    ``test_acc_<head>`` for every head, ``test_D_<term>``, ``epochs``, ``train_time_s``.
    Unfinished runs (no ``metrics.json``) are left out.
    """
    import pandas as pd

    rows = []
    for d in _run_dirs(paths):
        if not (d / "metrics.json").is_file():
            continue
        cfg, m = read_json(d / "config.json"), read_json(d / "metrics.json")
        train, model = TrainConfig.from_dict(cfg["train"]), cfg["model"]
        head = m["selected"]["head"]
        test = m.get("test", {})
        row = {"run": str(d), "model": train.model, "variant": _variant(train.model, model),
               "dataset": train.data.dataset, "seed": train.runtime.seed,
               "gamma": model["diversity"]["gamma"], "diagonal": model["diversity"]["diagonal"],
               "terms": "+".join(model["diversity"]["terms"]) or "none", "head": head,
               "test_acc": 100 * test[schema.acc(head)] if schema.acc(head) in test else np.nan,
               "val_acc": 100 * m["selected"]["val_score"], "epochs": len(pd.read_csv(d / "history.csv")),
               "train_time_s": m.get("train_time_s")}
        accs = {schema.acc(h) for h in schema.heads(test, None)}
        row.update({schema.col("test", k): (100 * v if k in accs else v) for k, v in test.items()
                    if isinstance(v, (int, float))})
        rows.append(row)
    return pd.DataFrame(rows)


def _variant(name: str, model_config: dict) -> str:
    """The registry name, plus what the run changed in the diversity term (``esr9_div, gamma
    median, zero diagonal``), so runs of one model with other terms form their own rows."""
    div = model_config.get("diversity") or {}
    extra = []
    if div.get("terms"):
        if div.get("gamma", 10.0) != 10.0:
            extra.append(f"gamma {div['gamma']}")
        if div.get("diagonal") == "reference":
            extra.append("zero diagonal")
        if div.get("normalize", "none") != "none":
            extra.append(f"{div['normalize']}-normalised")
    return ", ".join([name, *extra])


def table1(runs: "pd.DataFrame", metric: str = "test_acc", published: bool = True) -> "pd.DataFrame":  # noqa: F821
    """Table 1 layout: rows = variant (``runs["variant"]``, else the model), columns = dataset;
    cells ``mean ± std (n)`` over seeds.

    With ``published``, a ``<dataset> (published)`` column follows each dataset that has a
    published number. Rows follow the paper's order; variants without a row name keep
    their registry name.
    """
    import pandas as pd

    if runs.empty:
        return pd.DataFrame()
    if "variant" not in runs:
        runs = runs.assign(variant=runs["model"])
    stats = runs.groupby(["variant", "dataset"])[metric].agg(["mean", "std", "count"]).reset_index()
    model_of = dict(zip(runs["variant"], runs["model"]))
    rank = {m: i for i, m in enumerate(VARIANT_ROWS)}
    order = sorted(set(stats["variant"]), key=lambda v: (rank.get(model_of[v], len(rank)), model_of[v], v))

    def label(v):
        base = VARIANT_ROWS.get(model_of[v], model_of[v])
        return base + v[len(model_of[v]):]

    table = pd.DataFrame(index=[label(v) for v in order])
    for ds in sorted(set(stats["dataset"]), key=lambda d: list(DATASET_COLUMNS).index(d) if d in DATASET_COLUMNS
                     else 99):
        col = DATASET_COLUMNS.get(ds, ds)
        cells = []
        for m in order:
            r = stats[(stats["variant"] == m) & (stats["dataset"] == ds)]
            if r.empty:
                cells.append("")
                continue
            mean, std, n = r.iloc[0]["mean"], r.iloc[0]["std"], int(r.iloc[0]["count"])
            cells.append(f"{mean:.2f} ± {std:.2f} (n={n})" if n > 1 else f"{mean:.2f} (n=1)")
        table[col] = cells
        if published and any(col in PUBLISHED.get(m, {}) for m in order):   # a published row: the model as such
            table[f"{col} (published)"] = [PUBLISHED.get(m, {}).get(col, np.nan) for m in order]
    table.index.name = "variant"
    return table


def _md(text: str) -> str:
    """A label as Markdown text: ``*`` (ESR*-4) escaped so two labels do not italicise what lies between."""
    return text.replace("*", "\\*")


def markdown_table(table: "pd.DataFrame") -> str:  # noqa: F821
    """A pipe table of ``table`` (index as the first column), without optional dependencies; ``*``
    is escaped (ESR*-9 would italicise the cells up to the next one)."""
    cols = [_md(table.index.name or "")] + [_md(str(c)) for c in table.columns]
    fmt = lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v)) else _md(str(v))  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join([fmt(i)] + [fmt(v) for v in row]) + " |" for i, row in zip(table.index, table.values)]
    return "\n".join(lines) + "\n"


# ---- what the learners did: diagnostics, disagreement and overlap per run, over seeds ----------
#: per-epoch columns kept in a run's study record (the diagnostics figure)
STUDY_SERIES = (schema.col("train", schema.karg("sp", 0.5)), schema.col("train", schema.S_offdiag("sp")),
                schema.col("train", schema.gradshare("sp")), schema.col("val", schema.acc("vote")))
#: (history column, record key) of the last epoch's diagnostics, per term
_LAST_EPOCH = [(column, f"{key}_{t}") for t in ("sp", "ch") for column, key in
               ((schema.col("train", schema.karg(t, 0.5)), "karg_median"),
                (schema.col("train", schema.S_offdiag(t)), "S_offdiag"),
                (schema.col("train", schema.gradshare(t)), "gradshare"), (schema.col("val", schema.D(t)), "D"),
                (schema.col("train", schema.gamma(t)), "gamma"))]


def run_diagnostics(run_dir, agreement: bool = True) -> dict:
    """One finished run's numbers for a diversity study: accuracies of the reported split (vote,
    softmax mean, each branch), the hold-out score it was selected on, training time, the
    diversity diagnostics of its last epoch (median kernel argument, mean off-diagonal of S,
    share of the loss gradient, D, gamma; per term), and with ``agreement`` the branches'
    pairwise prediction disagreement and map overlap on the reported split
    (:func:`fer_lab.analysis.branch_agreement`, computed once and cached in the run as
    ``agreement.json``); ``series``: the per-epoch columns of :data:`STUDY_SERIES`."""
    import pandas as pd

    from .runs import write_json

    run_dir = Path(run_dir)
    m = read_json(run_dir / "metrics.json")
    h = pd.read_csv(run_dir / "history.csv")
    last = h.iloc[-1]
    test = m.get("test", {})
    rec = {"run": run_dir.name, "seed": TrainConfig.from_dict(read_json(run_dir / "config.json")["train"]).runtime.seed,
           "train_time_s": m.get("train_time_s"), "epochs": len(h), "holdout_acc": m["selected"]["val_score"],
           "valid_acc_vote": test.get(schema.acc("vote")), "valid_acc_softmax_mean": test.get(schema.acc("ensemble")),
           "valid_acc_branches": [test[schema.acc(h)] for h in schema.learner_heads(test, None)],
           "saturation_warnings": len(m.get("saturation_warnings", []))}
    for col, key in _LAST_EPOCH:
        if col in h:
            rec[key] = float(last[col])
    if agreement:
        cache = run_dir / "agreement.json"
        if cache.is_file():
            agree = read_json(cache)
        else:
            from .analysis import branch_agreement
            from .runs import load_run

            r = load_run(run_dir)
            agree = branch_agreement(r.load_model(), r.eval_dataset("test"))
            write_json(cache, agree)
        rec.update({k: v for k, v in agree.items() if k.endswith("_mean") or k == "n"})
    rec["series"] = {c: [float(x) for x in h[c]] for c in STUDY_SERIES if c in h}
    return rec


def seed_stats(values) -> dict:
    """``{"mean", "sd" (ddof 1; None for one value), "n", "min"}`` of the finite values (None ones skipped)."""
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if not v.size:
        return {"mean": None, "sd": None, "n": 0, "min": None}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else None, "n": int(v.size),
            "min": float(v.min())}


def study_summary(records: dict[str, list[dict]], labels: dict[str, str] | None = None) -> dict:
    """``{variant: {"label", "runs": records, <number>: {"mean", "sd" (ddof 1), "n", "min"}}}`` over the
    seeds of each variant, for every numeric field of :func:`run_diagnostics`' records."""
    out = {}
    for v, recs in records.items():
        keys = sorted({k for r in recs for k, x in r.items()
                       if isinstance(x, (int, float)) and not isinstance(x, bool) and k != "seed"})
        out[v] = {"label": (labels or {}).get(v, v), "runs": recs, **{k: seed_stats([r.get(k) for r in recs]) for k in keys}}
    return out


def _pm(s: dict, scale: float = 100.0, digits: int = 1) -> str:
    if not s or s["mean"] is None:
        return "-"
    sd = f" ± {s['sd'] * scale:.{digits}f}" if s["sd"] is not None else ""
    return f"{s['mean'] * scale:.{digits}f}{sd}"


def _sci(s: dict) -> str:
    if not s or s["mean"] is None:
        return "-"
    sd = f" ± {s['sd']:.1e}" if s["sd"] is not None else ""
    return f"{s['mean']:.2g}{sd}"


def _fastest(s: dict) -> str:
    return f" ({s['min']:.0f})" if s and s.get("n", 0) > 1 and s.get("min") is not None else ""


def study_markdown(summary: dict) -> str:
    """The study's table: per variant mean ± sd over seeds of valid accuracy (vote, softmax
    mean), hold-out accuracy, training time (mean ± sd, and the fastest seed's: wall-clock time
    varies with what else the machine runs), the last epoch's diagnostics, disagreement and
    overlap."""
    lines = ["| variant | n | valid vote % | valid softmax mean % | hold-out % | train s (fastest) | median kernel arg "
             "(sp / ch) | mean S off-diag (sp) | gradient share (sp) | disagreement % | attention overlap | "
             "feature-map overlap |", "|" + "---|" * 12]
    for s in summary.values():
        karg = f"{_sci(s.get('karg_median_sp'))} / {_sci(s.get('karg_median_ch'))}" if "karg_median_sp" in s else "-"
        lines.append(f"| {_md(s['label'])} | {len(s['runs'])} | {_pm(s.get('valid_acc_vote'))} | "
                     f"{_pm(s.get('valid_acc_softmax_mean'))} | {_pm(s.get('holdout_acc'))} | "
                     f"{_pm(s.get('train_time_s'), 1, 0)}{_fastest(s.get('train_time_s'))} | {karg} | {_sci(s.get('S_offdiag_sp'))} | "
                     f"{_sci(s.get('gradshare_sp'))} | {_pm(s.get('disagreement_mean'))} | "
                     f"{_pm(s.get('overlap_attention_mean'), 1, 3)} | {_pm(s.get('overlap_features_mean'), 1, 3)} |")
    return "\n".join(lines)


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) by its continued fraction (modified Lentz)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1.0) / (a + b + 2.0):               # the fraction converges fast below this point
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny, f, c, d = 1e-300, 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2:
            num = -((a + m) * (a + b + m) * x) / ((a + 2 * m) * (a + 2 * m + 1))
        else:
            num = (m * (b - m) * x) / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-14:
            break
    return front * (f - 1.0)


def t_two_sided_p(t: float, df: float) -> float:
    """Two-sided p-value of Student's t with ``df`` (real, > 0) degrees of freedom."""
    if not df > 0:
        raise ValueError(f"t_two_sided_p: df must be > 0, got {df}")
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def welch_test(a, b) -> dict:
    """Welch's unequal-variance t-test of mean(a) - mean(b): ``{"diff", "t", "df", "p", "n_a", "n_b"}``
    (two-sided p; df by Welch-Satterthwaite). ``t``, ``df`` and ``p`` are None with fewer than two
    values on a side (no variance), or when both sides have zero variance."""
    a, b = (np.array([x for x in v if x is not None and np.isfinite(x)], dtype=float) for v in (a, b))
    out = {"diff": float(a.mean() - b.mean()) if a.size and b.size else None, "t": None, "df": None, "p": None,
           "n_a": int(a.size), "n_b": int(b.size)}
    if a.size < 2 or b.size < 2:
        return out
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    if va + vb == 0:
        return out
    out["t"] = float(out["diff"] / math.sqrt(va + vb))
    out["df"] = float((va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1)))
    out["p"] = t_two_sided_p(out["t"], out["df"])
    return out


def study_comparisons(summary: dict, pairs, metrics=("valid_acc_vote", "valid_acc_softmax_mean")) -> list[dict]:
    """Welch tests between variants of :func:`study_summary`: one row per ``(a, b)`` pair present in
    ``summary``, ``{"a", "b", "label", <metric>: welch_test}`` over the seeds' values. With several
    pairs, read the p-values against a corrected threshold (Bonferroni: 0.05 / number of pairs)."""
    rows = []
    for a, b in pairs:
        if a in summary and b in summary:
            vals = lambda v, m: [r.get(m) for r in summary[v]["runs"]]
            rows.append({"a": a, "b": b, "label": f"{summary[a]['label']} - {summary[b]['label']}",
                         **{m: welch_test(vals(a, m), vals(b, m)) for m in metrics}})
    return rows


def comparisons_markdown(rows: list[dict], metrics=("valid_acc_vote", "valid_acc_softmax_mean")) -> str:
    """The comparisons as a table: difference in points, Welch t, df and two-sided p per metric."""
    names = {"valid_acc_vote": "vote", "valid_acc_softmax_mean": "softmax mean"}
    head = "| difference | " + " | ".join(f"{names.get(m, m)}: points, t (df), p" for m in metrics) + " |"
    lines = [head, "|" + "---|" * (1 + len(metrics))]
    for r in rows:
        cells = []
        for m in metrics:
            w = r[m]
            diff = "-" if w["diff"] is None else f"{100 * w['diff']:+.1f}"
            cells.append(diff if w["t"] is None else f"{diff}, t = {w['t']:.2f} ({w['df']:.1f}), p = {w['p']:.3f}")
        lines.append(f"| {_md(r['label'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
