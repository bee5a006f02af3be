"""Publication figures: one style, colour-blind-safe palettes, every figure as PDF, SVG and PNG.

Functions take arrays (or a run directory) and return a matplotlib ``Figure``; the house style
lives in :mod:`fer_lab.style` and figures of faces in :mod:`fer_lab.viz_maps` (both re-exported
here);
:func:`save_figure` writes it atomically into a run's ``figures/``. Similarity
heatmaps always use the fixed colour range ``[0, 1]`` so figures are comparable
across runs; small matrices are annotated with their values. Nothing here trains or
loads data beyond what a figure needs.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np

from . import schema
from .runs import load_run
from .style import (ATTENTION, ENSEMBLE_COLOR, FORMATS, LOG_FLOOR, PALETTE, SEQUENTIAL, TERM_LABELS,  # noqa: F401
                    _labels, display_name, save_figure, set_style)
from .viz_maps import (collect_attention, pick_examples, plot_channel_attention, plot_face_prediction,  # noqa: F401
                       plot_map_grid, upsample)

log = logging.getLogger(__name__)


# ---- similarity and determinants ---------------------------------------------------------
def plot_similarity(S: np.ndarray, ax=None, title: str | None = None, labels: Sequence[str] | None = None,
                    annotate: bool | None = None, vmin: float = 0.0, vmax: float = 1.0, colorbar: bool = True,
                    scale: str = "linear"):
    """Heatmap of a similarity matrix ``S`` ``(L, L)`` with fixed limits ``[vmin, vmax]``.

    ``scale="log"`` shows ``S`` on a log colour scale from :data:`LOG_FLOOR` to 1 (values below
    the floor drawn at it), so a saturated term's off-diagonals (``1e-30`` or exactly 0, which a
    linear scale shows as a plain identity matrix) are told apart from merely small ones.
    NaN rows/columns (learners absent at that epoch) are dropped. Values are annotated
    when ``L <= 10`` unless ``annotate`` says otherwise. Returns the axes.
    """
    from matplotlib.colors import LogNorm

    S = np.asarray(S, dtype=float)
    keep = ~np.all(np.isnan(S), axis=1)
    S = S[keep][:, keep]
    L = S.shape[0]
    labels = list(labels) if labels is not None else _labels(L)
    if ax is None:
        _, ax = plt.subplots(figsize=(0.45 * L + 1.6, 0.45 * L + 1.2))
    if scale == "log":
        shown = np.clip(S, LOG_FLOOR, None)
        im = ax.imshow(shown, norm=LogNorm(vmin=LOG_FLOOR, vmax=1.0), cmap=SEQUENTIAL)
        level = lambda v: (np.log10(max(v, LOG_FLOOR)) - np.log10(LOG_FLOOR)) / -np.log10(LOG_FLOOR)  # noqa: E731
        fmt = lambda v: f"{v:.2f}" if v >= 0.01 else ("0" if v <= 0 else f"{v:.0e}")  # noqa: E731
    elif scale == "linear":
        im = ax.imshow(S, vmin=vmin, vmax=vmax, cmap=SEQUENTIAL)
        level = lambda v: (v - vmin) / (vmax - vmin + 1e-12)  # noqa: E731
        fmt = lambda v: f"{v:.2f}"  # noqa: E731
    else:
        raise ValueError(f"scale={scale!r}: expected 'linear' or 'log'")
    ax.set_xticks(range(L), labels[:L], rotation=90 if L > 8 else 0)
    ax.set_yticks(range(L), labels[:L])
    ax.tick_params(length=0)
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    if annotate if annotate is not None else L <= 10:
        for i in range(L):
            for j in range(L):
                v = S[i, j]
                ax.text(j, i, fmt(v), ha="center", va="center", fontsize=6 if L <= 6 else 5,
                        color="white" if level(v) < 0.6 else "black")
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        ax.set_title(title)
    return ax


def saturated(S: np.ndarray, threshold: float = 1e-3) -> bool:
    """Whether every off-diagonal of ``S`` (NaN rows dropped) is below ``threshold``."""
    S = np.asarray(S, dtype=float)
    keep = ~np.all(np.isnan(S), axis=1)
    S = S[keep][:, keep]
    off = S[~np.eye(S.shape[0], dtype=bool)]
    return bool(off.size) and bool(np.nanmax(off) < threshold)


def plot_similarity_epochs(similarity: dict, term: str = "sp", phase: str = "train",
                           which: Sequence[int] | None = None, scale: str = "auto"):
    """Similarity matrices of ``term`` at chosen epochs (default: first and last), side by side.

    ``scale``: ``"linear"``, ``"log"`` or ``"auto"`` (log when every shown matrix's off-diagonals
    are below 0.05); a matrix whose off-diagonals are all below 1e-3 is titled "saturated".

    ``similarity`` is a run's ``similarity.npz`` as a dict (arrays ``<phase>_S_<term>``
    of shape ``(E, L, L)``, plus ``stage``/``epoch``).
    """
    key = schema.col(phase, schema.S(term))
    if key not in similarity:
        raise KeyError(f"no {key!r} in the similarity record; available: {sorted(similarity)}")
    stack = similarity[key]
    valid = [i for i in range(len(stack)) if np.isfinite(stack[i]).sum() > 1]
    if not valid:
        raise ValueError(f"{key}: no epoch has two or more learners")
    which = list(which) if which is not None else sorted({valid[0], valid[-1]})
    if scale == "auto":   # a log scale when every shown matrix's off-diagonals are small
        scale = "log" if all(saturated(stack[e], 0.05) for e in which) else "linear"
    fig, axes = plt.subplots(1, len(which), figsize=(3.2 * len(which), 3.0), squeeze=False)
    for ax, e in zip(axes[0], which):
        st, ep = int(similarity["stage"][e]), int(similarity["epoch"][e])
        flag = " - saturated" if saturated(stack[e]) else ""
        plot_similarity(stack[e], ax=ax, title=f"epoch {e + 1} (stage {st + 1}, ep. {ep + 1}){flag}",
                        colorbar=ax is axes[0][-1], scale=scale)
    fig.suptitle(f"{TERM_LABELS.get(term, term)} similarity S ({phase}{', log scale' if scale == 'log' else ''})")
    fig.tight_layout()
    return fig


def _stage_lines(ax, history) -> None:
    """Dotted lines at ESR stage boundaries; integer epoch ticks."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if "stage" not in history:
        return
    starts = history.index[history["stage"].diff().fillna(0) != 0]
    for s in starts:
        ax.axvline(history.loc[s, "global_epoch"] + 0.5, color="#BBBBBB", lw=0.8, ls=":", zorder=0)


