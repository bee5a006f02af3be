"""The house style of fer_lab's figures: palettes, fonts, how figures are saved, how learners are named."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt

from .runs import atomic_write_bytes

FORMATS = ("pdf", "svg", "png")
#: colour-blind-safe qualitative palette (seaborn "colorblind", Okabe-Ito-like)
PALETTE = ["#0173B2", "#DE8F05", "#029E73", "#D55E00", "#CC78BC", "#CA9161", "#FBAFE4", "#949494",
           "#ECE133", "#56B4E9"]
SEQUENTIAL = "viridis"     # similarity matrices, confusion matrices (perceptually uniform, CVD-safe)
ATTENTION = "inferno"      # attention overlays
ENSEMBLE_COLOR = "#000000"
TERM_LABELS = {"sp": "spatial", "ch": "channel", "b": "branch"}
#: Floor of the log scales (similarity, 1 - det): values below it, exact zeros included, are drawn at it.
LOG_FLOOR = 1e-12


def set_style() -> None:
    """The house style: small paper fonts, TrueType fonts in PDF (fonttype 42), text kept in SVG."""
    import seaborn as sns

    sns.set_theme(context="paper", style="ticks", palette=PALETTE, font_scale=1.0)
    plt.rcParams.update({
        "pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "none",
        "figure.dpi": 100, "savefig.dpi": 200, "savefig.bbox": "tight",
        "axes.spines.top": False, "axes.spines.right": False, "axes.grid": False,
        "legend.frameon": False, "image.cmap": SEQUENTIAL,
    })


def save_figure(fig, directory, name: str, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write ``fig`` as ``<directory>/<name>.<fmt>`` for each format (atomically); returns the paths."""
    directory = Path(directory)
    paths = []
    for fmt in formats:
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt)
        paths.append(atomic_write_bytes(directory / f"{name}.{fmt}", buf.getvalue()))
    return paths


def _labels(L: int, prefix: str = "B") -> list[str]:
    return [f"{prefix}{i + 1}" for i in range(L)]


def display_name(key: str) -> str:
    """How a head or learner key reads in a figure or a printed table: ``branch_1`` -> ``branch 1``
    (one spelling everywhere; the keys themselves stay as the run's files have them)."""
    return str(key).replace("_", " ")
