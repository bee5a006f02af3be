"""Label spaces and the mapping between them.

Every dataset keeps its own class order (``dataset.classes``); ESR works in the
AffectNet 8-class order, so each dataset can be mapped into ``affectnet8`` (or any
other space here) by class name. This file holds names only, no data.
"""
from __future__ import annotations

import numpy as np

#: AffectNet order; ESR and the paper's 8-class models use it (SPEC section 5).
AFFECTNET8: tuple[str, ...] = ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt")
#: The 7 basic expressions in AffectNet order (no contempt).
AFFECTNET7: tuple[str, ...] = AFFECTNET8[:7]

LABEL_SPACES: dict[str, tuple[str, ...]] = {"affectnet8": AFFECTNET8, "affectnet7": AFFECTNET7}

# Dataset spellings -> canonical names used above.
_SYNONYMS = {
    "happiness": "happy", "sadness": "sad", "angry": "anger", "surprised": "surprise",
    "fearful": "fear", "disgusted": "disgust", "neutrality": "neutral",
}


def canonical(name: str) -> str:
    """Canonical class name: lower case, dataset synonyms resolved (``happiness`` -> ``happy``)."""
    key = name.strip().lower()
    return _SYNONYMS.get(key, key)


def label_map(source: tuple[str, ...] | list[str], target: str | tuple[str, ...] | list[str]) -> np.ndarray:
    """Index map from ``source`` class order into ``target`` (a space name or a class tuple).

    Returns an int64 array ``m`` with ``m[source_index] = target_index``; a source class
    that the target space lacks maps to -1 (callers drop or reject those items).
    """
    names = LABEL_SPACES[target] if isinstance(target, str) else tuple(target)
    if isinstance(target, str) and target not in LABEL_SPACES:
        raise ValueError(f"unknown label space {target!r}; expected one of {sorted(LABEL_SPACES)}")
    index = {canonical(n): i for i, n in enumerate(names)}
    return np.array([index.get(canonical(n), -1) for n in source], dtype=np.int64)


def resolve_space(label_space: str | None, own: tuple[str, ...]) -> tuple[tuple[str, ...], np.ndarray | None]:
    """Classes and index map for a dataset whose native order is ``own``.

    ``label_space=None`` keeps the native order (map ``None``).
    """
    if label_space is None:
        return tuple(own), None
    if label_space not in LABEL_SPACES:
        raise ValueError(f"label_space={label_space!r} is not known; expected None or one of {sorted(LABEL_SPACES)}")
    return LABEL_SPACES[label_space], label_map(own, label_space)