def plot_determinant_trends(history, terms: Sequence[str] | None = None, ax=None, phases=("train", "val"),
                            label_prefix: str = "", scale: str = "auto"):
    """``D = det(S)`` per epoch for each diversity term (solid train, dashed val), ESR stage
    boundaries dotted. ``history`` is a run's ``history.csv`` as a DataFrame.

    ``scale``: ``"linear"`` (det(S) in [0, 1]), ``"log1m"`` (``1 - det(S)`` on a log axis: a
    saturated term, det = 1 to many decimals, sits at the bottom instead of on a flat line at 1)
    or ``"auto"`` (``log1m`` when every plotted value is above 0.99).
    """
    if terms is None:
        terms = schema.terms(history.columns, "train")
    if ax is None:
        _, ax = plt.subplots(figsize=(4.2, 2.8))
    x = history["global_epoch"] + 1
    cols = [schema.col(p, schema.D(t)) for t in terms for p in phases if schema.col(p, schema.D(t)) in history]
    values = np.concatenate([history[c].to_numpy(dtype=float) for c in cols]) if cols else np.array([])
    values = values[np.isfinite(values)]
    if scale == "auto":
        scale = "log1m" if values.size and values.min() > 0.99 else "linear"
    if scale not in ("linear", "log1m"):
        raise ValueError(f"scale={scale!r}: expected 'linear', 'log1m' or 'auto'")
    for i, term in enumerate(terms):
        for phase, ls in zip(phases, ("-", "--")):
            col = schema.col(phase, schema.D(term))
            if col in history:
                y = history[col].to_numpy(dtype=float)
                y = np.clip(1.0 - y, LOG_FLOOR, None) if scale == "log1m" else y
                ax.plot(x, y, ls=ls, color=PALETTE[i % len(PALETTE)], marker="o", ms=2.5,
                        label=f"{label_prefix}{TERM_LABELS.get(term, term)} ({phase})")
    _stage_lines(ax, history)
    ax.set_xlabel("epoch")
    if scale == "log1m":
        ax.set_yscale("log")
        ax.set_ylim(LOG_FLOOR / 2, 1.5)
        ax.set_ylabel("1 - det(S)  (near 0: saturated)")
    else:
        ax.set_ylabel("det(S)")
        ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    return ax


