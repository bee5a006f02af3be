"""RAF-DB basic emotions (7 classes) from its distributed layout.

Labels: ``<root>/EmoLabel/list_patition_label.txt`` (the file name's spelling is the
dataset's), one ``train_00001.jpg 5`` per line, labels 1 surprise, 2 fear, 3 disgust,
4 happiness, 5 sadness, 6 anger, 7 neutral (native class index = label - 1). Images:
``<root>/Image/aligned/train_00001_aligned.jpg`` (100x100 RGB, the default), or
``<root>/Image/original/train_00001.jpg`` with ``images="original"``;
``images="aligned_or_original"`` falls back to the original file only where the
aligned one is missing. Splits: ``train`` (``train_*``) and ``test`` (``test_*``); there
is no validation split (the engine holds one out of train).

Not a reader of RAF-DB compound emotions or of its landmark/attribute files.
"""
from __future__ import annotations

from pathlib import Path

from .errors import DatasetError
from .real import Candidate, RealFaceDataset

#: RAF-DB basic classes in their native order (label 1..7).
RAFDB_CLASSES: tuple[str, ...] = ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")
RAFDB_SPLITS: tuple[str, ...] = ("train", "test")
IMAGE_CHOICES = ("aligned", "original", "aligned_or_original")
LABEL_FILE = Path("EmoLabel") / "list_patition_label.txt"


class RAFDB(RealFaceDataset):
    """RAF-DB basic-emotion faces (see the module docstring).

    Args:
        root: RAF-DB ``basic/`` directory (holding ``EmoLabel/`` and ``Image/``).
        split: ``train`` or ``test``.
        images: ``aligned`` (default), ``original`` or ``aligned_or_original``.
        Other options: see :class:`~fer_lab.data.real.RealFaceDataset`.

    ``load_image`` returns uint8 ``(100, 100, 3)`` for aligned faces. Item ids are the
    label file's names (``train_00001.jpg``), whichever image variant is read.
    """

    name = "rafdb"
    native_classes = RAFDB_CLASSES
    color = "RGB"

    def __init__(self, root, split: str = "train", transform=None, label_space=None, *,
                 images: str = "aligned", **options):
        if split not in RAFDB_SPLITS:
            raise ValueError(f"rafdb: unknown split {split!r}; expected one of {RAFDB_SPLITS} (RAF-DB has no "
                             "validation split)")
        if images not in IMAGE_CHOICES:
            raise ValueError(f"images={images!r}: expected one of {IMAGE_CHOICES}")
        super().__init__(root, split, transform, label_space, **options)
        self.images = images
        self.layout = "raf-basic"
        label_file = self.root / LABEL_FILE
        self.split_source = f"{LABEL_FILE} ({split}_*)"
        if not label_file.is_file():
            raise DatasetError(f"rafdb: {label_file} not found; expected {self.layout_help()}")
        image_dirs = {"aligned": self.root / "Image" / "aligned", "original": self.root / "Image" / "original"}
        needed = ["original"] if images == "original" else ["aligned"]
        for key in needed:
            if not image_dirs[key].is_dir() and not (images == "aligned_or_original"
                                                     and image_dirs["original"].is_dir()):
                raise DatasetError(f"rafdb: image folder {image_dirs[key]} not found; expected {self.layout_help()}")
        cands: list[Candidate] = []
        seen_any = False
        with open(label_file) as f:
            for line_no, line in enumerate(f, start=1):
                text = line.strip()
                if not text:
                    continue
                where = f"{label_file}:{line_no}"
                parts = text.split()
                if len(parts) != 2:
                    self._problem(DatasetError(f"{where}: expected '<name>.jpg <label>', got {text!r}", where=where))
                    continue
                name, lab = parts
                prefix = name.split("_", 1)[0]
                if prefix not in RAFDB_SPLITS:
                    self._problem(DatasetError(f"{where}: image name {name!r} starts with neither train_ nor test_",
                                               item=name, where=where))
                    continue
                seen_any = True
                if prefix != split:
                    continue
                try:
                    label = int(lab)
                except ValueError:
                    label = 0
                if not 1 <= label <= len(RAFDB_CLASSES) or lab != str(label):
                    self._problem(DatasetError(f"{where}: label {lab!r} of {name} is not in 1..7 "
                                               f"({', '.join(RAFDB_CLASSES)})", item=name, where=where))
                    continue
                stem = Path(name).stem
                aligned = image_dirs["aligned"] / f"{stem}_aligned{Path(name).suffix or '.jpg'}"
                original = image_dirs["original"] / name
                if images == "aligned":
                    file = aligned
                elif images == "original":
                    file = original
                else:
                    file = aligned if aligned.is_file() else original
                cands.append(Candidate(id=name, label=label - 1, where=where, file=file))
        if not cands:
            raise DatasetError(f"rafdb: split {split!r} is empty: {label_file} lists no {split}_* images"
                               + ("" if seen_any else " (the file has no usable lines)"))
        if images == "aligned_or_original":
            n_orig = sum(c.file.parent == image_dirs["original"] for c in cands)
            if n_orig:
                self.warnings.append(f"{n_orig} items use Image/original/ because their aligned face is missing")
        cands = self._check_files_exist(cands)
        if not cands:
            raise DatasetError(f"rafdb: split {split!r} has no images on disk; expected {self.layout_help()}")
        self._finalize(cands)

    @classmethod
    def layout_help(cls) -> str:
        return ("RAF-DB basic: <root>/EmoLabel/list_patition_label.txt ('train_00001.jpg 5' per line, labels 1..7) "
                "and <root>/Image/aligned/train_00001_aligned.jpg (or Image/original/ with images='original')")

    def pixel_options(self) -> dict:
        return {"images": self.images}
