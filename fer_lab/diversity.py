"""The diversity term of Heidari & Iosifidis (SPEC section 1), in small composable pieces.

Pooling (``spatial_pool``, ``channel_pool``) turns each learner's feature or
attention maps into one vector per sample; ``similarity_matrix`` builds the RBF
similarity between learners, averaged over the batch; ``diversity`` reduces it to
``det(S)`` (or a jittered ``logdet``). ``DiversityConfig`` says which terms a model
uses, and ``diversity_terms`` evaluates them on a model's learner features.

This file knows nothing about models or training: it maps tensors to tensors.

Conventions: ``features`` is ``(L, N, *dims)`` - L learners, N samples. All
computation of ``S`` and its determinant runs in float32 (float64 inputs stay
float64, which ``gradcheck`` needs), with autocast disabled, so bf16/fp16 training
does not degrade the determinant. The paper's matrix has a unit diagonal; the
authors' public code leaves the diagonal at zero (``diagonal="reference"``).
"""
from __future__ import annotations

import contextlib
import contextvars

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch

Diagonal = Literal["paper", "reference"]
Reduction = Literal["det", "logdet"]

#: Jitter added to S before ``logdet``: ``logdet(S + LOGDET_JITTER * I)``. It bounds
#: the term below by ``L * log(1e-6)`` ~ ``-13.8 L`` when learners coincide.
LOGDET_JITTER = 1e-6


def spatial_pool(maps: torch.Tensor) -> torch.Tensor:
    """Mean over channels: ``(..., C, H, W) -> (..., H, W)`` ("where" a learner looks)."""
    if maps.dim() < 3:
        raise ValueError(f"spatial_pool expects (..., C, H, W), got shape {tuple(maps.shape)}")
    return maps.mean(dim=-3)


def channel_pool(maps: torch.Tensor) -> torch.Tensor:
    """Mean over height and width: ``(..., C, H, W) -> (..., C)`` ("what" a learner encodes)."""
    if maps.dim() < 3:
        raise ValueError(f"channel_pool expects (..., C, H, W), got shape {tuple(maps.shape)}")
    return maps.mean(dim=(-2, -1))


#: ``gamma="median"``: the median heuristic, recomputed on every batch (see :func:`resolve_gamma`).
MEDIAN = "median"


def _check_gamma(gamma) -> float | str:
    if isinstance(gamma, str):
        if gamma != MEDIAN:
            raise ValueError(f"gamma={gamma!r}: expected a finite number > 0 or 'median'")
        return gamma
    gamma = float(gamma)
    if not math.isfinite(gamma) or gamma <= 0:
        raise ValueError(f"gamma={gamma!r}: expected a finite number > 0 or 'median'")
    return gamma


def _all_finite(x: torch.Tensor) -> bool:
    """Whether every element is finite, in one reduction pass (min and max propagate NaN and
    carry an infinity) instead of a full-size boolean temporary."""
    lo, hi = torch.aminmax(x.detach())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _as_learner_batch(features: torch.Tensor, check_finite: bool) -> torch.Tensor:
    """``(L, N, *dims)`` -> ``(L, N, D)`` in float32 (float64 kept), validated."""
    if not torch.is_tensor(features):
        raise TypeError(f"features must be a tensor of shape (L, N, *dims), got {type(features).__name__}")
    if features.dim() < 2:
        raise ValueError(f"features must have shape (L, N, *dims) with L learners and N samples, "
                         f"got shape {tuple(features.shape)}")
    L, N = features.shape[:2]
    if L < 1 or N < 1:
        raise ValueError(f"features need at least one learner and one sample, got L={L}, N={N}")
    if check_finite and not _all_finite(features):
        raise ValueError("features contain NaN or Inf; the similarity matrix would be undefined "
                         "(check the model's activations or the learning rate)")
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    return features.reshape(L, N, -1).to(dtype)


