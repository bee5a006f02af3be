"""Gather finished runs into the paper's Table 1 layout, next to the published numbers.

``collect_runs`` reads run directories (or whole batch directories) into one row per
run; ``table1`` aggregates them over seeds (mean, standard deviation, count) with rows =
model variant and columns = dataset, and places the published single-run accuracies of
SPEC section 6 beside them. No training or plotting here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

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
        train, model = cfg["train"], cfg["model"]
        head = m["selected"]["head"]
        test = m.get("test", {})
        row = {"run": str(d), "model": train["model"], "variant": _variant(train["model"], model),
               "dataset": train["dataset"], "seed": train["seed"],
               "gamma": model["diversity"]["gamma"], "diagonal": model["diversity"]["diagonal"],
               "terms": "+".join(model["diversity"]["terms"]) or "none", "head": head,
               "test_acc": 100 * test[f"acc_{head}"] if f"acc_{head}" in test else np.nan,
               "val_acc": 100 * m["selected"]["val_score"], "epochs": len(pd.read_csv(d / "history.csv")),
               "train_time_s": m.get("train_time_s")}
        row.update({f"test_{k}": (100 * v if k.startswith("acc_") else v) for k, v in test.items()
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


def markdown_table(table: "pd.DataFrame") -> str:  # noqa: F821
    """A pipe table of ``table`` (index as the first column), without optional dependencies."""
    cols = [table.index.name or ""] + [str(c) for c in table.columns]
    fmt = lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join([fmt(i)] + [fmt(v) for v in row]) + " |" for i, row in zip(table.index, table.values)]
    return "\n".join(lines) + "\n"
