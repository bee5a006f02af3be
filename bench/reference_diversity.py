"""The diversity term the way the authors' public code computes it: a baseline to beat.

Written for the benchmark only (not used by fer_lab): the similarity matrix starts as
``zeros(L, L)`` and is filled element by element in a Python double loop, each entry a
separate mean over the batch (on a GPU, each a kernel launch and a synchronisation when
its value is read); both the spatial and the channel term are built this way. The zero
diagonal is the public code's convention (``diagonal="reference"`` in fer_lab); the
unit-diagonal variant fills the diagonal with ones.
"""
from __future__ import annotations

import torch


def loop_similarity(features: torch.Tensor, gamma: float = 10.0, diagonal: str = "reference") -> torch.Tensor:
    """``features`` ``(L, N, *dims)`` -> ``S`` ``(L, L)``, filled entry by entry."""
    L = features.shape[0]
    S = torch.zeros(L, L, dtype=features.dtype, device=features.device)
    for l in range(L):
        for k in range(L):
            if l == k:
                if diagonal == "paper":
                    S[l, k] = 1.0
                continue
            diff = (features[l] - features[k]).reshape(features.shape[1], -1)
            S[l, k] = torch.exp(-gamma * diff.pow(2).sum(dim=1)).mean()
    return S


def loop_diversity(features: torch.Tensor, gamma: float = 10.0, diagonal: str = "reference") -> torch.Tensor:
    """``det`` of :func:`loop_similarity`."""
    return torch.det(loop_similarity(features, gamma, diagonal))
