"""FER+ (Microsoft's crowd-sourced relabelling of FER2013): 8 emotions from 10 votes.

Two on-disk layouts, detected from what ``root`` holds (``layout="auto"``):

- ``folders`` (Microsoft's generated layout): ``FER2013Train/``, ``FER2013Valid/``,
  ``FER2013Test/``, each with 48x48 grayscale ``ferNNNNNNN.png`` and a header-less
  ``label.csv``: ``name,"(0, 0, 48, 48)",`` + 10 vote counts;
- ``source``: ``fer2013.csv`` (``emotion,pixels,Usage``) and ``fer2013new.csv``
  (``Usage,Image name,`` + 10 vote columns), row-aligned. Image names come from
  ``fer2013new.csv`` itself (they are numbered in sequence skipping the rows without
  a face, not ``fer<row>.png``); rows with an empty name are not faces; a few names
  are used by two rows (those items get ids ``<name>#row<k>``).

Split names: ``train`` = FER2013Train / Usage Training, ``val`` = FER2013Valid /
PublicTest, ``test`` = FER2013Test / PrivateTest.

Votes are in the order neutral, happiness, surprise, sadness, anger, disgust, fear,
contempt, unknown, NF (not a face); the classes (native order) are the first 8.
Label modes (:func:`ferplus_labels`), all after Microsoft's outlier removal (every
count of 1 set to 0):

- ``majority`` (Microsoft's rule, default; used by ESR and the paper): keep an image
  only if its largest count is more than half of the remaining total and belongs to
  an emotion, not unknown/NF. 25,045 train / 3,191 valid / 3,137 test images.
- ``plurality``: keep an image if one category alone has the most votes and it is an
  emotion (ties and unknown/NF winners are left out).
- ``probability``: keep an image if some emotion has at least as many votes as
  unknown and as NF; its target is the vote distribution over the 8 emotions
  (unknown/NF removed), ``__getitem__`` returns it as a float ``(K,)`` tensor and
  ``targets`` its argmax (lowest native index on ties) for class balancing.

Every image a mode leaves out is counted by reason in ``describe()["excluded"]``.
"""
from __future__ import annotations

import csv
import logging
from collections import Counter
from pathlib import Path

import numpy as np

from .errors import IMAGE_SUFFIXES, DatasetError, check_choice
from .fer2013 import FER2013_USAGE, FER_SIDE, _csv_rows, parse_pixels, read_csv_header
from .real import FERPLUS_LABEL_MODES, Candidate, RealFaceDataset

logger = logging.getLogger(__name__)

#: FER+ classes in their native order (the first 8 vote columns).
FERPLUS_CLASSES: tuple[str, ...] = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
                                   "contempt")
#: The 10 vote columns of ``label.csv`` / ``fer2013new.csv``.
VOTE_COLUMNS: tuple[str, ...] = FERPLUS_CLASSES + ("unknown", "NF")
#: fer_lab split name -> Microsoft's folder.
FERPLUS_FOLDERS: dict[str, str] = {"train": "FER2013Train", "val": "FER2013Valid", "test": "FER2013Test"}
LAYOUTS = ("auto", "folders", "source")

#: Exclusion reasons (keys of ``describe()["excluded"]``).
NO_MAJORITY = "no majority: largest count <= half of the votes left after removing single votes"
MAJ_UNKNOWN = "majority is unknown"
MAJ_NF = "majority is NF (not a face)"
TIE = "tie for the most votes"
TOP_UNKNOWN = "most votes for unknown or NF"
NO_EMOTION = "no emotion votes left after removing single votes"
NO_FACE_ROW = "empty image name in fer2013new.csv (not a face)"


