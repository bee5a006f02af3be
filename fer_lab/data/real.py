"""Shared machinery of the loaders that read real datasets from disk.

:class:`RealFaceDataset` sits between :class:`~fer_lab.data.base.FaceDataset` and the
format readers (``ferplus``, ``fer2013``, ``rafdb``, ``affectnet``, ``folder``). A reader
only parses its label files into a list of :class:`Candidate` items (one per image it
might use, each with its native label, the ``file:line`` that defines it, and an
exclusion reason when the dataset's own label rule leaves it out) and says how one
image is decoded. This class then, in one place for every dataset:

- maps labels into ``label_space`` (items whose class the space lacks: a clear error,
  or dropped and counted with ``drop_unmapped=True``);
- validates images (``verify``) or caches decoded faces (``cache``: ``"memory"`` or a
  directory for a memory-mapped ``.npy``, see :mod:`fer_lab.data.cache`);
- applies ``on_error``: ``"raise"`` (default) fails before training starts on the first
  bad label/row (and on bad images found by a cache build or ``verify``), or lazily,
  naming the file, when an image is read; ``"skip"`` decodes everything at
  construction and leaves bad items out, each listed with its reason;
- describes itself for ``dataset.json``: counts per class, the item-list
  fingerprint, label mode, image size, every excluded / dropped / skipped item.

Nothing here knows a file format; nothing is dropped without being recorded.
"""
from __future__ import annotations

import hashlib
import logging
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .base import FaceDataset, to_chw_uint8
from .cache import cache_path, file_signature, ids_digest, open_cache, write_cache
from .errors import DatasetError, check_on_error, read_image
from .labels import resolve_space

logger = logging.getLogger(__name__)

#: Label modes a dataset may offer (FER+ offers all three; the others are ``hard``).
FERPLUS_LABEL_MODES = ("majority", "probability", "plurality")


@dataclass
class Candidate:
    """One item a reader found: ``id`` (stable, e.g. a relative file name), native
    ``label`` (class index; -1 when there is none), ``where`` (``file:line`` of the
    defining row), the image ``file`` (None when pixels come from a CSV), an optional
    face ``box`` ``(x, y, w, h)`` with x the column, ``exclude`` (the label rule's
    reason for leaving the item out, or None) and ``row`` (0-based CSV data row, for
    readers whose pixels live in a CSV)."""

    id: str
    label: int
    where: str
    file: Path | None = None
    box: tuple[int, int, int, int] | None = None
    exclude: str | None = None
    row: int | None = None


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


