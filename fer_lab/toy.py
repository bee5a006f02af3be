"""Toy learner features with a controlled similarity, for explaining the diversity term.

Used by ``notebooks/01_diversity_explained.ipynb`` and its figures: L learners whose
features are pairwise equidistant (scaled basis vectors), so every off-diagonal entry
of S equals ``exp(-gamma * d2)`` and the determinant has closed forms to compare with.
Not a dataset and not used in training.
"""
from __future__ import annotations

import numpy as np
import torch

from .diversity import diversity


def equidistant_learners(L: int, sq_dist: float, samples: int = 1) -> torch.Tensor:
    """``(L, samples, L)`` float64 features whose pairwise squared distance is ``sq_dist``."""
    if L < 1 or sq_dist < 0:
        raise ValueError(f"need L >= 1 and sq_dist >= 0, got L={L}, sq_dist={sq_dist}")
    c = float(np.sqrt(sq_dist / 2.0))
    return (torch.eye(L, dtype=torch.float64) * c).unsqueeze(1).repeat(1, samples, 1)


def det_sweep(L_values, sq_dists, gamma: float = 10.0, diagonal: str = "paper") -> np.ndarray:
    """``D = det(S)`` from :func:`fer_lab.diversity.diversity` on equidistant learners:
    array ``(len(L_values), len(sq_dists))``."""
    return np.array([[float(diversity(equidistant_learners(L, d2), gamma, diagonal)[0]) for d2 in sq_dists]
                     for L in L_values])


def closed_form_det(L: int, s, diagonal: str = "paper"):
    """Determinant of the ``L x L`` matrix with off-diagonal ``s`` and unit (``paper``) or zero
    (``reference``) diagonal: ``(1-s)^(L-1) (1+(L-1)s)`` or ``(L-1)(-1)^(L-1) s^L``."""
    s = np.asarray(s, dtype=float)
    if diagonal == "paper":
        return (1 - s) ** (L - 1) * (1 + (L - 1) * s)
    return (L - 1) * (-1.0) ** (L - 1) * s ** L


def diversity_direction(L: int, sq_dist: float, gamma: float = 10.0, diagonal: str = "paper") -> float:
    """``dD / d(sq_dist)`` at equidistant learners (autograd through :func:`diversity`).

    Positive: maximising ``D`` pushes learners apart (the term rewards diversity); negative:
    it pulls them together (rewards similarity) - the zero-diagonal convention for odd L.
    """
    t = torch.tensor(float(sq_dist), dtype=torch.float64, requires_grad=True)
    f = torch.eye(L, dtype=torch.float64).unsqueeze(1) * torch.sqrt(t / 2.0)
    D, _ = diversity(f, gamma, diagonal)
    (g,) = torch.autograd.grad(D, t)
    return float(g)
