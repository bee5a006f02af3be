"""Any dataset stored as image folders: ``root/<class>/*.jpg|png`` or ``root/<split>/<class>/...``.

Layouts (``layout="auto"`` detects them): ``flat``, one folder per class directly under
``root`` (then the only split is ``train``); ``splits``, folders ``train/``, ``val/``,
``test/`` under ``root`` (also accepted: ``training``; ``valid``/``validation``;
``testing``), each with one folder per class. Classes are the folder names, sorted,
taken over every split so all splits share one class order; ``classes=[...]`` fixes
the order (and checks that no other class folder exists). Class names map into a
label space by name (``happiness`` -> ``happy`` etc., see :mod:`fer_lab.data.labels`).
Files are read in sorted order; other files (not images) are ignored and counted.

Not a place for per-dataset label files: those have their own loaders.
"""
from __future__ import annotations

from pathlib import Path

from .errors import IMAGE_SUFFIXES, DatasetError, check_choice
from .real import Candidate, RealFaceDataset

#: fer_lab split name -> folder names accepted for it (first match wins).
SPLIT_DIRS: dict[str, tuple[str, ...]] = {"train": ("train", "training"), "val": ("val", "valid", "validation"),
                                          "test": ("test", "testing")}
LAYOUTS = ("auto", "flat", "splits")
COLORS = ("RGB", "L")


def _split_dir(root: Path, split: str) -> Path | None:
    for name in SPLIT_DIRS[split]:
        if (root / name).is_dir():
            return root / name
    return None


def detect_layout(root: Path) -> str:
    """``"splits"`` when ``root`` has a train/val/test folder, else ``"flat"``."""
    return "splits" if any(_split_dir(root, s) for s in SPLIT_DIRS) else "flat"


def folder_splits(root, layout: str = "auto", **_) -> tuple[str, ...]:
    """Splits present under ``root``: the split folders that exist, or ``("train",)`` when flat."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"folder: data root {root} does not exist; expected {ImageFolder.layout_help()}")
    layout = detect_layout(root) if layout == "auto" else layout
    if layout == "flat":
        return ("train",)
    return tuple(s for s in SPLIT_DIRS if _split_dir(root, s))


def _class_dirs(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


class ImageFolder(RealFaceDataset):
    """Faces in class folders (see the module docstring).

    Args:
        root: the top folder.
        split: ``train``, ``val`` or ``test`` (``flat`` layout: ``train`` only).
        classes: class names in the order to use (default: sorted folder names).
        layout: ``auto``, ``flat`` or ``splits``.
        color: ``"RGB"`` (default; grayscale files become 3 equal channels) or ``"L"``.
        Other options: see :class:`~fer_lab.data.real.RealFaceDataset`.

    Item ids are paths relative to ``root`` (``train/happy/001.jpg``).
    """

    name = "folder"

    def __init__(self, root, split: str = "train", transform=None, label_space=None, *,
                 classes: list[str] | tuple[str, ...] | None = None, layout: str = "auto", color: str = "RGB",
                 **options):
        check_choice("layout", layout, LAYOUTS)
        check_choice("color", color, COLORS)
        check_choice("folder: split", split, SPLIT_DIRS)
        self.color = color
        self.native_classes = tuple(classes) if classes is not None else ()
        super().__init__(root, split, transform, label_space, **options)
        self.layout = detect_layout(self.root) if layout == "auto" else layout
        if self.layout == "flat":
            if split != "train":
                raise DatasetError(f"folder: {self.root} has the flat layout <root>/<class>/*.jpg, which is one split "
                                   f"('train'); for {split!r} use <root>/{SPLIT_DIRS[split][0]}/<class>/*.jpg")
            base = self.root
            split_dirs = [self.root]
        else:
            base = _split_dir(self.root, split)
            if base is None:
                present = [s for s in SPLIT_DIRS if _split_dir(self.root, s)]
                raise DatasetError(f"folder: split {split!r} expects {self.root}/{SPLIT_DIRS[split][0]}/<class>/*.jpg "
                                   f"(or {'/'.join(SPLIT_DIRS[split][1:])}); not found (splits present: {present})")
            split_dirs = [d for d in (_split_dir(self.root, s) for s in SPLIT_DIRS) if d is not None]
        found = sorted({c for d in split_dirs for c in _class_dirs(d)})
        if classes is None:
            if not found:
                raise DatasetError(f"folder: no class folders under {base}; expected {self.layout_help()}")
            self.native_classes = tuple(found)
        else:
            if len(set(self.native_classes)) != len(self.native_classes) or not self.native_classes:
                raise ValueError(f"classes={list(classes)!r}: expected distinct class names")
            extra = sorted(set(found) - set(self.native_classes))
            if extra:
                raise DatasetError(f"folder: class folders {extra} under {self.root} are not in classes="
                                   f"{list(self.native_classes)}")
        self.split_source = str(base.relative_to(self.root)) if base != self.root else "."
        cands: list[Candidate] = []
        ignored = 0
        for k, cls in enumerate(self.native_classes):
            d = base / cls
            if not d.is_dir():
                continue
            for p in sorted(d.rglob("*")):
                if not p.is_file() or p.name.startswith("."):
                    continue
                if p.suffix.lower() not in IMAGE_SUFFIXES:
                    ignored += 1
                    continue
                rel = p.relative_to(self.root).as_posix()
                cands.append(Candidate(id=rel, label=k, where=str(p), file=p))
        if ignored:
            self.warnings.append(f"{ignored} non-image files under {base} were ignored")
        if not cands:
            raise DatasetError(f"folder: split {split!r} is empty: no images ({', '.join(IMAGE_SUFFIXES)}) under "
                               f"{base}/<class>/")
        present = {x.label for x in cands}
        empty = [c for k, c in enumerate(self.native_classes) if k not in present]
        if empty:
            self.warnings.append(f"split {split!r} has no images of class(es) {empty}")
        self._finalize(cands)

    @classmethod
    def layout_help(cls) -> str:
        return ("<root>/<class>/*.jpg|png (one split, train) or <root>/<train|val|test>/<class>/*.jpg|png")

    def pixel_options(self) -> dict:
        return {"classes": list(self.native_classes)}