def ferplus_labels(votes, mode: str = "majority"):
    """Apply a FER+ label mode to vote counts.

    Args:
        votes: int array ``(N, 10)`` of counts in :data:`VOTE_COLUMNS` order.
        mode: ``majority``, ``plurality`` or ``probability`` (see the module docstring).

    Returns ``(labels, reasons, soft)``: ``labels`` int64 ``(N,)`` native class index
    (-1 where left out), ``reasons`` a list of ``N`` exclusion reasons (None where
    kept), ``soft`` float64 ``(N, 8)`` vote distributions over the emotions (rows of
    left-out images are 0) in probability mode, else None.
    """
    if mode not in FERPLUS_LABEL_MODES:
        raise ValueError(f"label_mode={mode!r}: expected one of {FERPLUS_LABEL_MODES}")
    v = np.asarray(votes, dtype=np.int64)
    if v.ndim != 2 or v.shape[1] != 10:
        raise ValueError(f"votes: expected shape (N, 10), got {v.shape}")
    c = np.where(v <= 1, 0, v)  # single votes are outliers (Microsoft's preprocessing, every mode)
    total = c.sum(axis=1)
    top = c.max(axis=1)
    arg = c.argmax(axis=1)  # first index on ties: emotions before unknown/NF
    n = len(v)
    labels = np.full(n, -1, dtype=np.int64)
    reasons: list[str | None] = [None] * n
    soft = None
    if mode == "majority":
        for i in range(n):
            if not top[i] * 2 > total[i]:
                reasons[i] = NO_MAJORITY
            elif arg[i] == 8:
                reasons[i] = MAJ_UNKNOWN
            elif arg[i] == 9:
                reasons[i] = MAJ_NF
            else:
                labels[i] = arg[i]
    elif mode == "plurality":
        ties = (c == top[:, None]).sum(axis=1) > 1
        for i in range(n):
            if top[i] == 0:
                reasons[i] = NO_EMOTION
            elif ties[i]:
                reasons[i] = TIE
            elif arg[i] >= 8:
                reasons[i] = TOP_UNKNOWN
            else:
                labels[i] = arg[i]
    else:
        emo = c[:, :8]
        etop = emo.max(axis=1)
        soft = np.zeros((n, 8), dtype=np.float64)
        for i in range(n):
            if etop[i] == 0:
                reasons[i] = NO_EMOTION
            elif etop[i] < c[i, 8:].max():
                reasons[i] = TOP_UNKNOWN
            else:
                labels[i] = int(emo[i].argmax())
                soft[i] = emo[i] / emo[i].sum()
    return labels, reasons, soft


def detect_layout(root: Path) -> str:
    """``"folders"`` when ``root`` holds any ``FER2013*/`` split folder, ``"source"`` when it
    holds ``fer2013new.csv``; otherwise a :class:`DatasetError` describing both layouts."""
    if any((root / f).is_dir() for f in FERPLUS_FOLDERS.values()):
        return "folders"
    if (root / "fer2013new.csv").is_file():
        return "source"
    raise DatasetError(f"ferplus: {root} holds neither layout; expected {FERPlus.layout_help()}")


