"""Figures of faces: attention and Grad-CAM maps overlaid on the faces they explain, channel
attention per learner, and one photograph's prediction (:func:`plot_face_prediction`).
Panels are sized to be read at a notebook's full width (about 2 inches per face, 9-10 pt text)."""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

from .style import ATTENTION, PALETTE, SEQUENTIAL, _labels, display_name


def upsample(maps: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of ``(..., h, w)`` maps to ``(..., H, W)``."""
    t = torch.as_tensor(np.asarray(maps, dtype=np.float32))
    lead = t.shape[:-2]
    t = torch.nn.functional.interpolate(t.reshape(-1, 1, *t.shape[-2:]), size=size, mode="bilinear",
                                        align_corners=False)
    return t.reshape(*lead, *size).numpy()


def _as_display(image: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` or ``(H, W, C)`` float/uint8 image -> ``(H, W, 3)`` float in ``[0, 1]``."""
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = np.moveaxis(img, 0, -1)
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    img = img.astype(np.float32)
    if img.max() > 1.5:
        img = img / 255.0
    return np.clip(img, 0, 1)


def plot_map_grid(images, maps, classes: Sequence[str] | None = None, targets=None, predictions=None,
                  column_labels: Sequence[str] | None = None, alpha: float = 0.55, shared_scale: bool = True,
                  cmap: str = ATTENTION, panel: float = 1.9, confidences=None, colorbar: bool = True):
    """Each row one face, each column one map (a learner's attention or Grad-CAM) overlaid on it.

    ``images`` ``(B, C, H, W)``; ``maps`` either ``(L, B, h, w)`` (columns ``branch 1..L``) or
    a dict ``{column label: (B, h, w)}`` (e.g. two runs side by side, or attention next to
    Grad-CAM: columns may have different resolutions); maps are upsampled bilinearly.
    ``predictions`` ``(L, B)`` class indices (one row per column) are printed per panel, red
    when wrong, with ``confidences`` ``(L, B)`` in percent when given; ``targets`` ``(B,)``
    label the rows. One colour scale for the whole grid (``shared_scale``, with a colourbar) so
    learners are comparable; otherwise each map is min-max scaled. ``panel``: inches per face,
    sized to be read at a notebook's full width.
    """
    images = np.asarray(images)
    H, W = _as_display(images[0]).shape[:2]
    if isinstance(maps, dict):
        column_labels = list(maps) if column_labels is None else list(column_labels)
        maps = list(maps.values())
    else:
        column_labels = list(column_labels) if column_labels is not None else _labels(len(maps), "branch ")
    column_labels = [display_name(c) for c in column_labels]
    # columns may differ in resolution (6x6 attention next to full-size Grad-CAM)
    up = np.stack([upsample(np.asarray(m, dtype=np.float32), (H, W)) for m in maps])
    L, B = up.shape[:2]
    lo, hi = (float(np.nanmin(up)), float(np.nanmax(up))) if shared_scale else (None, None)
    fig, axes = plt.subplots(B, L + 1, figsize=(panel * (L + 1) + (0.6 if colorbar and shared_scale else 0),
                                                panel * 1.12 * B), squeeze=False)
    im = None
    for b in range(B):
        img = _as_display(images[b])
        axes[b, 0].imshow(img)
        if targets is not None and classes is not None:
            axes[b, 0].set_ylabel(classes[int(targets[b])], fontsize=10)
        for l in range(L):
            ax = axes[b, l + 1]
            ax.imshow(img.mean(axis=-1), cmap="gray", vmin=0, vmax=1)
            m = up[l, b]
            vmin, vmax = (lo, hi) if shared_scale else (m.min(), m.max())
            im = ax.imshow(m, cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax)
            if predictions is not None and classes is not None:
                p = int(predictions[l][b])
                ok = targets is None or p == int(targets[b])
                text = classes[p] + (f" {float(confidences[l][b]):.0f}%" if confidences is not None else "")
                ax.set_title(text, fontsize=9, color="black" if ok else PALETTE[3], pad=3)
        for ax in axes[b]:
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
    for l, name in enumerate(["input"] + column_labels):
        axes[0, l].annotate(name, (0.5, 1.22), xycoords="axes fraction", ha="center", fontsize=10, weight="bold")
    fig.subplots_adjust(wspace=0.06, hspace=0.3)
    if colorbar and shared_scale and im is not None:
        cb = fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.025, pad=0.02)
        cb.set_label("map value (shared scale)", fontsize=9)
        cb.solids.set(alpha=1)
    return fig


