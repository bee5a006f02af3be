"""FER2013 from the Kaggle challenge file ``fer2013.csv`` (7 classes).

``fer2013.csv`` has the columns ``emotion,pixels,Usage``: ``emotion`` 0 angry,
1 disgust, 2 fear, 3 happy, 4 sad, 5 surprise, 6 neutral; ``pixels`` 2,304
space-separated gray values of a 48x48 face; ``Usage`` Training / PublicTest /
PrivateTest, which fer_lab calls ``train`` / ``val`` / ``test``. Pixels are parsed
once into a uint8 array (kept in memory, or cached as a memory-mapped ``.npy``).

Also home of the CSV helpers the FER+ source layout shares (:func:`parse_pixels`,
:func:`read_csv_header`). Not a reader of FER+ votes (see :mod:`fer_lab.data.ferplus`).
"""
from __future__ import annotations

import csv
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import DatasetError
from .real import Candidate, RealFaceDataset

logger = logging.getLogger(__name__)

#: FER2013's own class order (``emotion`` 0..6).
FER2013_CLASSES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
#: fer_lab split name -> FER2013 ``Usage`` value.
FER2013_USAGE: dict[str, str] = {"train": "Training", "val": "PublicTest", "test": "PrivateTest"}
FER_SIDE = 48

csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))


def parse_pixels(text: str, where: str, side: int = FER_SIDE) -> np.ndarray:
    """``"70 80 82 ..."`` (``side * side`` integers in 0..255) -> uint8 ``(side, side)``.

    Raises :class:`DatasetError` naming ``where`` (``file:line``) on anything else.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            values = np.fromstring(text, dtype=np.int64, sep=" ")
    except (ValueError, DeprecationWarning):
        raise DatasetError(f"{where}: pixels are not {side * side} space-separated integers", where=where) from None
    if values.size != side * side:
        raise DatasetError(f"{where}: {values.size} pixel values, expected {side * side} ({side}x{side})",
                           where=where)
    if values.min() < 0 or values.max() > 255:
        raise DatasetError(f"{where}: pixel values outside 0..255", where=where)
    return values.astype(np.uint8).reshape(side, side)


def read_csv_header(path: Path, required: tuple[str, ...]) -> tuple[Iterator[list[str]], dict[str, int], Any]:
    """Open ``path`` and check its header: returns ``(rows, column index by name, file)``.

    The caller closes the file. A missing file or column raises :class:`DatasetError`
    naming the column and the file. Column names are matched after stripping spaces.
    """
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    f = open(path, newline="")
    reader = csv.reader(f)
    try:
        header = next(reader)
    except StopIteration:
        f.close()
        raise DatasetError(f"{path}: the file is empty (expected a header with columns {list(required)})") from None
    except csv.Error as err:
        f.close()
        raise DatasetError(f"{path}:1: not a CSV file ({err})") from None
    cols = {h.strip(): i for i, h in enumerate(header)}
    for name in required:
        if name not in cols:
            f.close()
            raise DatasetError(f"{path}: no column {name!r} (header has {[h.strip() for h in header]}; "
                               f"expected {list(required)})")
    return reader, cols, f


def _csv_rows(reader, path: Path) -> Iterator[tuple[int, list[str]]]:
    """``(line number, row)`` for every non-empty data row; a malformed row names file and line."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise DatasetError(f"{path}:{reader.line_num}: malformed CSV row ({err})") from None
        if row and any(x.strip() for x in row):
            yield reader.line_num, row


