"""The datasets of a run: train / val / test with the configured transforms, a stratified
hold-out of train when the dataset has no validation split, and their description
(``dataset.json``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from torch.utils.data import Subset

from . import build_dataset, build_transform, dataset_entry, dataset_splits
from ..models import model_spec
from ..utils import derive_seed

if TYPE_CHECKING:
    from ..config import TrainConfig


@dataclass
class DataBundle:
    train: Any
    val: Any
    test: Any
    describe: dict
    train_targets: np.ndarray
    classes: tuple


def holdout_split(targets: np.ndarray, fraction: float, seed) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of indices into ``(keep, held_out)`` with ``fraction`` of each class held out
    (rounded, but at least one item of every class that has two or more)."""
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == c))
        n = max(int(round(len(idx) * fraction)), 1 if len(idx) >= 2 else 0)
        held.append(idx[:n])
        keep.append(idx[n:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


class HoldOut(Subset):
    """The hold-out of train (a ``Subset``) that keeps the dataset's ``targets`` and ``classes``."""

    @property
    def targets(self) -> np.ndarray:
        return np.asarray(self.dataset.targets)[np.asarray(self.indices)]

    @property
    def classes(self):
        return self.dataset.classes


def dataset_options(cfg: "TrainConfig", image_size: int) -> dict:
    """The dataset options a run builds every split with: its ``data_options``, the input size
    for datasets that decode at a size (synthetic faces, pre-cropped AffectNet) and the cache."""
    options = dict(cfg.data.options)
    size_option = dataset_entry(cfg.data.dataset).size_option
    if size_option:
        options.setdefault(size_option, image_size)
    if cfg.runtime.cache_dir:
        options.setdefault("cache", cfg.runtime.cache_dir)
    return options


def _holdout(cfg: "TrainConfig", targets) -> tuple[np.ndarray, np.ndarray]:
    return holdout_split(targets, cfg.data.val_fraction, derive_seed("holdout", cfg.data.dataset))


def eval_dataset(cfg: "TrainConfig", image_size: int, label_space: str | None, role: str = "test", **options):
    """One split of a run with the evaluation transform, exactly as :func:`build_data` made it:
    ``role`` ``"test"`` (the reported split), ``"val"`` (the model-selection split: the dataset's
    ``val``, or the stratified hold-out of train when the dataset lacks one of ``val``/``test``)
    or ``"train"`` (every training image). ``options`` add or override dataset options (e.g.
    ``return_masks=True`` for synthetic faces)."""
    if role not in ("train", "val", "test"):
        raise ValueError(f"role={role!r}: expected 'train', 'val' (model selection) or 'test' (the reported split)")
    opts = {**dataset_options(cfg, image_size), **options}
    splits = dataset_splits(cfg.data.dataset, root=cfg.data.root, **opts)
    tf = build_transform("eval", image_size, normalize=cfg.data.image_normalize)

    def make(split):
        return build_dataset(cfg.data.dataset, root=cfg.data.root, split=split, transform=tf, label_space=label_space, **opts)

    if role == "train" or ("val" in splits and "test" in splits):
        return make(role)
    if role == "val":
        full = make("train")
        return HoldOut(full, _holdout(cfg, full.targets)[1])
    reported = "test" if "test" in splits else ("val" if "val" in splits else None)
    if reported is None:
        raise ValueError(f"{cfg.data.dataset}: no split to report (the dataset has neither 'val' nor 'test')")
    return make(reported)


def build_data(cfg: "TrainConfig", image_size: int, label_space: str | None) -> DataBundle:
    """Train/val/test datasets with the configured transforms, and their description.

    Splits: the dataset's own ``val``/``test`` where it has them; without ``val``, a
    stratified ``val_fraction`` of train is held out for model selection; without
    ``test``, the dataset's ``val`` split is the reported one.
    """
    spec_data = model_spec(cfg.model).data
    train_tf = build_transform(cfg.data.train_transform or spec_data.get("train_transform", "esr_train"), image_size,
                               normalize=cfg.data.image_normalize, random_erasing=cfg.data.random_erasing)
    options = dataset_options(cfg, image_size)
    splits = dataset_splits(cfg.data.dataset, root=cfg.data.root, **options)
    train_full = build_dataset(cfg.data.dataset, root=cfg.data.root, split="train", transform=train_tf,
                               label_space=label_space, **options)
    train, train_targets = train_full, train_full.targets
    val = eval_dataset(cfg, image_size, label_space, "val")
    test = eval_dataset(cfg, image_size, label_space, "test") if {"val", "test"} & set(splits) else None
    if "val" in splits and "test" in splits:
        roles = {"train": "train", "val": "val", "test": "test"}
    else:
        # select on a stratified hold-out of train; report the dataset's own evaluation split
        keep, _ = _holdout(cfg, train_full.targets)
        train, train_targets = Subset(train_full, keep), train_full.targets[keep]
        reported = "test" if "test" in splits else ("val" if "val" in splits else None)
        roles = {"train": "train minus the hold-out", "val": f"{cfg.data.val_fraction:g} of train, stratified",
                 "test": reported}

    if len(val) == 0:
        raise ValueError(f"{cfg.data.dataset}: the validation split ({roles['val']}) is empty; model selection needs "
                         "at least one validation image (more training images, or a larger val_fraction)")

    def info(ds):
        if isinstance(ds, Subset):
            return ds.dataset.describe(ds.indices)
        return None if ds is None else ds.describe()

    describe = {"dataset": cfg.data.dataset, "root": cfg.data.root, "label_space": label_space,
                "image_size": image_size, "roles": roles, "options": {k: str(v) for k, v in options.items()},
                "splits": {"train": info(train), "val": info(val), "test": info(test)}}
    return DataBundle(train, val, test, describe, np.asarray(train_targets), tuple(train_full.classes))
