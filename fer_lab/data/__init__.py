"""Datasets: one entry point, ``build_dataset(name, root=..., split=..., **options)``.

Every dataset is a :class:`~fer_lab.data.base.FaceDataset`: uint8 faces, integer
labels in ``dataset.classes`` order, optional ``label_space`` mapping (e.g.
``"affectnet8"``), a transform preset from :mod:`fer_lab.data.transforms`.

Registered datasets and their split names (``train`` / ``val`` / ``test`` everywhere):

===========  ====================================================================
synthetic    procedural faces, no files (train / val / test)
ferplus      FER+ votes: FER2013Train/Valid/Test folders or fer2013.csv + fer2013new.csv
             (train = FER2013Train / Training, val = FER2013Valid / PublicTest,
             test = FER2013Test / PrivateTest)
fer2013      fer2013.csv (train = Training, val = PublicTest, test = PrivateTest)
rafdb        RAF-DB basic (train, test)
affectnet    AffectNet manual part (train = training.csv, test = validation.csv)
folder       root/<class>/*.jpg (train) or root/<split>/<class>/*.jpg
===========  ====================================================================

Bad input raises :class:`DatasetError` (a ``ValueError``) naming the file, line,
column or expected layout; ``on_error="skip"`` leaves bad items out and lists them in
``describe()``. ``python -m fer_lab data check <name> <root>`` reports every problem.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .base import FaceDataset, stack_items
from .errors import DatasetError
from .labels import AFFECTNET7, AFFECTNET8, LABEL_SPACES, label_map
from .sampling import balanced_subset
from .transforms import build_transform
from ..utils import Registry

__all__ = ["FaceDataset", "stack_items", "DatasetError", "AFFECTNET7", "AFFECTNET8", "LABEL_SPACES", "label_map",
           "balanced_subset", "build_transform", "build_dataset", "register_dataset", "list_datasets",
           "dataset_splits", "dataset_entry", "DatasetEntry"]

@dataclass(frozen=True)
class DatasetEntry:
    """How to build a registered dataset.

    ``splits``: every split it can have; ``available(root, **options)`` (optional) the ones
    present under a root; ``size_option``: the constructor option that fixes the decoded
    image size (synthetic renders at ``size``, AffectNet caches crops at ``image_size``),
    which the training engine sets to the model's input size.
    """

    builder: Callable[..., FaceDataset]
    splits: tuple[str, ...]
    needs_root: bool = True
    available: Callable[..., tuple[str, ...]] | None = None
    size_option: str | None = None


_DATASETS = Registry("dataset")


def register_dataset(name: str, builder: Callable[..., FaceDataset], splits: tuple[str, ...],
                     needs_root: bool = True, available: Callable[..., tuple[str, ...]] | None = None,
                     size_option: str | None = None) -> None:
    """Register ``builder(root=..., split=..., transform=..., label_space=..., **options)`` (see
    :class:`DatasetEntry`)."""
    _DATASETS.add(name, DatasetEntry(builder, tuple(splits), needs_root, available, size_option))


def list_datasets() -> list[str]:
    return _DATASETS.names()


def dataset_entry(name: str) -> DatasetEntry:
    """The registry entry of ``name`` (clear error listing the known names)."""
    return _DATASETS.get(name)


def dataset_splits(name: str, root=None, **options) -> tuple[str, ...]:
    """Split names the dataset ``name`` offers (e.g. ``("train", "val", "test")``).

    With ``root``, only the splits present there (a FER+ copy without ``FER2013Test``
    gives ``("train", "val")``; a flat image folder gives ``("train",)``); ``options``
    are the dataset options that affect this (e.g. ``layout``).
    """
    entry = dataset_entry(name)
    if root is None or entry.available is None:
        return entry.splits
    keys = ("layout",)
    return tuple(s for s in entry.available(root, **{k: v for k, v in options.items() if k in keys})
                 if s in entry.splits)


def build_dataset(name: str, root=None, split: str = "train", transform=None, label_space: str | None = None,
                  **options) -> FaceDataset:
    """Build split ``split`` of dataset ``name`` (files under ``root`` where the dataset has files).

    ``transform`` is applied to each uint8 ``(C, H, W)`` image; ``label_space`` re-expresses
    labels in a shared class order; other ``options`` go to the dataset's constructor
    (e.g. ``cache``, ``image_size``, ``on_error``, ``label_mode`` for FER+).
    """
    entry = dataset_entry(name)
    if split not in entry.splits:
        raise ValueError(f"{name}: unknown split {split!r}; expected one of {entry.splits}")
    if entry.needs_root and root is None:
        raise ValueError(f"{name}: a data root is needed (root=...), the directory holding the dataset's files")
    kwargs = dict(split=split, transform=transform, label_space=label_space, **options)
    if entry.needs_root:
        kwargs["root"] = root
    try:
        return entry.builder(**kwargs)
    except TypeError as err:
        if "unexpected keyword argument" in str(err):
            raise ValueError(f"{name}: {err} (unknown dataset option; see the dataset class's docstring)") from None
        raise


def _lazy(module: str, attr: str) -> Callable:
    """A callable importing ``fer_lab.data.<module>.<attr>`` on first use (keeps imports light)."""
    def call(*args, **kwargs):
        from importlib import import_module
        return getattr(import_module(f"{__name__}.{module}"), attr)(*args, **kwargs)
    return call


register_dataset("synthetic", _lazy("synthetic", "SyntheticFaces"), ("train", "val", "test"), needs_root=False,
                 size_option="size")
register_dataset("ferplus", _lazy("ferplus", "FERPlus"), ("train", "val", "test"),
                 available=_lazy("ferplus", "ferplus_splits"))
register_dataset("fer2013", _lazy("fer2013", "FER2013"), ("train", "val", "test"))
register_dataset("rafdb", _lazy("rafdb", "RAFDB"), ("train", "test"))
register_dataset("affectnet", _lazy("affectnet", "AffectNet"), ("train", "test"),
                 available=_lazy("affectnet", "affectnet_splits"), size_option="image_size")
register_dataset("folder", _lazy("folder", "ImageFolder"), ("train", "val", "test"),
                 available=_lazy("folder", "folder_splits"))