def plot_channel_attention(channel_attention, labels: Sequence[str] | None = None, ax=None, sort: bool = True):
    """Channel attention of each learner as a heatmap (rows: learners, columns: channels).

    ``channel_attention`` ``(L, B, C)`` (averaged over the batch) or ``(L, C)``; channels are
    ordered by the first learner's attention (``sort``) so differences between learners show.
    """
    ca = np.asarray(channel_attention, dtype=np.float32)
    if ca.ndim == 3:
        ca = ca.mean(axis=1)
    if sort:
        ca = ca[:, np.argsort(-ca[0])]
    labels = list(labels) if labels is not None else _labels(ca.shape[0], "branch ")
    if ax is None:
        _, ax = plt.subplots(figsize=(6.0, 0.35 * ca.shape[0] + 1.0))
    im = ax.imshow(ca, aspect="auto", vmin=0, vmax=1, cmap=SEQUENTIAL, interpolation="nearest")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("channel" + (" (sorted by the first learner)" if sort else ""))
    ax.figure.colorbar(im, ax=ax, fraction=0.03, pad=0.02)
    return ax


@torch.no_grad()
def collect_attention(model, dataset, indices: Sequence[int], device="cpu"):
    """Run ``model`` (eval mode, restored afterwards) on ``dataset[indices]``.

    Returns ``(images (B, C, H, W), targets (B,), output)`` where ``output`` is the model's
    output dataclass. Items of a dataset returning masks ``(x, y, masks)`` are accepted.
    """
    was_training = model.training
    model.eval()
    try:
        from .data.base import stack_items

        x, y, _ = stack_items(dataset, indices)
        out = model(x.to(device))
    finally:
        model.train(was_training)
    return x.cpu(), y, out


def pick_examples(targets: np.ndarray, n: int, seed: int = 0) -> list[int]:
    """``n`` item indices spread over classes (one per class in turn), reproducibly."""
    rng = np.random.default_rng(seed)
    classes = np.unique(targets)
    per = {c: list(rng.permutation(np.flatnonzero(targets == c))) for c in classes}
    out = []
    while len(out) < n and any(per.values()):
        for c in classes:
            if per[c] and len(out) < n:
                out.append(int(per[c].pop()))
    return out


def plot_face_prediction(pred, panel: float = 2.0):
    """One face of :meth:`fer_lab.predict.Predictor.predict_image`: top row the face and each
    learner's spatial attention (titled with that learner's class and confidence; one colour
    scale for all learners), bottom row the Grad-CAM of each head for its own prediction
    (``[0, 1]``), and at the right the main head's probability of every class."""
    face = np.asarray(pred.face)
    learners, cams = list(pred.attention), list(pred.grad_cam)
    cols = 1 + max(len(learners), len(cams) - 1, 1)
    rows = 2 if cams else 1
    fig = plt.figure(figsize=(panel * cols + 3.4, panel * 1.2 * rows + 0.4), layout="constrained")
    grid = fig.add_gridspec(rows, cols + 2, width_ratios=[1] * cols + [0.08, 1.4])
    ax = fig.add_subplot(grid[0, 0])
    panels = [ax]
    ax.imshow(face)
    ax.set_title(f"{pred.decision()}\n({display_name(pred.main_head)})", fontsize=10, weight="bold")
    gray = _as_display(face).mean(axis=-1)
    size = gray.shape

    def verdict(head):
        p = pred.probabilities.get(head)
        return "" if p is None else f": {pred.classes[int(np.argmax(p))]} {100 * float(np.max(p)):.0f}%"

    def row(r, keys, maps, first_col, what, lo, hi):
        im = None
        for j, key in enumerate(keys):
            a = fig.add_subplot(grid[r, first_col + j])
            panels.append(a)
            a.imshow(gray, cmap="gray", vmin=0, vmax=1)
            im = a.imshow(upsample(maps[key], size), cmap=ATTENTION, alpha=0.55, vmin=lo, vmax=hi)
            a.set_title(f"{display_name(key)}{verdict(key)}\n{what}", fontsize=9)
        if im is not None:
            cb = fig.colorbar(im, cax=fig.add_subplot(grid[r, cols]))
            cb.solids.set(alpha=1)
            cb.ax.tick_params(labelsize=8)

    if learners:
        stack = np.stack([np.asarray(pred.attention[k], dtype=np.float32) for k in learners])
        row(0, learners, pred.attention, 1, "attention", float(stack.min()), float(stack.max()))
    if cams:
        row(1, cams, pred.grad_cam, 0, "Grad-CAM", 0.0, 1.0)
    for a in panels:
        a.set_xticks([])
        a.set_yticks([])
    bar = fig.add_subplot(grid[:, cols + 1])
    p = 100 * np.asarray(pred.probabilities[pred.main_head], dtype=float)
    order = np.arange(len(p))[::-1]
    bar.barh(range(len(p)), p[order], color=[PALETTE[0] if k == np.argmax(p) else PALETTE[7] for k in order])
    bar.set_yticks(range(len(p)), [pred.classes[k] for k in order], fontsize=9)
    bar.set_xlim(0, 100)
    bar.set_xlabel(f"{display_name(pred.main_head)} (%)", fontsize=9)
    fig.suptitle(f"{pred.image}, face {pred.face_index + 1}", fontsize=10)
    return fig
