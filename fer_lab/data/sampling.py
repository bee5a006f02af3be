"""Index sampling for the ESR protocol: class-balanced subsets redrawn per stage."""
from __future__ import annotations

import numpy as np


def balanced_subset(targets: np.ndarray, per_class: int | None, seed: int | tuple) -> np.ndarray:
    """Indices of a class-balanced random subset: at most ``per_class`` items of each class.

    ``targets`` ``(N,)`` int labels; ``seed`` an int or tuple (e.g. ``(run_seed, stage)``),
    so each ESR stage draws a fresh, reproducible subset. Classes with fewer items
    contribute all of them. ``per_class=None`` returns every index. Returned sorted.
    """
    targets = np.asarray(targets)
    if per_class is None:
        return np.arange(len(targets))
    if int(per_class) < 1:
        raise ValueError(f"per_class={per_class!r}: expected an int >= 1 or None")
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        if len(idx) > per_class:
            idx = rng.choice(idx, size=int(per_class), replace=False)
        chosen.append(idx)
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