class RealFaceDataset(FaceDataset):
    """Base of the file-based datasets (see the module docstring).

    Common options (every loader accepts them):
        root: the dataset directory.
        split: ``"train"``, ``"val"`` or ``"test"`` (each loader maps its own split names).
        transform, label_space: see :class:`FaceDataset`.
        cache: None (decode on every read), ``"memory"`` (decode once into RAM) or a
            directory: decoded faces go to one memory-mapped uint8 ``.npy`` per split,
            keyed by dataset, root, split, image size and pixel options, built once.
        image_size: None keeps native size (a cache then needs every image the same
            size); an int resizes every face to ``(image_size, image_size)``.
        on_error: ``"raise"`` or ``"skip"`` (bad items left out and listed in
            :meth:`describe`).
        verify: decode every image at construction (default: only with ``on_error="skip"``;
            a cache build always decodes everything).
        drop_unmapped: drop items whose class ``label_space`` lacks instead of failing.
        cache_workers: processes used to build a cache (0 = in this process).
    """

    name = "real"
    #: PIL mode of the stored faces: ``"L"`` -> ``(H, W)``, ``"RGB"`` -> ``(H, W, 3)``.
    color: str = "RGB"

    def __init__(self, root, split: str, transform: Callable | None = None, label_space: str | None = None, *,
                 cache: str | os.PathLike | None = None, image_size: int | None = None, on_error: str = "raise",
                 verify: bool | None = None, drop_unmapped: bool = False, cache_workers: int = 0):
        super().__init__(transform=transform, label_space=label_space)
        resolve_space(label_space, self.native_classes or ("neutral",))  # reject unknown spaces now
        check_on_error(on_error)
        if root is None:
            raise DatasetError(f"{self.name}: a data root is needed; expected {self.layout_help()}")
        if image_size is not None and (not _is_int(image_size) or image_size < 8):
            raise ValueError(f"image_size={image_size!r}: expected None (native size) or an int >= 8")
        if cache is not None and not isinstance(cache, (str, os.PathLike)):
            raise ValueError(f"cache={cache!r}: expected None, 'memory' or a directory")
        if verify is not None and not isinstance(verify, bool):
            raise ValueError(f"verify={verify!r}: expected None, True or False")
        if not _is_int(cache_workers) or cache_workers < 0:
            raise ValueError(f"cache_workers={cache_workers!r}: expected an int >= 0")
        if transform is not None and not callable(transform):
            raise ValueError(f"transform={transform!r}: expected None or a callable")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DatasetError(f"{self.name}: data root {self.root} does not exist or is not a directory; "
                               f"expected {self.layout_help()}")
        self.split = split
        self.image_size = None if image_size is None else int(image_size)
        self.cache = cache
        self.on_error = check_on_error(on_error)
        self.verify = (on_error == "skip") if verify is None else verify
        self.drop_unmapped = bool(drop_unmapped)
        self.cache_workers = int(cache_workers)
        self.label_mode = "hard"
        self.layout = ""
        #: where the split comes from, e.g. ``"FER2013Valid/label.csv"`` or ``"fer2013.csv Usage=PublicTest"``
        self.split_source = ""
        #: items the dataset's own label rule leaves out: reason -> count
        self.excluded: dict[str, int] = {}
        #: items dropped because ``label_space`` lacks their class: class -> count
        self.dropped_unmapped: dict[str, int] = {}
        #: items left out by ``on_error="skip"``: ``{"item", "where", "reason"}`` each
        self.skipped: list[dict[str, Any]] = []
        #: oddities that are not errors (e.g. a file name used by two label rows)
        self.warnings: list[str] = []
        self.cache_file: Path | None = None
        self._cands: list[Candidate] = []
        self._index = np.zeros(0, dtype=np.int64)
        self._soft_native: np.ndarray | None = None
        self._soft: np.ndarray | None = None
        self._store: np.ndarray | None = None
        self._store_shape: tuple[int, ...] | None = None
        self._store_first = "the first image"

    # ---- to implement / override ----------------------------------------------------
    @classmethod
    def layout_help(cls) -> str:
        """The on-disk layout this loader expects, in words (used in error messages)."""
        return "the dataset's files"

    def pixel_options(self) -> dict[str, Any]:
        """Options that change the pixels (besides image size and colour); part of cache keys."""
        return {}

    def source_files(self) -> list[Path]:
        """Label/CSV files that define the split (their signatures key caches of CSV pixels)."""
        return []

    def _decode(self, c: int) -> np.ndarray:
        """Candidate ``c``'s face as uint8 ``(H, W)`` / ``(H, W, 3)``; raises :class:`DatasetError`."""
        cand = self._cands[c]
        return read_image(cand.file, self.color, box=cand.box, size=self.image_size)

    # ---- bookkeeping helpers for readers --------------------------------------------
    def _problem(self, err: DatasetError) -> None:
        """Raise ``err`` (``on_error="raise"``) or record it as a skipped item."""
        if self.on_error == "raise":
            raise err
        self.skipped.append({"item": err.item, "where": err.where, "reason": str(err)})
        logger.warning("%s %s: skipping %s", self.name, self.split, err)

    def _exclude(self, reason: str, n: int = 1) -> None:
        self.excluded[reason] = self.excluded.get(reason, 0) + n

    def _check_files_exist(self, candidates: list[Candidate]) -> list[Candidate]:
        """Fail fast (or skip) on label rows whose image file is missing."""
        kept = []
        missing = []
        for cand in candidates:
            if cand.file is not None and not cand.file.is_file():
                missing.append(cand)
            else:
                kept.append(cand)
        if missing and self.on_error == "raise":
            first = "; ".join(f"{m.file} (row {m.where})" for m in missing[:5])
            raise DatasetError(f"{self.name} {self.split}: {len(missing)} image file(s) listed in the labels are "
                               f"missing, e.g. {first}; expected {self.layout_help()}",
                               item=missing[0].id, where=missing[0].where)
        for m in missing:
            self._problem(DatasetError(f"{m.file}: image file not found (listed at {m.where})", item=m.id,
                                       where=m.where))
        return kept

    # ---- the common finish ------------------------------------------------------------
    def _finalize(self, candidates: list[Candidate], *, soft: np.ndarray | None = None,
                  images: Callable[[], tuple[np.ndarray, dict[int, str]]] | None = None) -> None:
        """Select, map, validate and cache; readers call this last.

        ``soft``: ``(len(candidates), K_native)`` vote distributions (probability mode).
        ``images``: for readers whose pixels live in a CSV, a callable returning
        ``(pixels, failures)``: every candidate's face ``(len(candidates), H, W[, 3])`` uint8
        and ``{candidate: reason}`` for rows whose pixels are bad; called only when no
        cache holds them already.
        """
        self._cands = candidates
        n = len(candidates)
        labels = np.array([c.label for c in candidates], dtype=np.int64)
        keep = np.array([c.exclude is None for c in candidates], dtype=bool)
        if not keep.any():
            raise DatasetError(f"{self.name}: split {self.split!r} has no usable items in "
                               f"{self.split_source or self.root}"
                               + (f" (all {n} excluded: {self.excluded})" if n else "")
                               + f"; expected {self.layout_help()}")
        # ---- label space
        _, mapping = resolve_space(self.label_space, self.native_classes)
        if mapping is not None:
            unmapped = keep & (mapping[np.where(labels >= 0, labels, 0)] < 0)
            lost_mass = np.zeros(n, dtype=bool)
            if soft is not None:
                lost_cols = mapping < 0
                lost_mass = keep & (soft[:, lost_cols].sum(axis=1) > 0) if lost_cols.any() else lost_mass
            if (unmapped.any() or lost_mass.any()) and not self.drop_unmapped:
                missing = [self.native_classes[j] for j in np.flatnonzero(mapping < 0)]
                raise DatasetError(
                    f"{self.name} {self.split}: {int((unmapped | lost_mass).sum())} items have (votes for) classes "
                    f"{missing} that label space {self.label_space!r} lacks; pass drop_unmapped=True to drop those "
                    "items (counted in describe()['dropped_unmapped']; in probability mode the remaining votes are "
                    "renormalised)")
            for j in np.flatnonzero(mapping < 0):
                cnt = int((unmapped & (labels == j)).sum())
                if cnt:
                    self.dropped_unmapped[self.native_classes[j]] = cnt
            keep &= ~unmapped
            if soft is not None and lost_mass.any():
                soft = soft.copy()
                soft[:, mapping < 0] = 0
                tot = soft.sum(axis=1, keepdims=True)
                empty = keep & (tot[:, 0] <= 0)
                if empty.any():
                    self.dropped_unmapped["(all votes on unmapped classes)"] = int(empty.sum())
                    keep &= ~empty
                soft = np.divide(soft, tot, out=np.zeros_like(soft), where=tot > 0)
        if not keep.any():
            raise DatasetError(f"{self.name}: split {self.split!r} has no items left after mapping into "
                               f"{self.label_space!r} (dropped {self.dropped_unmapped})")
        # ---- images
        failures = self._attach_images(np.flatnonzero(keep), images)
        bad = [c for c in sorted(failures) if keep[c]]
        if bad and self.on_error == "raise":
            first = "; ".join(failures[c] for c in bad[:5])
            raise DatasetError(f"{self.name} {self.split}: {len(bad)} image(s) cannot be used: {first}"
                               + (" ..." if len(bad) > 5 else "") + " (on_error='skip' leaves them out)",
                               item=candidates[bad[0]].id, where=candidates[bad[0]].where)
        for c in bad:
            cand = candidates[c]
            self._problem(DatasetError(failures[c], item=cand.id, where=cand.where))
            keep[c] = False
        if not keep.any():
            raise DatasetError(f"{self.name}: split {self.split!r} has no readable images "
                               f"({len(self.skipped)} skipped)")
        self._index = np.flatnonzero(keep).astype(np.int64)
        self.native_targets = labels[self._index]
        if soft is not None:
            self._soft_native = soft[self._index].astype(np.float32)
            self._soft = None
        _ = self.targets  # mapping is total now

    def _cache_ready(self) -> bool:
        """True when a cache directory already holds this split's pixels (CSV readers then
        skip parsing pixel strings)."""
        if self.cache is None or str(self.cache) == "memory":
            return False
        params = self._cache_params()
        return open_cache(cache_path(self.cache, self.name, self.split, params), params) is not None

    def _cache_params(self) -> dict[str, Any]:
        params = {"dataset": self.name, "root": str(self.root.resolve()), "split": self.split,
                  "layout": self.layout, "image_size": self.image_size, "color": self.color,
                  "pixels": self.pixel_options()}
        sources = self.source_files()
        if sources:  # pixels from CSV files: their signatures decide the content
            params["sources"] = [file_signature(p) for p in sources]
        else:  # pixels from image files: the ordered item list decides it
            params["items"] = ids_digest([c.id for c in self._cands])
        return params

    def _attach_images(self, wanted: np.ndarray, images) -> dict[int, str]:
        """Set up pixel access for candidate indices ``wanted``; returns ``{candidate: reason}``
        of images that failed to decode (found by a cache build or by ``verify``)."""
        n = len(self._cands)
        if images is not None and (self.cache is None or str(self.cache) == "memory"):
            self._store, failures = images()
            self._store_shape = tuple(self._store.shape[1:])
            return failures
        if self.cache is None:
            if not self.verify:
                return {}
            failures = {}
            for c in wanted:
                try:
                    self._decode_checked(int(c))
                except DatasetError as err:
                    failures[int(c)] = str(err)
            return failures
        if str(self.cache) == "memory":
            shape = self._probe_shape(wanted)
            self._store = np.zeros((n,) + shape, dtype=np.uint8)
            failures = {}
            for c in wanted:  # only what this split uses; excluded candidates stay zero
                try:
                    self._store[c] = self._decode_checked(int(c))
                except DatasetError as err:
                    failures[int(c)] = str(err)
            return failures
        params = self._cache_params()
        path = cache_path(self.cache, self.name, self.split, params)
        self.cache_file = path
        hit = open_cache(path, params, n)
        if hit is None:
            if images is not None:
                arr, fails = images()
                write_cache(path, params, arr.shape, images=arr, failures=fails)
            else:
                shape = self._probe_shape(wanted)
                write_cache(path, params, (n,) + shape, self._decode_checked, workers=self.cache_workers)
            hit = open_cache(path, params, n)
            if hit is None:
                raise DatasetError(f"{path}: the image cache just written cannot be read back")
        self._store, meta = hit
        self._store_shape = tuple(self._store.shape[1:])
        return {int(k): v for k, v in meta.get("failures", {}).items()}

    def _probe_shape(self, wanted: np.ndarray) -> tuple[int, ...]:
        """Shape of one stored face: from ``image_size``, or from the first decodable image."""
        if self.image_size is not None:
            s = self.image_size
            self._store_shape = (s, s) if self.color == "L" else (s, s, 3)
            return self._store_shape
        for c in wanted[:50]:
            try:
                self._store_shape = tuple(self._decode(int(c)).shape)
                self._store_first = self._where(int(c))
                return self._store_shape
            except DatasetError:
                continue
        raise DatasetError(f"{self.name} {self.split}: none of the first images could be decoded; "
                           "run `python -m fer_lab data check` for the list")

    def _where(self, c: int) -> str:
        cand = self._cands[c]
        return str(cand.file) if cand.file is not None else cand.where

    def _decode_checked(self, c: int) -> np.ndarray:
        img = self._decode(c)
        if self._store_shape is not None and img.shape != self._store_shape:
            raise DatasetError(f"{self._where(c)}: image is {img.shape}, but {self._store_first} is "
                               f"{self._store_shape}; a cache needs one size: pass image_size=...",
                               item=self._cands[c].id, where=self._cands[c].where)
        return img

    # ---- FaceDataset API --------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._index)

    def load_image(self, index: int) -> np.ndarray:
        """Item ``index``'s face: uint8 ``(H, W)`` (grayscale datasets) or ``(H, W, 3)``.

        From the cache when there is one, else decoded now (a bad file raises
        :class:`DatasetError` naming it).
        """
        c = int(self._index[self.check_index(index)])
        if self._store is None and self.cache_file is not None:
            self._store = np.load(self.cache_file, mmap_mode="r")  # reopened in a DataLoader worker
        if self._store is not None:
            return np.array(self._store[c])
        return self._decode(c)

    @property
    def soft_targets(self) -> np.ndarray | None:
        """Vote distributions ``(N, K)`` float32 in :attr:`classes` order (``label_mode="probability"``),
        else None. Rows sum to 1."""
        if self._soft_native is None:
            return None
        if self._soft is None:
            _, mapping = resolve_space(self.label_space, self.native_classes)
            if mapping is None:
                self._soft = self._soft_native
            else:
                out = np.zeros((len(self), len(self.classes)), dtype=np.float32)
                for j, m in enumerate(mapping):
                    if m >= 0:
                        out[:, m] += self._soft_native[:, j]
                self._soft = out
        return self._soft

    def __getitem__(self, index: int):
        """``(image, target)``: ``image`` the transform's output (default float32 ``(C, H, W)``
        in [0, 1]); ``target`` an int class index, or in probability mode a float32 tensor
        ``(K,)`` (the vote distribution in :attr:`classes` order)."""
        i = self.check_index(index)
        image = to_chw_uint8(self.load_image(i))
        image = self.transform(image) if self.transform is not None else image.float().div_(255)
        soft = self.soft_targets
        if soft is not None:
            return image, torch.from_numpy(soft[i].copy())
        return image, int(self.targets[i])

    def item_ids(self) -> list[str]:
        return [self._cands[c].id for c in self._index]

    def item_files(self) -> list[str]:
        """The image file of every item (or its ``file:line`` when pixels come from a CSV)."""
        return [self._where(int(c)) for c in self._index]

    def fingerprint_header(self) -> str:
        """What, besides ids and labels, decides the data: label mode, size, colour, pixel options."""
        return (f"{self.name}|mode={self.label_mode}|size={self.image_size}|color={self.color}|"
                f"pixels={sorted(self.pixel_options().items())}|space={self.label_space}\n")

    def fingerprint(self, indices=None) -> str:
        """sha256 over :meth:`fingerprint_header`, item ids and labels (and vote
        distributions in probability mode) of all items or of ``indices``."""
        ids, targets, soft = self.item_ids(), self.targets, self.soft_targets
        h = hashlib.sha256(self.fingerprint_header().encode())
        for i in (range(len(self)) if indices is None else indices):
            i = int(i)
            h.update(f"{ids[i]}\t{int(targets[i])}\n".encode())
            if soft is not None:
                h.update(np.round(soft[i], 6).tobytes())
        return h.hexdigest()

    def describe(self, indices=None) -> dict[str, Any]:
        """The base summary (name, size, classes, label space, per-class counts, fingerprint;
        of ``indices`` when given) plus: root, split and where it comes from, layout,
        ``label_mode``, ``image_size`` (stored ``[H, W]`` or ``"native"``), colour, pixel
        options, cache file, and every item left out: ``excluded`` (label rule),
        ``dropped_unmapped`` (label space), ``skipped`` (bad input, with reasons),
        ``warnings``."""
        d = super().describe(indices)
        d.update({
            "root": str(self.root), "split": self.split, "split_source": self.split_source, "layout": self.layout,
            "label_mode": self.label_mode,
            "image_size": (list(self._store_shape[:2]) if self._store_shape is not None
                           else [self.image_size, self.image_size] if self.image_size else "native"),
            "color": self.color, "pixel_options": self.pixel_options(),
            "cache": (None if self.cache is None else "memory" if str(self.cache) == "memory"
                      else str(self.cache_file)),
            "candidates": len(self._cands), "excluded": dict(self.excluded),
            "dropped_unmapped": dict(self.dropped_unmapped), "skipped": list(self.skipped),
            "warnings": list(self.warnings),
        })
        return d

    def __getstate__(self):
        state = self.__dict__.copy()
        if self.cache_file is not None:
            state["_store"] = None  # reopen the memory map in each worker
        return state