def plot_diversity_diagnostics(history, terms: Sequence[str] | None = None, phase: str = "train"):
    """Is each diversity term in its working range? Three panels per epoch: the kernel arguments
    ``gamma * ||phi_l - phi_k||^2`` (median, 5-95 % band; log axis, the range 0.1-10 where
    ``exp(-arg)`` neither vanishes nor stays at 1 shaded), the mean off-diagonal of ``S`` (log),
    and the term's share of the loss's gradient (log). A saturated term shows arguments far above
    10, off-diagonals near 0 and a share near 0 at a glance."""
    if terms is None:
        terms = schema.diagnosed_terms(history.columns, phase)
    fig, axes = plt.subplots(1, 3, figsize=(11.0, 3.0))
    x = history["global_epoch"] + 1
    axes[0].axhspan(0.1, 10.0, color="#EEEEEE", zorder=0)
    for i, t in enumerate(terms):
        color = PALETTE[i % len(PALETTE)]
        name = TERM_LABELS.get(t, t)
        med = history.get(schema.col(phase, schema.karg(t, 0.5)))
        if med is not None:
            lo, hi = history[schema.col(phase, schema.karg(t, 0.05))], history[schema.col(phase, schema.karg(t, 0.95))]
            axes[0].fill_between(x, np.clip(lo, LOG_FLOOR, None), np.clip(hi, LOG_FLOOR, None), color=color,
                                 alpha=0.2, lw=0)
            axes[0].plot(x, np.clip(med, LOG_FLOOR, None), color=color, marker="o", ms=2.5, label=name)
        off = history.get(schema.col(phase, schema.S_offdiag(t)))
        if off is not None:
            axes[1].plot(x, np.clip(off, LOG_FLOOR, None), color=color, marker="o", ms=2.5, label=name)
        share = history.get(schema.col("train", schema.gradshare(t)))
        if share is not None:
            axes[2].plot(x, np.clip(share, LOG_FLOOR, None), color=color, marker="o", ms=2.5, label=name)
    titles = ("kernel argument gamma d^2 (median, 5-95 %)", "mean off-diagonal of S", "share of the loss gradient (first batch)")
    for ax, title in zip(axes, titles):
        ax.set_yscale("log")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("epoch")
        _stage_lines(ax, history)
        if ax.lines:
            ax.legend(fontsize=7)
    axes[1].set_ylim(LOG_FLOOR / 2, 1.5)
    fig.tight_layout()
    return fig


def plot_gradient_norms(history, ax=None):
    """Norm of the loss's parameter gradient per epoch (first training batch), for the CE part,
    each diversity term in the loss and the whole loss; log axis."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4.2, 2.8))
    x = history["global_epoch"] + 1
    for i, part in enumerate(schema.gradnorm_parts(history.columns)):
        ax.semilogy(x, history[schema.col("train", schema.gradnorm(part))].clip(lower=1e-8), marker="o", ms=2.5,
                    color=PALETTE[i % len(PALETTE)], label=part)
    _stage_lines(ax, history)
    ax.set_xlabel("epoch")
    ax.set_ylabel("gradient norm (first batch)")
    if ax.lines:
        ax.legend(fontsize=7)
    return ax


#: legend names of heads whose record name is not what a reader calls them
HEAD_LABELS = {"ensemble": "softmax mean"}


def plot_accuracy_curves(history, phase: str = "val", ax=None, main_head: str | None = None):
    """Accuracy per epoch: each learner's head thin and coloured, the other heads black, the
    model's decision (``main_head``, e.g. ``run.metrics["selected"]["head"]``; default the first
    decision head recorded) thick."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4.2, 2.8))
    x = history["global_epoch"] + 1
    for i, head in enumerate(schema.learner_heads(history.columns, phase)):
        ax.plot(x, history[schema.col(phase, schema.acc(head))], color=PALETTE[i % len(PALETTE)], lw=1, alpha=0.9,
                label=head.replace("_", " "))
    decisions = schema.decision_heads(history.columns, phase)
    main_head = main_head if main_head in decisions else (decisions[0] if decisions else None)
    others = iter((":", "--", "-."))
    for head in decisions:
        style = "-" if head == main_head else next(others, ":")
        ax.plot(x, history[schema.col(phase, schema.acc(head))], color=ENSEMBLE_COLOR, lw=2 if style == "-" else 1.2,
                ls=style, label=HEAD_LABELS.get(head, head))
    _stage_lines(ax, history)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{phase} accuracy")
    ax.legend(fontsize=6, ncol=2)
    return ax


