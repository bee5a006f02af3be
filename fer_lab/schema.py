"""The names of a run's records, defined and parsed in one place.

A run directory holds ``history.csv`` (one row per epoch, columns ``<phase>_<key>``),
``metrics.json`` (``val``/``test`` dicts of ``<key>``) and ``similarity.npz`` (arrays
``<phase>_S_<term>``). The training engine writes these names through the functions here and
the figures, the batch summary, the reports and the notebooks read them through the same
functions, so a renamed key is renamed everywhere.

Keys (``t`` a term's short name, :data:`TERM_ABBREV`; ``h`` a head of ``model.heads``):

- ``loss``, ``ce``, ``ce_<h>``, ``acc_<h>``, ``time_s``;
- ``D_<t>`` (determinant), ``S_offdiag_<t>`` / ``S_offdiag_max_<t>`` (mean / largest
  off-diagonal of the batch-averaged similarity matrix), ``karg_<t>_q<NN>`` (quantiles of the
  kernel arguments, :data:`QUANTILES`), ``gamma_<t>``;
- ``gradnorm_<part>`` (``ce``, ``total``, ``D_<t>``) and ``gradshare_D_<t>`` (training only).

Heads named ``<kind>_<l>`` (``branch_3``, ``learner_1``, ``patch_2``; ``l`` from 1) are one
learner's; the others (``vote``, ``ensemble``, ``fused``, ``local``, ``global``) are decisions
of the model or of its parts.
"""
from __future__ import annotations

import re
from typing import Iterable

#: Short names of the diversity terms in record keys (``D_sp``, ``S_ch``, ...).
TERM_ABBREV = {"spatial": "sp", "channel": "ch", "branch": "b"}
#: Quantiles of the kernel arguments recorded per term.
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
PHASES = ("train", "val", "test")

_LEARNER_HEAD = re.compile(r"^[a-z]+_(\d+)$")


def abbrev(term: str) -> str:
    """``"spatial"`` -> ``"sp"``; a short name is returned as it is."""
    return TERM_ABBREV.get(term, term)


def col(phase: str, key: str) -> str:
    """A history column: ``col("val", acc("vote"))`` -> ``"val_acc_vote"``."""
    return f"{phase}_{key}"


def _named(prefix: str, of_term: bool):
    """The key maker ``name -> f"{prefix}_{name}"`` (a term's name shortened, :func:`abbrev`)."""
    def key(name: str) -> str:
        return f"{prefix}_{abbrev(name) if of_term else name}"
    key.__name__ = key.__qualname__ = prefix
    key.__doc__ = f"``{prefix}_<{'term' if of_term else 'name'}>``"
    return key


acc = _named("acc", False)                    #: a head's accuracy
ce = _named("ce", False)                      #: a head's cross-entropy
gradnorm = _named("gradnorm", False)          #: gradient norm of ``ce``, ``total`` or ``D_<t>``
D = _named("D", True)                         #: a term's determinant
S = _named("S", True)                         #: similarity array (``similarity.npz``: ``col(phase, S(term))``)
S_offdiag = _named("S_offdiag", True)         #: mean off-diagonal of S
S_offdiag_max = _named("S_offdiag_max", True)  #: largest off-diagonal of S
gamma = _named("gamma", True)                 #: the bandwidth used
gradshare = _named("gradshare_D", True)       #: a term's share of the loss's gradient


def karg(term: str, q: float) -> str:
    return f"karg_{abbrev(term)}_q{round(q * 100):02d}"


def _suffixes(columns: Iterable[str], prefix: str) -> list[str]:
    return [c[len(prefix):] for c in columns if c.startswith(prefix)]


def _prefix(phase: str | None, key: str) -> str:
    """``key`` of ``phase``'s history columns, or of one phase's own dict (``phase=None``: the keys of
    ``metrics.json``'s ``val``/``test`` and of an epoch's scalars carry no phase)."""
    return key if phase is None else col(phase, key)


def terms(columns: Iterable[str], phase: str | None = "train") -> list[str]:
    """Short names of the terms with a determinant column in ``phase`` (``["sp", "ch"]``), in
    column order."""
    return _suffixes(columns, _prefix(phase, "D_"))


def similarity_terms(keys: Iterable[str], phase: str | None = "train") -> list[str]:
    """Short names of the terms with a similarity array in ``phase`` (keys of ``similarity.npz``)."""
    return [t for t in _suffixes(keys, _prefix(phase, "S_")) if not t.startswith("offdiag_")]


def gradshare_terms(keys: Iterable[str], phase: str | None = None) -> list[str]:
    """Short names of the terms with a gradient share among ``keys`` (a phase's scalars, or
    history columns of ``phase``), sorted."""
    return sorted(_suffixes(keys, _prefix(phase, gradshare(""))))


def diagnosed_terms(columns: Iterable[str], phase: str | None = "train") -> list[str]:
    """Short names of the terms with kernel-argument quantiles in ``phase``, sorted."""
    return sorted({s.split("_")[0] for s in _suffixes(columns, _prefix(phase, "karg_"))})


def heads(columns: Iterable[str], phase: str | None) -> list[str]:
    """Heads with an accuracy column in ``phase``, in column order."""
    return _suffixes(columns, _prefix(phase, "acc_"))


def learner_index(head: str) -> int | None:
    """``"branch_3"`` -> 3 (a learner's head); ``None`` for a decision head."""
    m = _LEARNER_HEAD.match(head)
    return int(m.group(1)) if m else None


def learner_heads(columns: Iterable[str], phase: str | None) -> list[str]:
    """One learner's heads with an accuracy column in ``phase``, by learner number."""
    return sorted((h for h in heads(columns, phase) if learner_index(h) is not None), key=learner_index)


def decision_heads(columns: Iterable[str], phase: str | None) -> list[str]:
    """Heads that are not one learner's (``vote``, ``ensemble``, ``fused``, ...), in column order."""
    return [h for h in heads(columns, phase) if learner_index(h) is None]


def gradnorm_parts(columns: Iterable[str], phase: str | None = "train") -> list[str]:
    """The parts with a gradient norm in ``phase`` (``ce``, ``D_sp``, ``total``), in column order."""
    return _suffixes(columns, _prefix(phase, gradnorm("")))


def has_diversity(columns: Iterable[str], phase: str | None = "train") -> bool:
    return bool(terms(columns, phase))
