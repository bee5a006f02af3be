"""Datasets: one entry point, ``build_dataset(name, root=..., split=..., **options)``.

Every dataset is a :class:`~fer_lab.data.base.FaceDataset`: uint8 faces, integer
labels in ``dataset.classes`` order, optional ``label_space`` mapping (e.g.
``"affectnet8"``), a transform preset from :mod:`fer_lab.data.transforms`.
"""
from __future__ import annotations

from typing import Callable

from .base import FaceDataset
from .labels import AFFECTNET7, AFFECTNET8, LABEL_SPACES, label_map
from .sampling import balanced_subset
from .transforms import build_transform

__all__ = ["FaceDataset", "AFFECTNET7", "AFFECTNET8", "LABEL_SPACES", "label_map", "balanced_subset",
           "build_transform", "build_dataset", "register_dataset", "list_datasets", "dataset_splits"]

_DATASETS: dict[str, tuple[Callable[..., FaceDataset], tuple[str, ...], bool]] = {}


def register_dataset(name: str, builder: Callable[..., FaceDataset], splits: tuple[str, ...],
                     needs_root: bool = True) -> None:
    """Register ``builder(root=..., split=..., transform=..., label_space=..., **options)``."""
    _DATASETS[name] = (builder, tuple(splits), needs_root)


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def dataset_splits(name: str) -> tuple[str, ...]:
    """Split names the dataset ``name`` offers (e.g. ``("train", "val", "test")``)."""
    return _entry(name)[1]


def _entry(name: str):
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(list_datasets())}")
    return _DATASETS[name]


def build_dataset(name: str, root=None, split: str = "train", transform=None, label_space: str | None = None,
                  **options) -> FaceDataset:
    """Build split ``split`` of dataset ``name`` (files under ``root`` where the dataset has files).

    ``transform`` is applied to each uint8 ``(C, H, W)`` image; ``label_space`` re-expresses
    labels in a shared class order; other ``options`` go to the dataset's constructor.
    """
    builder, splits, needs_root = _entry(name)
    if split not in splits:
        raise ValueError(f"{name}: unknown split {split!r}; expected one of {splits}")
    if needs_root and root is None:
        raise ValueError(f"{name}: a data root is needed (root=...), the directory holding the dataset's files")
    kwargs = dict(split=split, transform=transform, label_space=label_space, **options)
    if needs_root:
        kwargs["root"] = root
    return builder(**kwargs)


def _synthetic(**kwargs) -> FaceDataset:
    from .synthetic import SyntheticFaces
    return SyntheticFaces(**kwargs)


register_dataset("synthetic", _synthetic, ("train", "val", "test"), needs_root=False)