def plot_confusion(cm: np.ndarray, classes: Sequence[str], normalize: bool = True, ax=None, title=None):
    """Confusion matrix (rows: true class); row-normalised by default, counts annotated."""
    cm = np.asarray(cm, dtype=float)
    shown = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1) if normalize else cm
    K = len(classes)
    if ax is None:
        _, ax = plt.subplots(figsize=(0.5 * K + 1.8, 0.5 * K + 1.4))
    im = ax.imshow(shown, vmin=0, vmax=1 if normalize else None, cmap=SEQUENTIAL)
    ax.set_xticks(range(K), classes, rotation=45, ha="right")
    ax.set_yticks(range(K), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(K):
        for j in range(K):
            ax.text(j, i, f"{shown[i, j]:.2f}" if normalize else f"{int(cm[i, j])}", ha="center", va="center",
                    fontsize=6, color="white" if shown[i, j] < 0.6 * (shown.max() or 1) else "black")
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        ax.set_title(title)
    return ax


def plot_det_vs_distance(L_values=(2, 3, 5, 9), gammas=(1.0, 10.0, 100.0), max_sq_dist: float = 1.0,
                         diagonal: str = "paper"):
    """How ``det(S)`` responds to learner similarity, gamma and L (equidistant toy learners).

    One panel per gamma; x: squared distance between every pair of learners; one line per L.
    Values come from :func:`fer_lab.diversity.diversity` (via :func:`fer_lab.toy.det_sweep`).
    """
    from .toy import det_sweep

    d2 = np.linspace(0.0, max_sq_dist, 121)
    fig, axes = plt.subplots(1, len(gammas), figsize=(3.0 * len(gammas), 2.6), sharey=True, squeeze=False)
    for ax, g in zip(axes[0], gammas):
        D = det_sweep(L_values, d2, g, diagonal)
        for i, L in enumerate(L_values):
            ax.plot(d2, D[i], color=PALETTE[i % len(PALETTE)], label=f"L = {L}")
        ax.set_title(f"gamma = {g:g}")
        ax.set_xlabel(r"pairwise $\|f_l - f_k\|^2$")
    axes[0][0].set_ylabel(f"det(S) ({diagonal} diagonal)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_diagonal_conventions(L_max: int = 10, s: float = 0.5, gamma: float = 10.0):
    """The paper's unit diagonal against the public code's zero diagonal.

    Left: ``det(S)`` against L with every off-diagonal entry ``s`` (markers: the package's
    numbers; lines: closed forms). Right: what maximising ``D`` does - push the learners apart
    (+1, rewards diversity) or pull them together (-1, rewards similarity), from the sign of
    ``dD / d(distance)``; with the zero diagonal it flips with the parity of L.
    """
    from .toy import closed_form_det, det_sweep, diversity_direction

    Ls = np.arange(2, L_max + 1)
    d2 = -np.log(s) / gamma
    fig, axes = plt.subplots(1, 2, figsize=(7.4, 2.8))
    for diag, color, marker, shift in (("paper", PALETTE[0], "o", -0.2), ("reference", PALETTE[3], "s", 0.2)):
        D = det_sweep(Ls, [d2], gamma, diag)[:, 0]
        axes[0].plot(Ls, [closed_form_det(int(L), s, diag) for L in Ls], color=color, lw=1)
        axes[0].scatter(Ls, D, color=color, marker=marker, s=14, label=f"{diag} diagonal", zorder=3)
        direction = [np.sign(diversity_direction(int(L), d2, gamma, diag)) for L in Ls]
        axes[1].bar(Ls + shift, direction, width=0.4, color=color, label=f"{diag} diagonal")
    axes[0].axhline(0, color="#999999", lw=0.6)
    axes[0].set_xlabel("learners L")
    axes[0].set_ylabel(f"det(S), off-diagonal s = {s:g}")
    axes[0].legend(fontsize=7)
    axes[1].set_xlabel("learners L")
    axes[1].set_ylabel("maximising D ...")
    axes[1].set_yticks([-1, 0, 1], ["pulls learners together", "", "pushes learners apart"])
    axes[1].axhline(0, color="#999999", lw=0.6)
    for ax in axes:
        ax.set_xticks(Ls)
    fig.tight_layout()
    return fig


def plot_determinant_trends_many(histories: dict, term: str = "sp", phase: str = "val", ax=None):
    """``D`` of one term per epoch for many runs in one figure: ``histories`` maps a label
    (e.g. ``"esr9_div s0"``) to a run's history DataFrame. Runs sharing the label's first
    word share a colour."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5.0, 3.0))
    groups = list(dict.fromkeys(label.split()[0] for label in histories))
    for label, h in histories.items():
        col = f"{phase}_D_{term}"
        if col not in h:
            continue
        color = PALETTE[groups.index(label.split()[0]) % len(PALETTE)]
        ax.plot(h["global_epoch"] + 1, h[col], color=color, lw=1, alpha=0.85, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"det(S), {TERM_LABELS.get(term, term)} ({phase})")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=6, ncol=2)
    return ax


def plot_study_series(summary: dict, columns: dict[str, str], axes=None):
    """Per-epoch diagnostics of a study, one panel per ``columns`` entry (history column -> panel
    title), log scale: one colour per variant of ``summary`` (:func:`fer_lab.report.study_summary`
    over records with a ``series``), one line per seed, values floored at ``LOG_FLOOR`` so exact
    zeros (a saturated term) stay on the plot. Returns the axes."""
    if axes is None:
        _, axes = plt.subplots(1, len(columns), figsize=(3.7 * len(columns), 3.0), squeeze=False)
        axes = axes[0]
    for i, s in enumerate(summary.values()):
        for j, rec in enumerate(s["runs"]):
            h = rec.get("series", {})
            for ax, col in zip(axes, columns):
                if col in h:
                    ax.plot(np.arange(1, len(h[col]) + 1), np.clip(h[col], LOG_FLOOR, None),
                            color=PALETTE[i % len(PALETTE)], lw=1, alpha=0.85, label=s["label"] if j == 0 else None)
    for ax, title in zip(axes, columns.values()):
        ax.set_yscale("log")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize=6)
    return axes


# ---- a run's standard figures -----------------------------------------------------------
def run_figures(run_path, model=None, dataset=None, device="cpu", n_images: int = 6) -> list[Path]:
    """Write a run's standard figures into ``<run>/figures/``:

    accuracy curves (per branch and ensemble), determinant trends, similarity matrices at
    the first and last epoch, test confusion matrix and, given the trained ``model`` and an
    evaluation ``dataset``, the per-branch spatial attention on the same faces.
    """
    set_style()
    run = load_run(run_path)
    out_dir = run.path / "figures"
    written: list[Path] = []
    h = run.history

    def emit(fig, name):
        written.extend(save_figure(fig, out_dir, name))
        plt.close(fig)

    if len(h):
        fig, axes = plt.subplots(1, 2, figsize=(8.4, 2.8))
        main = (run.metrics or {}).get("selected", {}).get("head")
        plot_accuracy_curves(h, "train", axes[0], main)
        plot_accuracy_curves(h, "val", axes[1], main)
        fig.tight_layout()
        emit(fig, "accuracy_curves")
        if schema.has_diversity(h.columns):
            fig, ax = plt.subplots(figsize=(4.6, 3.0))
            plot_determinant_trends(h, ax=ax)
            fig.tight_layout()
            emit(fig, "determinant_trends")
        if schema.diagnosed_terms(h.columns):
            emit(plot_diversity_diagnostics(h), "diversity_diagnostics")
    for term in sorted(schema.similarity_terms(run.similarity, "train")):
        try:
            emit(plot_similarity_epochs(run.similarity, term, "train"), f"similarity_{term}")
        except ValueError as err:
            log.info("no similarity figure for %s: %s", term, err)
    if run.metrics and "test" in run.metrics and "confusion" in run.metrics["test"]:
        fig, ax = plt.subplots(figsize=(4.6, 3.8))
        plot_confusion(np.array(run.metrics["test"]["confusion"]), run.metrics["classes"], ax=ax,
                       title=f"{run.metrics['selected']['head']} ({run.metrics.get('test_split')})")
        fig.tight_layout()
        emit(fig, "confusion_matrix")
    if model is not None and dataset is not None:
        base = getattr(dataset, "dataset", dataset)
        targets = base.targets if not hasattr(dataset, "indices") else base.targets[np.asarray(dataset.indices)]
        idx = pick_examples(targets, n_images)
        x, y, out = collect_attention(model, dataset, idx, device)
        from .analysis import learner_attention, learner_predictions

        maps = {k: v.cpu().numpy() for k, v in learner_attention(model, out).items()}
        if maps:
            classes = run.config.get("classes")
            preds = learner_predictions(model, out, maps)
            maps = {k.replace("_", " "): v for k, v in maps.items()}
            emit(plot_map_grid(x.numpy(), maps, classes, y.numpy(), preds), "attention_maps")
    return written