def _centred_sq_distances(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``f (N, L, D) -> (d2 (N, L, L) clamped at 0, fc, keep)``: squared distances from each
    sample's Gram matrix of the centred learners; ``keep`` marks entries not clamped."""
    fc = f - f.mean(dim=1, keepdim=True)
    G = torch.matmul(fc, fc.transpose(1, 2))                        # (N, L, L)
    sq = G.diagonal(dim1=1, dim2=2)
    d2 = sq.unsqueeze(2) + sq.unsqueeze(1) - 2.0 * G
    keep = d2 >= 0
    return d2.clamp_min_(0.0), fc, keep


def _sq_distances_backward(g: torch.Tensor, fc: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Gradient to ``f`` from the gradient ``g`` ``(N, L, L)`` to the squared distances."""
    g = g * keep
    gs = g + g.transpose(1, 2)
    # d2_lk = G_ll + G_kk - 2 G_lk and G = fc fc^T give df = M fc with
    # M = -2 gs + 2 diag(row sums of gs); M has zero row sums, so centring needs no term
    M = gs * -2.0
    M.diagonal(dim1=1, dim2=2).add_(2.0 * gs.sum(dim=2))
    return torch.matmul(M, fc)


#: Arguments below these give exp() results under the smallest normal number; the
#: vectorised CPU exp takes a ~40x slower path for them (and the result is ~0 anyway).
_EXP_FLOOR = {torch.float32: -87.0, torch.float64: -708.0}


class _SquaredDistances(torch.autograd.Function):
    """``(N, L, D) -> (N, L, L)`` squared distances between the L rows of each sample, with a
    one-matrix-product backward (see :func:`pairwise_sq_distances`)."""

    @staticmethod
    def forward(ctx, f):
        d2, fc, keep = _centred_sq_distances(f)
        ctx.save_for_backward(fc, keep)
        return d2

    @staticmethod
    def backward(ctx, g):
        return _sq_distances_backward(g, *ctx.saved_tensors)


class _KernelMean(torch.autograd.Function):
    """``(f (N, L, D), gamma) -> mean_i exp(-gamma d2_i)`` ``(L, L)`` as one autograd node.

    Fewer, cheaper operations than autograd's chain (squared distances, scale, exp, mean),
    and arguments past :data:`_EXP_FLOOR` give exactly 0 without exp's ~40x slower underflow
    path, which a saturated term (far-apart learners) would otherwise take for almost every pair.
    """

    @staticmethod
    def forward(ctx, f, gamma):
        d2, fc, keep = _centred_sq_distances(f)
        arg = d2.mul_(-gamma)
        floor = _EXP_FLOOR.get(arg.dtype, -87.0)
        under = arg < floor
        e = arg.clamp_min_(floor).exp_().masked_fill_(under, 0.0)
        ctx.save_for_backward(fc, keep, e)
        ctx.gamma = gamma
        return e.mean(dim=0)

    @staticmethod
    def backward(ctx, g):
        fc, keep, e = ctx.saved_tensors
        # d mean_i exp(-gamma d2_i) / d d2_i = -gamma exp(-gamma d2_i) / N
        g_d2 = e * (g * (-ctx.gamma / e.shape[0]))
        return _sq_distances_backward(g_d2, fc, keep), None


def _pair_sq_distances(f: torch.Tensor) -> torch.Tensor:
    """``f (L, N, D)`` -> ``(L(L-1)/2, N)`` squared distances of every learner pair ``l < k``
    (no gradient)."""
    with torch.no_grad():
        d2, _, _ = _centred_sq_distances(f.detach().transpose(0, 1))        # (N, L, L)
        L = f.shape[0]
        iu = torch.triu_indices(L, L, offset=1, device=f.device)
        return d2[:, iu[0], iu[1]].transpose(0, 1)


def resolve_gamma(features: torch.Tensor, gamma=10.0) -> float:
    """The bandwidth used for ``features`` ``(L, N, *dims)``: ``gamma`` itself, or for
    ``gamma="median"`` the median heuristic ``1 / median ||phi_l(x_i) - phi_k(x_i)||^2`` over
    every learner pair ``l < k`` and sample ``i`` of this batch, so the median kernel argument
    is 1 and ``S`` cannot saturate at either end whatever the features' scale. It is recomputed
    on every batch (a running estimate, not fixed per stage) and carries no gradient. Identical
    learners (median 0) give 1.
    """
    gamma = _check_gamma(gamma)
    if gamma != MEDIAN:
        return gamma
    f = _as_learner_batch(features, check_finite=False)
    if f.shape[0] < 2:
        return 1.0
    med = float(_pair_sq_distances(f).median())
    return 1.0 / med if med > 0 and math.isfinite(med) else 1.0


def kernel_arguments(features: torch.Tensor, gamma=10.0) -> torch.Tensor:
    """``gamma * ||phi_l(x_i) - phi_k(x_i)||^2`` of every learner pair ``l < k`` and sample ``i``:
    ``(L(L-1)/2, N)``, no gradient (with ``gamma`` resolved as :func:`resolve_gamma` does).

    The diagnostic of a saturated term: arguments far above ~10 give ``S_lk`` of 0 in float32
    (``exp(-87)`` underflows) and no gradient; far below ~0.01 give ``S_lk ~ 1`` (learners
    indistinguishable at this bandwidth).
    """
    f = _as_learner_batch(features, check_finite=False)
    return _pair_sq_distances(f) * resolve_gamma(f, gamma)


def pairwise_sq_distances(features: torch.Tensor) -> torch.Tensor:
    """Per-sample squared distances between learners: ``(L, N, D) -> (N, L, L)``.

    ``d2[i, l, k] = G_ll + G_kk - 2 G_lk`` from each sample's Gram matrix ``G`` of the
    learners' features centred on their mean: one batched matrix product forward and one
    backward instead of ``L^2 x N x D`` differences. Centring leaves distances unchanged and
    makes the Gram entries as small as the learners' spread, so the cancellation error stays
    at float round-off relative to ``d2``. Identical learners give exactly 0 (equal rows give
    bitwise-equal Gram entries); round-off below zero is clamped (no gradient there).
    """
    return _SquaredDistances.apply(features.transpose(0, 1))


def similarity_matrix(features: torch.Tensor, gamma: float | str = 10.0, diagonal: Diagonal = "paper",
                      *, check_finite: bool = True) -> torch.Tensor:
    """RBF similarity between learners, averaged over samples.

    ``S_lk = mean_i exp(-gamma * ||f_l,i - f_k,i||^2)`` for ``features`` of shape
    ``(L, N, *dims)``; returns ``S`` of shape ``(L, L)`` (float32, or float64 for
    float64 input), exactly symmetric. ``gamma="median"``: :func:`resolve_gamma`. ``diagonal="paper"`` gives ``S_ll = 1`` (the paper's
    formula, symmetric positive semi-definite); ``diagonal="reference"`` sets ``S_ll = 0``
    as the authors' public code does, which makes ``det`` change sign with L.
    Vectorised over pairs and samples (no Python loop); differentiable.
    """
    if diagonal not in ("paper", "reference"):
        raise ValueError(f"diagonal={diagonal!r}: expected 'paper' (unit diagonal) or 'reference' "
                         "(zero diagonal of the public code)")
    gamma = _check_gamma(gamma)
    with torch.autocast(device_type=features.device.type, enabled=False):
        f = _as_learner_batch(features, check_finite)
        L = f.shape[0]
        K = _KernelMean.apply(f.transpose(0, 1), resolve_gamma(f, gamma))    # (L, L)
        K = 0.5 * (K + K.transpose(0, 1))                                    # exact symmetry
        eye = torch.eye(L, dtype=torch.bool, device=f.device)
        S = K.masked_fill(eye, 1.0 if diagonal == "paper" else 0.0).to(f.dtype)
    return S


def reduce_similarity(S: torch.Tensor, reduction: Reduction = "det", diagonal: Diagonal = "paper") -> torch.Tensor:
    """Scalar diversity from a similarity matrix ``S`` ``(L, L)``.

    ``"det"``: ``det(S)``; with the paper's diagonal it is clamped into ``[0, 1]``
    (its exact range; float32 round-off can otherwise give ``-1e-8``).
    ``"logdet"``: ``logdet(S + LOGDET_JITTER * I)``, finite even for coinciding learners;
    only defined for the paper's diagonal (the reference matrix is indefinite).
    """
    if reduction == "det":
        with torch.autocast(device_type=S.device.type, enabled=False):
            D = torch.linalg.det(S)
        return D.clamp(0.0, 1.0) if diagonal == "paper" else D
    if reduction == "logdet":
        if diagonal != "paper":
            raise ValueError("reduction='logdet' needs diagonal='paper': the reference (zero-diagonal) "
                             "matrix is indefinite, so its log-determinant is undefined (NaN) for half the L")
        eye = torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
        with torch.autocast(device_type=S.device.type, enabled=False):
            return torch.logdet(S + LOGDET_JITTER * eye)
    raise ValueError(f"reduction={reduction!r}: expected 'det' or 'logdet'")


def diversity(features: torch.Tensor, gamma: float | str = 10.0, diagonal: Diagonal = "paper",
              reduction: Reduction = "det", *, check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Diversity of L learners: returns ``(D, S)``.

    ``features`` ``(L, N, *dims)``; ``S`` ``(L, L)`` from :func:`similarity_matrix`;
    ``D`` a scalar from :func:`reduce_similarity`. Maximise ``D`` (the training loss
    subtracts it). For the paper's diagonal ``0 <= D <= 1``; ``L = 2`` gives
    ``D = 1 - s^2``; identical learners give 0; ``L = 1`` gives 1 (a constant, the
    training engine adds no term for a single learner).
    """
    S = similarity_matrix(features, gamma, diagonal, check_finite=check_finite)
    return reduce_similarity(S, reduction, diagonal), S


# ---------------------------------------------------------------------------------------
# Configuration: which terms a model uses
# ---------------------------------------------------------------------------------------
#: Term names, in the paper's words. ESR uses ``spatial`` and ``channel`` (over branches);
#: MA-Net uses ``spatial`` and ``channel`` over patches and ``branch`` (local vs global).
TERMS = ("spatial", "channel", "branch")


@dataclass
class DiversityConfig:
    """Which diversity terms to add and how; part of a model's config.

    - ``terms``: subset of :data:`TERMS`; empty means no diversity (plain CE).
    - ``gamma``: RBF bandwidth (10 in every published experiment), or ``"median"``: calibrated
      on every batch by the median heuristic (:func:`resolve_gamma`).
    - ``diagonal``: ``"paper"`` (unit diagonal) or ``"reference"`` (public code's zero diagonal).
    - ``reduction``: ``"det"`` (paper) or ``"logdet"`` (jittered, safer gradients).
    - ``weight``: multiplier of each term in the loss (1 in the paper).
    - ``normalize``: ``"none"`` (paper) or ``"l2"``: unit-normalise each pooled
      vector before the similarity, which puts ``||a - b||^2`` in ``[0, 4]`` whatever
      the activations' scale.
    """

    terms: tuple[str, ...] = ()
    gamma: float | str = 10.0
    diagonal: Diagonal = "paper"
    reduction: Reduction = "det"
    weight: float = 1.0
    normalize: Literal["none", "l2"] = "none"

    def __post_init__(self):
        self.terms = tuple(self.terms)
        unknown = [t for t in self.terms if t not in TERMS]
        if unknown:
            raise ValueError(f"diversity terms {unknown} are unknown; expected a subset of {TERMS}")
        self.gamma = _check_gamma(self.gamma)
        if self.diagonal not in ("paper", "reference"):
            raise ValueError(f"diagonal={self.diagonal!r}: expected 'paper' or 'reference'")
        if self.reduction not in ("det", "logdet"):
            raise ValueError(f"reduction={self.reduction!r}: expected 'det' or 'logdet'")
        if self.reduction == "logdet" and self.diagonal == "reference":
            raise ValueError("reduction='logdet' needs diagonal='paper' (the reference matrix is indefinite)")
        if self.normalize not in ("none", "l2"):
            raise ValueError(f"normalize={self.normalize!r}: expected 'none' or 'l2'")

    @property
    def enabled(self) -> bool:
        return bool(self.terms)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["terms"] = list(self.terms)
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "DiversityConfig":
        return cls(**(d or {}))


def prepare(features: torch.Tensor, normalize: str = "none") -> torch.Tensor:
    """Flatten ``(L, N, *dims) -> (L, N, D)`` and apply the optional L2 normalisation."""
    f = features.reshape(features.shape[0], features.shape[1], -1)
    if normalize == "l2":
        f = torch.nn.functional.normalize(f.float(), dim=-1, eps=1e-8)
    return f


_GATHER: contextvars.ContextVar = contextvars.ContextVar("batch_gather", default=None)


@contextlib.contextmanager
def batch_gather(fn):
    """Within the block, learner features ``(L, n, ...)`` pass through ``fn`` before any diversity
    term or diagnostic sees them: distributed training gathers every rank's samples so that ``S``
    is the mean over the global batch (:meth:`fer_lab.distributed.Dist.gather_batch`)."""
    token = _GATHER.set(fn)
    try:
        yield
    finally:
        _GATHER.reset(token)


def gather_learners(learner_features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``learner_features`` through the active :func:`batch_gather` (unchanged outside one)."""
    fn = _GATHER.get()
    return learner_features if fn is None else {k: fn(v) for k, v in learner_features.items()}


def diversity_terms(learner_features: dict[str, torch.Tensor], config: DiversityConfig,
                    terms: tuple[str, ...] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Evaluate diversity terms: ``{term: (D, S)}``.

    ``learner_features`` maps a term name to its pooled features ``(L, N, *dims)``
    (a model decides what each term compares); ``terms`` defaults to ``config.terms``.
    Terms with a single learner are skipped (their determinant is a constant).
    """
    out = {}
    for term in config.terms if terms is None else terms:
        if term not in learner_features:
            raise KeyError(f"the model does not provide features for the {term!r} diversity term; "
                           f"it provides {sorted(learner_features)}")
        f = prepare(learner_features[term], config.normalize)
        if f.shape[0] < 2:
            continue
        out[term] = diversity(f, config.gamma, config.diagonal, config.reduction)
    return out


def term_diagnostics(learner_features: dict[str, torch.Tensor], config: DiversityConfig,
                     terms: tuple[str, ...]) -> dict[str, dict]:
    """Per term (with at least two learners): ``{"gamma": the bandwidth used, "kernel_args":
    (L(L-1)/2 * N,) the kernel arguments}`` (:func:`kernel_arguments`), without gradient, for the
    same features, normalisation and gamma as :func:`diversity_terms`."""
    out = {}
    for term in terms:
        if term not in learner_features:
            continue
        f = prepare(learner_features[term].detach(), config.normalize)
        if f.shape[0] < 2:
            continue
        g = resolve_gamma(f, config.gamma)
        out[term] = {"gamma": g, "kernel_args": kernel_arguments(f, g).flatten()}
    return out
