"""The dataset protocol every fer_lab dataset follows.

A dataset is an indexable collection of uint8 face images with integer labels in
``dataset.classes`` order. Subclasses implement ``__len__``, ``load_image`` and set
``targets``; this base applies the transform, maps labels into a common label space,
and describes itself (per-class counts and a fingerprint) for the run's
``dataset.json``. It is not a loader of any particular format.
"""
from __future__ import annotations

import abc
import hashlib
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .labels import resolve_space


def to_chw_uint8(image: np.ndarray) -> torch.Tensor:
    """``(H, W)`` or ``(H, W, C)`` uint8 array -> ``(C, H, W)`` uint8 tensor (no copy when possible)."""
    if image.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise ValueError(f"expected an image of shape (H, W) or (H, W, C), got {image.shape}")
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def stack_items(dataset, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``dataset[i]`` for each of ``indices`` as one batch: ``(images (B, C, H, W), targets (B,),
    masks (B, R, H, W) or None)``; a soft target (class probabilities) counts as its argmax, and
    masks come from datasets that return them (synthetic faces with ``return_masks=True``)."""
    items = [dataset[int(i)] for i in indices]
    if not items:
        raise ValueError("stack_items: no indices given")
    x = torch.stack([it[0] for it in items])
    y = torch.as_tensor([int(it[1]) if not torch.is_tensor(it[1]) or it[1].dim() == 0 else int(it[1].argmax())
                         for it in items])
    masks = torch.stack([torch.as_tensor(it[2]) for it in items]) if len(items[0]) > 2 else None
    return x, y, masks


class FaceDataset(Dataset, abc.ABC):
    """Base class: uint8 faces, integer labels, optional transform and label space.

    Subclasses set ``native_classes`` (their own class order) and
    ``self.native_targets`` (int64 array, one label per item) and implement
    :meth:`load_image`. ``label_space`` (e.g. ``"affectnet8"``) re-expresses labels
    in a shared order; items whose class the space lacks are rejected at construction.

    ``__getitem__`` returns ``(image, label)``: ``image`` is the transform's output
    (default: float tensor ``(C, H, W)`` in ``[0, 1]``), ``label`` an ``int``.
    """

    name: str = "dataset"
    native_classes: tuple[str, ...] = ()

    def __init__(self, transform: Callable | None = None, label_space: str | None = None):
        self.transform = transform
        self.label_space = label_space
        self._native_targets: np.ndarray = np.zeros(0, dtype=np.int64)
        self._targets: np.ndarray | None = None

    # ---- to implement -------------------------------------------------------------
    @abc.abstractmethod
    def load_image(self, index: int) -> np.ndarray:
        """The item's face as a uint8 array ``(H, W)`` (grayscale) or ``(H, W, 3)`` (RGB)."""

    # ---- provided -----------------------------------------------------------------
    @property
    def native_targets(self) -> np.ndarray:
        """int64 label of every item in :attr:`native_classes` order."""
        return self._native_targets

    @native_targets.setter
    def native_targets(self, value) -> None:
        self._native_targets = np.asarray(value, dtype=np.int64)
        self._targets = None

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names in the order labels are returned (the label space's, when one is set)."""
        return resolve_space(self.label_space, self.native_classes)[0]

    @property
    def targets(self) -> np.ndarray:
        """int64 label of every item, in :attr:`classes` order."""
        if self._targets is None:
            _, mapping = resolve_space(self.label_space, self.native_classes)
            if mapping is None:
                self._targets = self._native_targets
            else:
                mapped = mapping[self._native_targets]
                if (mapped < 0).any():
                    missing = sorted({self.native_classes[t] for t in self._native_targets[mapped < 0]})
                    raise ValueError(
                        f"{self.name}: classes {missing} do not exist in label space {self.label_space!r}")
                self._targets = mapped
        return self._targets

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self._native_targets)

    def check_index(self, index) -> int:
        """``index`` as a non-negative int in range (negative indices count from the end)."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        i = int(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        return i

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = to_chw_uint8(self.load_image(index))
        image = self.transform(image) if self.transform is not None else image.float().div_(255)
        return image, int(self.targets[index])

    def item_ids(self) -> list[str]:
        """Stable identifiers of the items (file names where there are files); used in the fingerprint."""
        return [str(i) for i in range(len(self))]

    def class_counts(self, indices=None) -> dict[str, int]:
        """Items per class (of the items ``indices`` when given)."""
        t = self.targets if indices is None else self.targets[np.asarray(indices, dtype=np.int64)]
        counts = np.bincount(t, minlength=self.num_classes)
        return {c: int(n) for c, n in zip(self.classes, counts)}

    def fingerprint(self, indices=None) -> str:
        """sha256 over item ids and labels (of ``indices`` when given): equal fingerprints,
        same data."""
        ids, targets = self.item_ids(), self.targets
        h = hashlib.sha256()
        for i in (range(len(self)) if indices is None else indices):
            h.update(f"{ids[int(i)]}\t{int(targets[int(i)])}\n".encode())
        return h.hexdigest()

    def describe(self, indices=None) -> dict[str, Any]:
        """JSON-able summary for ``dataset.json``: name, size, classes, per-class counts,
        fingerprint (of the subset ``indices`` when given)."""
        return {
            "name": self.name,
            "size": len(self) if indices is None else len(indices),
            "classes": list(self.classes),
            "label_space": self.label_space,
            "class_counts": self.class_counts(indices),
            "fingerprint": self.fingerprint(indices),
        }