def ferplus_splits(root, layout: str = "auto", **_) -> tuple[str, ...]:
    """Splits present under ``root``: the ``FER2013*`` folders that exist, or all three for
    the source layout (``fer2013.csv`` carries every Usage)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"ferplus: data root {root} does not exist; expected {FERPlus.layout_help()}")
    layout = detect_layout(root) if layout == "auto" else layout
    if layout == "source":
        return tuple(FERPLUS_FOLDERS)
    return tuple(s for s, f in FERPLUS_FOLDERS.items() if (root / f).is_dir())


class FERPlus(RealFaceDataset):
    """FER+ faces with labels from the 10 crowd votes (see the module docstring).

    Args:
        root: directory in either layout.
        split: ``train``, ``val`` or ``test``.
        label_mode: ``majority`` (default), ``probability`` or ``plurality``.
        layout: ``auto`` (detect), ``folders`` or ``source``.
        Other options: see :class:`~fer_lab.data.real.RealFaceDataset`.

    ``votes`` holds the raw ``(N, 10)`` counts of the kept items; ``load_image`` returns
    uint8 ``(48, 48)`` (or ``image_size``). Item ids are ``FER2013Train/fer0000000.png``
    (same in both layouts).
    """

    name = "ferplus"
    native_classes = FERPLUS_CLASSES
    color = "L"

    def __init__(self, root, split: str = "train", transform=None, label_space=None, *,
                 label_mode: str = "majority", layout: str = "auto", **options):
        check_choice("label_mode", label_mode, FERPLUS_LABEL_MODES)
        check_choice("layout", layout, LAYOUTS)
        check_choice("ferplus: split", split, FERPLUS_FOLDERS)
        super().__init__(root, split, transform, label_space, **options)
        self.label_mode = label_mode
        self.layout = detect_layout(self.root) if layout == "auto" else layout
        if self.layout == "folders":
            cands, votes, images = self._read_folders()
        else:
            cands, votes, images = self._read_source()
        labels, reasons, soft = ferplus_labels(votes, label_mode)
        for cand, lab, why in zip(cands, labels, reasons):
            cand.label = int(lab)
            cand.exclude = why
            if why is not None:
                self._exclude(why)
        self._votes_all = votes
        self._finalize(cands, soft=soft, images=images)

    @classmethod
    def layout_help(cls) -> str:
        return ("Microsoft's FER+ layout <root>/FER2013Train|FER2013Valid|FER2013Test/ with ferNNNNNNN.png and "
                "label.csv (name,\"(0, 0, 48, 48)\",10 vote counts), or the source files <root>/fer2013.csv "
                "(emotion,pixels,Usage) + <root>/fer2013new.csv (Usage,Image name,10 vote columns)")

    def pixel_options(self) -> dict:
        return {}

    def source_files(self) -> list[Path]:
        return [self.root / "fer2013.csv", self.root / "fer2013new.csv"] if self.layout == "source" else []

    @property
    def votes(self) -> np.ndarray:
        """Raw vote counts of the kept items: int64 ``(N, 10)`` in :data:`VOTE_COLUMNS` order."""
        return self._votes_all[self._index]

    # ---- folders layout -----------------------------------------------------------------
    def _read_folders(self):
        folder = FERPLUS_FOLDERS[self.split]
        d = self.root / folder
        label_csv = d / "label.csv"
        self.split_source = f"{folder}/label.csv"
        if not d.is_dir():
            present = [s for s, f in FERPLUS_FOLDERS.items() if (self.root / f).is_dir()]
            raise DatasetError(f"ferplus: split {self.split!r} expects the folder {d} (ferNNNNNNN.png + label.csv); "
                               f"it is missing (splits present: {present}). Expected {self.layout_help()}")
        if not label_csv.is_file():
            raise DatasetError(f"ferplus: {label_csv} not found; each FER2013* folder needs label.csv "
                               "(name,\"(0, 0, 48, 48)\",10 vote counts per line)")
        cands: list[Candidate] = []
        votes: list[list[int]] = []
        with open(label_csv, newline="") as f:
            reader = csv.reader(f)
            for line, row in _csv_rows(reader, label_csv):
                where = f"{label_csv}:{line}"
                name = row[0].strip()
                if len(row) != 12:
                    if line == 1 and not name.lower().endswith(IMAGE_SUFFIXES):
                        continue  # a header line
                    self._problem(DatasetError(f"{where}: {len(row)} fields, expected 12 "
                                               "(name, face box, 10 vote counts)", item=name, where=where))
                    continue
                try:
                    v = [int(x) for x in row[2:]]
                except ValueError:
                    if line == 1 and not name.lower().endswith(IMAGE_SUFFIXES):
                        continue
                    self._problem(DatasetError(f"{where}: vote counts {row[2:]} are not integers",
                                               item=name, where=where))
                    continue
                if min(v) < 0:
                    self._problem(DatasetError(f"{where}: negative vote count in {v}", item=name, where=where))
                    continue
                if not name:
                    self._problem(DatasetError(f"{where}: empty image name", where=where))
                    continue
                cands.append(Candidate(id=f"{folder}/{name}", label=-1, where=where, file=d / name))
                votes.append(v)
        if not cands:
            raise DatasetError(f"ferplus: split {self.split!r} is empty: {label_csv} lists no images")
        counts = Counter(c.id for c in cands)
        for cand in cands:
            if counts[cand.id] > 1:
                line = cand.where.rsplit(":", 1)[1]
                cand.id = f"{cand.id}#line{line}"
        for name, k in counts.items():
            if k > 1:
                self.warnings.append(f"{label_csv}: {name} is listed {k} times; those rows share one image file")
        keep = self._check_files_exist(cands)
        if len(keep) != len(cands):
            kept = {id(c) for c in keep}
            votes = [v for c, v in zip(cands, votes) if id(c) in kept]
            cands = keep
        return cands, np.array(votes, dtype=np.int64).reshape(-1, 10), None

    # ---- source layout ------------------------------------------------------------------
    def _read_source(self):
        fer_csv, new_csv = self.root / "fer2013.csv", self.root / "fer2013new.csv"
        for p in (fer_csv, new_csv):
            if not p.is_file():
                raise DatasetError(f"ferplus: {p} not found; the source layout needs both fer2013.csv and "
                                   f"fer2013new.csv (row-aligned). Expected {self.layout_help()}")
        usage = FER2013_USAGE[self.split]
        self.split_source = f"fer2013.csv + fer2013new.csv, Usage={usage}"
        folder = FERPLUS_FOLDERS[self.split]
        need_pixels = not self._cache_ready()
        r_old, c_old, f_old = read_csv_header(fer_csv, ("pixels", "Usage"))
        try:
            r_new, c_new, f_new = read_csv_header(new_csv, ("Usage", "Image name") + VOTE_COLUMNS)
        except BaseException:
            f_old.close()
            raise
        cands: list[Candidate] = []
        votes: list[list[int]] = []
        pixels: list[np.ndarray] = []
        failures: dict[int, str] = {}
        names_all: Counter = Counter()
        vote_cols = [c_new[v] for v in VOTE_COLUMNS]
        try:
            old_rows, new_rows = _csv_rows(r_old, fer_csv), _csv_rows(r_new, new_csv)
            k = -1
            while True:
                a, b = next(old_rows, None), next(new_rows, None)
                if a is None or b is None:
                    if a is not None or b is not None:
                        longer, other = (fer_csv, new_csv) if a is not None else (new_csv, fer_csv)
                        raise DatasetError(f"ferplus: {longer} has more data rows than {other} ({k + 1} rows "
                                           "matched); the two files must be row-aligned")
                    break
                k += 1
                (la, ra), (lb, rb) = a, b
                wa, wb = f"{fer_csv}:{la}", f"{new_csv}:{lb}"
                if len(ra) <= max(c_old.values()) or len(rb) <= max(c_new.values()):
                    bad = wa if len(ra) <= max(c_old.values()) else wb
                    self._problem(DatasetError(f"{bad}: too few fields", item=f"row{k}", where=bad))
                    continue
                ua, ub = ra[c_old["Usage"]].strip(), rb[c_new["Usage"]].strip()
                if ua != ub:
                    raise DatasetError(f"ferplus: {wa} has Usage {ua!r} but {wb} has {ub!r}; the files are not "
                                       "row-aligned")
                name = rb[c_new["Image name"]].strip()
                if name:
                    names_all[name] += 1
                if ua != usage:
                    continue
                if not name:
                    self._exclude(NO_FACE_ROW)
                    continue
                try:
                    v = [int(rb[j]) for j in vote_cols]
                    if min(v) < 0:
                        raise ValueError
                except ValueError:
                    self._problem(DatasetError(f"{wb}: vote counts {[rb[j] for j in vote_cols]} are not "
                                               "non-negative integers", item=f"{folder}/{name}", where=wb))
                    continue
                if need_pixels:
                    try:
                        pixels.append(parse_pixels(ra[c_old["pixels"]], wa))
                    except DatasetError as err:
                        failures[len(cands)] = str(err)
                        pixels.append(np.zeros((FER_SIDE, FER_SIDE), np.uint8))
                cands.append(Candidate(id=f"{folder}/{name}", label=-1, where=f"{wb} (pixels {wa})", row=k))
                votes.append(v)
        finally:
            f_old.close()
            f_new.close()
        if not cands:
            raise DatasetError(f"ferplus: split {self.split!r} is empty: no named rows with Usage={usage} in "
                               f"{new_csv}")
        for cand in cands:
            nm = cand.id.split("/", 1)[1]
            if names_all[nm] > 1:
                cand.id = f"{cand.id}#row{cand.row}"
        dups = sorted(n for n, c in names_all.items() if c > 1)
        if dups:
            self.warnings.append(f"{new_csv}: {len(dups)} image names are used by two rows ({', '.join(dups)}); "
                                 "each row keeps its own pixels, ids get #row<k>")

        def images():
            if not need_pixels:
                return self._reparse(cands)
            return np.stack(pixels), failures

        return cands, np.array(votes, dtype=np.int64).reshape(-1, 10), images

    def _reparse(self, cands):
        fer_csv = self.root / "fer2013.csv"
        rows = {c.row: k for k, c in enumerate(cands)}
        out = np.zeros((len(cands), FER_SIDE, FER_SIDE), np.uint8)
        failures: dict[int, str] = {}
        reader, cols, f = read_csv_header(fer_csv, ("pixels",))
        try:
            for k, (line, row) in enumerate(_csv_rows(reader, fer_csv)):
                j = rows.get(k)
                if j is not None:
                    try:
                        out[j] = parse_pixels(row[cols["pixels"]], f"{fer_csv}:{line}")
                    except DatasetError as err:
                        failures[j] = str(err)
        finally:
            f.close()
        return out, failures