class FER2013(RealFaceDataset):
    """FER2013 faces and their original 7-class labels from ``<root>/fer2013.csv``.

    Args:
        root: directory holding ``fer2013.csv`` (or the path of the CSV itself).
        split: ``train`` (Usage Training), ``val`` (PublicTest), ``test`` (PrivateTest).
        csv_name: file name of the CSV inside ``root`` (default ``fer2013.csv``).
        Other options: see :class:`~fer_lab.data.real.RealFaceDataset`.

    Items are 48x48 grayscale (``load_image`` -> uint8 ``(48, 48)``); ids are
    ``fer2013.csv#row<k>`` with ``k`` the 0-based data row.
    """

    name = "fer2013"
    native_classes = FER2013_CLASSES
    color = "L"

    def __init__(self, root, split: str = "train", transform=None, label_space=None, *,
                 csv_name: str = "fer2013.csv", **options):
        root_path = Path(root) if root is not None else None
        if root_path is not None and root_path.is_file():
            csv_name, root = root_path.name, root_path.parent
        super().__init__(root, split, transform, label_space, **options)
        if split not in FER2013_USAGE:
            raise ValueError(f"fer2013: unknown split {split!r}; expected one of {tuple(FER2013_USAGE)}")
        self.csv_path = self.root / csv_name
        self.layout = "kaggle-csv"
        usage = FER2013_USAGE[split]
        self.split_source = f"{csv_name} Usage={usage}"
        if not self.csv_path.is_file():
            raise DatasetError(f"fer2013: {self.csv_path} not found; expected {self.layout_help()}")
        need_pixels = not self._cache_ready()
        reader, cols, f = read_csv_header(self.csv_path, ("emotion", "pixels", "Usage"))
        ie, ip, iu = cols["emotion"], cols["pixels"], cols["Usage"]
        cands: list[Candidate] = []
        pixels: list[np.ndarray] = []
        failures: dict[int, str] = {}
        usages = {v: k for k, v in FER2013_USAGE.items()}
        try:
            for data_row, (line, row) in enumerate(_csv_rows(reader, self.csv_path)):
                where = f"{self.csv_path}:{line}"
                if len(row) <= max(ie, ip, iu):
                    self._problem(DatasetError(f"{where}: {len(row)} fields, expected emotion,pixels,Usage",
                                               item=f"{csv_name}#row{data_row}", where=where))
                    continue
                u = row[iu].strip()
                if u not in usages:
                    self._problem(DatasetError(f"{where}: Usage {u!r} is not one of {list(usages)}",
                                               item=f"{csv_name}#row{data_row}", where=where))
                    continue
                if u != usage:
                    continue
                item = f"{csv_name}#row{data_row}"
                try:
                    label = int(row[ie])
                except ValueError:
                    label = -1
                if not 0 <= label < len(FER2013_CLASSES) or row[ie].strip() != str(label):
                    self._problem(DatasetError(f"{where}: emotion {row[ie]!r} is not a label 0..6 "
                                               f"({', '.join(FER2013_CLASSES)})", item=item, where=where))
                    continue
                if need_pixels:
                    try:
                        pixels.append(parse_pixels(row[ip], where))
                    except DatasetError as err:
                        failures[len(cands)] = str(err)
                        pixels.append(np.zeros((FER_SIDE, FER_SIDE), np.uint8))
                cands.append(Candidate(id=item, label=label, where=where, row=data_row))
        finally:
            f.close()
        if not cands:
            raise DatasetError(f"fer2013: split {split!r} is empty: no rows with Usage={usage} in {self.csv_path}")

        def images():
            if not need_pixels:  # a cache was expected but did not match after all: parse again
                return self._reparse(cands)
            return (np.stack(pixels) if pixels else np.zeros((0, FER_SIDE, FER_SIDE), np.uint8)), failures

        self._finalize(cands, images=images)

    @classmethod
    def layout_help(cls) -> str:
        return "<root>/fer2013.csv with columns emotion,pixels,Usage (Usage Training/PublicTest/PrivateTest)"

    def source_files(self) -> list[Path]:
        return [self.csv_path]

    def _reparse(self, cands: list[Candidate]) -> tuple[np.ndarray, dict[int, str]]:
        wanted = {c.row: k for k, c in enumerate(cands)}
        out = np.zeros((len(cands), FER_SIDE, FER_SIDE), np.uint8)
        failures: dict[int, str] = {}
        reader, cols, f = read_csv_header(self.csv_path, ("pixels",))
        try:
            for data_row, (line, row) in enumerate(_csv_rows(reader, self.csv_path)):
                k = wanted.get(data_row)
                if k is not None:
                    try:
                        out[k] = parse_pixels(row[cols["pixels"]], cands[k].where)
                    except DatasetError as err:
                        failures[k] = str(err)
        finally:
            f.close()
        return out, failures
