"""AffectNet (manually annotated part) from ``training.csv`` / ``validation.csv``.

CSV columns (by name): ``subDirectory_filePath, face_x, face_y, face_width,
face_height, facial_landmarks, expression, valence, arousal``. ``expression``: 0 neutral,
1 happy, 2 sad, 3 surprise, 4 fear, 5 disgust, 6 anger, 7 contempt, 8 none,
9 uncertain, 10 no-face; labels 8-10 are left out (counted per label in
``describe()["excluded"]``), anything else outside 0..10 is an error naming file and
line. Splits, as in the paper: ``train`` = ``training.csv``, ``test`` = ``validation.csv``
(no validation split: the engine holds one out of train).

Faces are cropped from the bounding box with ``face_x`` as the **column** and
``face_y`` as the **row** (``image[face_y:face_y + face_height, face_x:face_x +
face_width]``); the public ESR code swaps the two. Valence and arousal stay
available as :attr:`AffectNet.valence_arousal` ``(N, 2)``.

287k training images are too many to decode every epoch: pass ``cache=<dir>`` with
``image_size`` (e.g. 96 for ESR, 224 for MA-Net) and the crops are resized and stored
once in a memory-mapped ``.npy`` (``cache_workers`` processes build it); every later
run and epoch reads that file. Not a reader of the automatically annotated part.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import DatasetError
from .fer2013 import _csv_rows, read_csv_header
from .labels import AFFECTNET8
from .real import Candidate, RealFaceDataset

AFFECTNET_CSV: dict[str, str] = {"train": "training.csv", "test": "validation.csv"}
#: Labels beyond the 8 classes, left out.
AFFECTNET_OTHER: dict[int, str] = {8: "none", 9: "uncertain", 10: "no-face"}
REQUIRED = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "expression", "valence",
            "arousal")
#: Where the image tree is looked for under ``root`` (first that holds the first listed image).
IMAGE_DIRS = ("Manually_Annotated_Images", "Manually_Annotated/Manually_Annotated_Images",
              "Manually_Annotated", "images", ".")


def affectnet_splits(root, **_) -> tuple[str, ...]:
    """Splits whose CSV exists under ``root`` (``train``: training.csv, ``test``: validation.csv)."""
    return tuple(s for s, f in AFFECTNET_CSV.items() if (Path(root) / f).is_file())


class AffectNet(RealFaceDataset):
    """AffectNet faces, cropped with the correct axes (see the module docstring).

    Args:
        root: directory holding ``training.csv``, ``validation.csv`` and the image tree.
        split: ``train`` or ``test``.
        images_dir: the image tree, relative to ``root`` (default: detected among
            :data:`IMAGE_DIRS`).
        crop: crop the face box (default True); False keeps whole images.
        Other options: see :class:`~fer_lab.data.real.RealFaceDataset` (``image_size`` is
        needed with ``cache``, as crops differ in size).

    ``load_image`` returns uint8 ``(H, W, 3)``; item ids are ``subDirectory_filePath``.
    """

    name = "affectnet"
    native_classes = AFFECTNET8
    color = "RGB"

    def __init__(self, root, split: str = "train", transform=None, label_space=None, *,
                 images_dir: str | None = None, crop: bool = True, **options):
        if split not in AFFECTNET_CSV:
            raise ValueError(f"affectnet: unknown split {split!r}; expected one of {tuple(AFFECTNET_CSV)} "
                             "(train = training.csv, test = validation.csv)")
        super().__init__(root, split, transform, label_space, **options)
        if self.cache is not None and str(self.cache) != "memory" and self.image_size is None:
            raise DatasetError("affectnet: face crops differ in size, so a cache needs image_size=... "
                               "(e.g. 96 for ESR, 224 for MA-Net)")
        self.crop = bool(crop)
        self.layout = "affectnet-csv"
        csv_path = self.root / AFFECTNET_CSV[split]
        self.csv_path = csv_path
        self.split_source = AFFECTNET_CSV[split]
        if not csv_path.is_file():
            raise DatasetError(f"affectnet: split {split!r} needs {csv_path}; expected {self.layout_help()}")
        reader, cols, f = read_csv_header(csv_path, REQUIRED)
        rows: list[tuple[str, tuple[int, int, int, int], int, float, float, str]] = []
        other = {k: 0 for k in AFFECTNET_OTHER}
        try:
            for line, row in _csv_rows(reader, csv_path):
                where = f"{csv_path}:{line}"
                if len(row) <= max(cols[c] for c in REQUIRED):
                    self._problem(DatasetError(f"{where}: {len(row)} fields, fewer than the header's", where=where))
                    continue
                rel = row[cols["subDirectory_filePath"]].strip()
                raw = row[cols["expression"]].strip()
                try:
                    label = int(raw)
                except ValueError:
                    label = -1
                if not 0 <= label <= 10 or raw != str(label):
                    self._problem(DatasetError(f"{where}: expression {raw!r} is not a label 0..10", item=rel,
                                               where=where))
                    continue
                if label >= 8:
                    other[label] += 1
                    continue
                try:
                    box = tuple(int(float(row[cols[c]])) for c in ("face_x", "face_y", "face_width", "face_height"))
                    va = (float(row[cols["valence"]]), float(row[cols["arousal"]]))
                except ValueError:
                    self._problem(DatasetError(f"{where}: face box or valence/arousal is not numeric", item=rel,
                                               where=where))
                    continue
                if box[2] <= 0 or box[3] <= 0 or box[0] < 0 or box[1] < 0:
                    self._problem(DatasetError(f"{where}: face box {box} (x, y, width, height) is empty or negative",
                                               item=rel, where=where))
                    continue
                rows.append((rel, box, label, va[0], va[1], where))
        finally:
            f.close()
        for k, n in other.items():
            if n:
                self._exclude(f"expression {k} ({AFFECTNET_OTHER[k]})", n)
        if not rows:
            raise DatasetError(f"affectnet: split {split!r} is empty: {csv_path} has no rows with expression 0..7")
        self.images_root = self._find_images(images_dir, rows[0][0])
        cands = [Candidate(id=rel, label=label, where=where, file=self.images_root / rel,
                           box=box if self.crop else None) for rel, box, label, _, _, where in rows]
        va_by_id = {id(c): (r[3], r[4]) for c, r in zip(cands, rows)}
        cands = self._check_files_exist(cands)
        self._va_all = np.array([va_by_id[id(c)] for c in cands], dtype=np.float32).reshape(-1, 2)
        self._finalize(cands)

    def _find_images(self, images_dir: str | None, first: str) -> Path:
        if images_dir is not None:
            d = self.root / images_dir
            if not d.is_dir():
                raise DatasetError(f"affectnet: images_dir {d} not found; expected {self.layout_help()}")
            return d
        for rel in IMAGE_DIRS:
            d = self.root / rel
            if (d / first).is_file():
                return d
        raise DatasetError(f"affectnet: cannot find the image tree: {first} (first row of {self.csv_path}) is "
                           f"not under any of {[str(self.root / d) for d in IMAGE_DIRS]}; pass images_dir=...")

    @classmethod
    def layout_help(cls) -> str:
        return ("<root>/training.csv and <root>/validation.csv (columns " + ", ".join(REQUIRED) +
                ") and the image tree <root>/Manually_Annotated_Images/<subDirectory_filePath>")

    def pixel_options(self) -> dict:
        return {"crop": self.crop}

    @property
    def valence_arousal(self) -> np.ndarray:
        """Valence and arousal of every item: float32 ``(N, 2)`` (AffectNet's values, in [-1, 1])."""
        return self._va_all[self._index]

    def describe(self, indices=None) -> dict:
        d = super().describe(indices)
        d["images_root"] = str(self.images_root)
        return d
