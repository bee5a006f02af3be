"""``python -m fer_lab data check``: validate a dataset on disk before training on it.

:func:`check_dataset` builds every split present (or the ones asked for) with
``on_error="skip"`` and ``verify=True`` (every label row parsed, every image decoded),
without a cache, so it writes nothing. It collects per-split, per-class counts, the
items the label rule leaves out, and every problem: a missing root or split, a CSV
without a needed column, a label out of range (file and line), an unreadable or
truncated image (file). :func:`format_report` renders that as text. This file does
not repair or convert anything.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import build_dataset, dataset_splits
from .errors import DatasetError


@dataclass
class SplitReport:
    """One split's outcome: counts, exclusions, problems (each a sentence naming file/line)."""

    split: str
    size: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)
    excluded: dict[str, int] = field(default_factory=dict)
    dropped_unmapped: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckReport:
    """Outcome of :func:`check_dataset`; ``ok`` when no split has a problem."""

    name: str
    root: str
    splits: list[SplitReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(not s.problems for s in self.splits)

    @property
    def num_problems(self) -> int:
        return len(self.problems) + sum(len(s.problems) for s in self.splits)


def check_dataset(name: str, root, splits: list[str] | None = None, label_space: str | None = None,
                  **options) -> CheckReport:
    """Validate dataset ``name`` under ``root``; never raises for bad data, never writes.

    ``splits``: the splits to check (default: those present under ``root``); ``options``
    go to the loader (e.g. ``label_mode="probability"``, ``layout="source"``); ``cache``,
    ``on_error`` and ``verify`` are fixed to None / ``"skip"`` / True.
    """
    report = CheckReport(name=name, root=str(root))
    options = {k: v for k, v in options.items() if k not in ("cache", "on_error", "verify")}
    if root is not None and not Path(root).exists():
        try:  # let the loader say which layout it expects
            build_dataset(name, root=root, split=dataset_splits(name)[0], label_space=label_space, **options)
        except (DatasetError, ValueError) as err:
            report.problems.append(str(err))
            return report
    try:
        every = dataset_splits(name)
        present = dataset_splits(name, root=root, **options)
    except DatasetError as err:
        report.problems.append(str(err))
        return report
    if splits is None:
        splits = list(present)
        absent = [s for s in every if s not in present]
        if absent:
            report.notes.append(f"splits not present under {root}: {', '.join(absent)} (of {', '.join(every)})")
        if not splits:
            report.problems.append(f"{name}: no split found under {root}")
    for split in splits:
        sr = SplitReport(split=split)
        report.splits.append(sr)
        try:
            ds = build_dataset(name, root=root, split=split, label_space=label_space, cache=None, on_error="skip",
                               verify=True, **options)
        except (DatasetError, ValueError, OSError) as err:
            sr.problems.append(str(err))
            continue
        d = ds.describe()
        sr.size = d["size"]
        sr.class_counts = d["class_counts"]
        sr.excluded = d.get("excluded", {})
        sr.dropped_unmapped = d.get("dropped_unmapped", {})
        sr.problems += [s["reason"] for s in d.get("skipped", [])]
        sr.warnings += d.get("warnings", [])
        sr.info = {k: d[k] for k in ("split_source", "layout", "label_mode", "image_size", "label_space",
                                     "fingerprint") if k in d}
        empty = [c for c, n in sr.class_counts.items() if n == 0]
        if empty:
            sr.warnings.append(f"no items of class(es) {empty}")
    return report


def format_report(report: CheckReport) -> str:
    """Human-readable text of a :class:`CheckReport` (counts table, then every problem)."""
    lines = [f"dataset {report.name} at {report.root}"]
    lines += [f"note: {n}" for n in report.notes]
    lines += [f"PROBLEM: {p}" for p in report.problems]
    for sr in report.splits:
        lines.append("")
        head = f"[{sr.split}] {sr.size} items"
        if sr.info:
            head += " (" + ", ".join(f"{k} {v}" for k, v in sr.info.items() if k != "fingerprint") + ")"
        lines.append(head)
        if sr.class_counts:
            width = max(len(c) for c in sr.class_counts)
            for c, n in sr.class_counts.items():
                share = n / sr.size if sr.size else 0.0
                lines.append(f"  {c:<{width}s} {n:8d}  {share:6.1%}")
        for reason, n in sr.excluded.items():
            lines.append(f"  left out by the label rule: {n} ({reason})")
        for cls, n in sr.dropped_unmapped.items():
            lines.append(f"  dropped, class not in the label space: {n} ({cls})")
        lines += [f"  warning: {w}" for w in sr.warnings]
        lines += [f"  PROBLEM: {p}" for p in sr.problems]
        if "fingerprint" in sr.info:
            lines.append(f"  fingerprint {sr.info['fingerprint']}")
    lines.append("")
    lines.append("no problems found" if report.ok else f"{report.num_problems} problem(s) found")
    return "\n".join(lines)
