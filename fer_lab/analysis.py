"""Where do the learners look? Attention and Grad-CAM maps per learner, scored against face regions.

Helpers behind ``notebooks/04_attention_explorer.ipynb``: each learner's spatial
attention (``model.attention_maps``, the model contract), Grad-CAM per learner, and how much of each
map falls inside the synthetic faces' expression regions
(:func:`attention_in_regions`); and how differently an ensemble's
learners behave (:func:`prediction_disagreement`, :func:`attention_overlap`,
:func:`branch_agreement`). Returns arrays and DataFrames; plotting is :mod:`fer_lab.viz`'s job.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .cam import grad_cam
from .data.base import stack_items
from .data.synthetic import REGIONS
from .models.common import NON_DIFFERENTIABLE_HEADS
from .utils import offdiag


@torch.no_grad()
def attention_in_regions(maps: torch.Tensor, masks: torch.Tensor,
                         regions: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """How much of each attention map falls inside the face regions.

    Args:
        maps: ``(B, h, w)`` non-negative attention (e.g. ESR's 6x6 spatial attention).
        masks: ``(B, R, H, W)`` 0/1 region masks at image resolution (any dtype).
        regions: names of the ``R`` mask channels (default :data:`REGIONS`).

    The maps are upsampled bilinearly (``align_corners=False``) to ``(H, W)`` and
    normalised to unit mass. Returns a dict of float32 tensors of shape ``(B,)`` on
    ``maps``' device:

    - ``"inside"``: share of attention mass inside the union of the regions;
    - ``"area"``: area fraction of that union (what uniform attention scores);
    - ``"lift"``: ``inside / area`` (1 = no better than uniform; NaN when area is 0);
    - ``"<region>"`` for each region name: share of mass inside that region.

    A map with zero total mass gets 0 shares.
    """
    if maps.ndim != 3:
        raise ValueError(f"maps: expected shape (B, h, w), got {tuple(maps.shape)}")
    if masks.ndim != 4 or masks.shape[0] != maps.shape[0]:
        raise ValueError(f"masks: expected shape (B, R, H, W) with B={maps.shape[0]}, got {tuple(masks.shape)}")
    names = tuple(REGIONS if regions is None else regions)
    if len(names) != masks.shape[1]:
        raise ValueError(f"regions: {len(names)} names for {masks.shape[1]} mask channels")
    H, W = masks.shape[-2:]
    m = torch.as_tensor(masks).to(device=maps.device, dtype=torch.float32)
    a = maps.to(torch.float32).clamp_min(0)
    if a.shape[-2:] != (H, W):
        a = F.interpolate(a[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0]
    total = a.sum(dim=(1, 2))
    safe = torch.where(total > 0, total, torch.ones_like(total))
    union = m.amax(dim=1)
    out: dict[str, torch.Tensor] = {}
    inside = (a * union).sum(dim=(1, 2)) / safe
    inside = torch.where(total > 0, inside, torch.zeros_like(inside))
    area = union.mean(dim=(1, 2))
    out["inside"] = inside
    out["area"] = area
    out["lift"] = torch.where(area > 0, inside / area.clamp_min(1e-12), torch.full_like(area, float("nan")))
    shares = (a[:, None] * m).sum(dim=(2, 3)) / safe[:, None]
    shares = torch.where(total[:, None] > 0, shares, torch.zeros_like(shares))
    for r, name in enumerate(names):
        out[name] = shares[:, r]
    return out


def learner_attention(model, out, layer: str = "last") -> dict[str, torch.Tensor]:
    """Each learner's spatial attention, face-aligned: ``{label: (B, h, w)}``
    (``model.attention_maps(out, layer)``; empty for a model without attention).

    ESR: ``branch_<l>`` (each branch's last CBAM). MA-Net: ``local patches`` (the four patch
    CBAMs re-tiled over the face).
    """
    return model.attention_maps(out, layer) if model.attention_layers() else {}


def learner_predictions(model, out, learners) -> np.ndarray:
    """``(len(learners), B)`` predicted classes, one row per learner label: the learner's own head
    when the model has one (``branch_2``), else the model's main head (``local patches``)."""
    heads = model.heads(out)
    return np.stack([heads.get(k, heads[model.main_head]).argmax(dim=-1).cpu().numpy() for k in learners])


def region_scores(model, dataset, indices: Sequence[int], batch_size: int = 32, with_grad_cam: bool = True,
                  progress: bool = False):
    """Share of each learner's attention inside the expression regions, averaged over ``indices``.

    ``dataset`` must return region masks (synthetic faces with ``return_masks=True``). Rows:
    one per learner and map kind (``spatial attention`` of the last CBAM(s), see
    :func:`learner_attention`; ``Grad-CAM`` of every scoring head);
    columns ``inside`` (share of mass in the union of eyes, brows, mouth and nose), ``area``
    (their area share: what uniform attention scores), ``lift`` (= inside / area) and one share
    per region. Returns a pandas DataFrame. ``progress``: a bar over the batches.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    was = model.training
    model.eval()
    acc: dict[tuple[str, str], list[dict]] = {}
    try:
        for start in tqdm(range(0, len(indices), batch_size), desc="region scores", disable=not progress):
            x, y, masks = stack_items(dataset, indices[start:start + batch_size])
            if masks is None:
                raise ValueError("region_scores needs a dataset that returns region masks (synthetic faces "
                                 "with return_masks=True)")
            out = model(x.to(device))
            kinds = [("spatial attention", learner_attention(model, out))]
            if with_grad_cam:
                heads = [h for h in model.heads(out) if h not in NON_DIFFERENTIABLE_HEADS]
                kinds.append(("Grad-CAM", {h: torch.from_numpy(grad_cam(model, x, h)) for h in heads}))
            for kind, per in kinds:
                for learner, m in per.items():
                    r = attention_in_regions(m.float().cpu(), masks.float())
                    acc.setdefault((learner, kind), []).append({k: v.mean().item() * len(x) for k, v in r.items()})
    finally:
        model.train(was)
    rows = []
    for (learner, kind), parts in acc.items():
        n = len(indices)
        row = {"learner": learner, "map": kind}
        for key in ["inside", "area", "lift", *REGIONS]:
            row[key] = sum(p[key] for p in parts) / n
        rows.append(row)
    return pd.DataFrame(rows)


# ---- how different are the learners? ---------------------------------------------------------
def _offdiag_mean(M: np.ndarray) -> float:
    off = offdiag(M)
    return float(off.mean()) if off.size else float("nan")


def prediction_disagreement(predictions) -> np.ndarray:
    """Pairwise disagreement of ``L`` learners: ``(L, N)`` predicted classes or ``(L, N, K)``
    scores -> ``(L, L)`` share of samples on which learners ``l`` and ``k`` predict different
    classes (0 on the diagonal)."""
    p = np.asarray(predictions)
    p = p.argmax(axis=-1) if p.ndim == 3 else p
    return (p[:, None, :] != p[None, :, :]).mean(axis=-1)


def attention_overlap(maps) -> np.ndarray:
    """Pairwise overlap of ``L`` learners' spatial maps ``(L, N, h, w)`` (non-negative): each map
    normalised to sum 1, then the histogram intersection ``sum_hw min(p_l, p_k)`` averaged over
    the ``N`` samples -> ``(L, L)``: 1 where two learners spread their attention identically,
    0 where they look at disjoint places (1 on the diagonal)."""
    m = np.asarray(maps, dtype=np.float64)
    L, N = m.shape[:2]
    p = m.reshape(L, N, -1).clip(min=0)
    p = p / np.maximum(p.sum(axis=-1, keepdims=True), 1e-12)
    return np.minimum(p[:, None], p[None, :]).sum(axis=-1).mean(axis=-1)


@torch.no_grad()
def branch_agreement(model, dataset, batch_size: int = 256, max_items: int | None = None) -> dict:
    """How differently an ensemble's learners behave on ``dataset`` (e.g. the reported split).

    Returns JSON-able ``{"n", "disagreement" (L, L), "disagreement_mean", "overlap_<source>" (L, L),
    "overlap_<source>_mean"}`` where sources are ``features`` (the channel mean of each branch's
    last feature map, defined for every ESR) and, with CBAM, ``attention`` (each branch's last
    spatial attention). Only the branches in the ensemble (``num_active``) are compared.
    """
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    n = len(dataset) if max_items is None else min(len(dataset), int(max_items))
    preds, feats, atts = [], [], []
    try:
        for start in range(0, n, batch_size):
            x, _, _ = stack_items(dataset, range(start, min(n, start + batch_size)))
            out = model(x.to(device))
            k = getattr(out, "num_active", None) or out.branch_logits.shape[0]
            preds.append(out.branch_logits[:k].argmax(-1).cpu().numpy())
            feats.append(out.features[:k].mean(dim=2).float().cpu().numpy())
            if out.spatial_attention is not None:
                atts.append(out.spatial_attention[:k].float().cpu().numpy())
    finally:
        model.train(was)
    res = {"n": n}
    D = prediction_disagreement(np.concatenate(preds, axis=1))
    res.update(disagreement=D.tolist(), disagreement_mean=_offdiag_mean(D))
    for name, parts in (("features", feats), ("attention", atts)):
        if parts:
            O = attention_overlap(np.concatenate(parts, axis=1))
            res.update({f"overlap_{name}": O.tolist(), f"overlap_{name}_mean": _offdiag_mean(O)})
    return res
