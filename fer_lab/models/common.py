"""Pieces every fer_lab model shares: the loss record and ensemble/CE helpers.

The training engine relies on a small duck-typed protocol, documented in
``fer_lab/models/__init__.py``; this file holds the parts of it that are code.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..diversity import DiversityConfig, diversity_terms, gather_learners, term_diagnostics


@dataclass
class LossOutput:
    """A model's loss on one batch.

    - ``total``: scalar to minimise (CE terms minus weighted diversity)
    - ``ce``: ``{head: scalar CE}`` for each supervised head
    - ``diversity``: ``{term: D}`` (scalars; ``spatial``, ``channel``, ``branch``), for
      the terms in the loss and for monitored ones (computed without gradient)
    - ``similarity``: ``{term: S}`` similarity matrices ``(L, L)``
    - ``in_loss``: the terms that ``total`` includes
    - ``ce_total``: the supervised part of ``total`` (what ``total`` would be without diversity)
    - ``diagnostics``: ``{term: {"gamma": bandwidth used, "kernel_args": (P,) gamma * squared
      distances of every learner pair and sample}}`` (no gradient;
      :func:`fer_lab.diversity.term_diagnostics`)
    """

    total: torch.Tensor
    ce: dict = field(default_factory=dict)
    diversity: dict = field(default_factory=dict)
    similarity: dict = field(default_factory=dict)
    in_loss: tuple = ()
    ce_total: torch.Tensor | None = None
    diagnostics: dict = field(default_factory=dict)


#: Heads whose scores carry no gradient (a vote): Grad-CAM and other gradient methods skip them.
NON_DIFFERENTIABLE_HEADS = ("vote",)



def diversity_loss(features: dict, config: DiversityConfig, monitor: tuple[str, ...], total: torch.Tensor, ce: dict) -> LossOutput:
    """Subtract ``config.weight * D`` of each configured term from ``total`` and monitor the others.

    ``features`` maps term names to learner features ``(L, B, ...)``; ``monitor`` lists the
    terms to report even when they are not in the loss (evaluated without gradient, with
    the same gamma and diagonal), so models with and without diversity are compared on
    the same quantity.
    """
    ce_total = total
    features = gather_learners(features)          # the global batch in distributed training
    terms = diversity_terms(features, config) if config.enabled else {}
    for D, _ in terms.values():
        total = total - config.weight * D
    rest = tuple(t for t in monitor if t not in terms and t in features)
    if rest:
        with torch.no_grad():
            watched = diversity_terms({t: features[t].detach() for t in rest}, config, rest)
    else:
        watched = {}
    both = {**terms, **watched}
    return LossOutput(total=total, ce=ce, diversity={k: v[0] for k, v in both.items()},
                      similarity={k: v[1] for k, v in both.items()}, in_loss=tuple(terms),
                      ce_total=ce_total, diagnostics=term_diagnostics(features, config, tuple(both)))


def multi_head_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each of ``H`` heads: ``logits`` ``(H, B, K)``, ``target`` ``(B,)``
    indices or ``(B, K)`` probabilities -> ``(H,)`` batch-mean CE per head (one kernel)."""
    H, B, K = logits.shape
    if target.dim() == 1:
        flat_target = target.repeat(H)
    elif target.shape == (B, K):
        flat_target = target.to(logits.dtype).repeat(H, 1)
    else:
        raise ValueError(f"target must be (B,) class indices or (B, K) probabilities with B={B}, K={K}; "
                         f"got {tuple(target.shape)}")
    return F.cross_entropy(logits.reshape(H * B, K), flat_target, reduction="none").view(H, B).mean(dim=1)


def ensemble_from_logits(branch_logits: torch.Tensor):
    """Ensemble decisions from ``(L, B, K)`` logits.

    Returns ``(probs, log_probs, vote_counts, votes)``: mean softmax ``(B, K)``, its log,
    per-class vote counts of the branches' argmax ``(B, K)`` and the plurality vote ``(B,)``
    (ties go to the lowest class index: ``argmax`` returns the first maximum).
    """
    L, B, K = branch_logits.shape
    probs = branch_logits.float().softmax(dim=-1).mean(dim=0)
    counts = F.one_hot(branch_logits.argmax(dim=-1), K).sum(dim=0)
    return probs, probs.clamp_min(1e-12).log(), counts, counts.argmax(dim=-1)
