"""Tests for the real-dataset loaders on tiny fixtures written in each dataset's format.

Every fixture (PNG/JPEG files, CSVs, label files) is generated here in ``tmp_path``,
including broken ones: a missing column, a label out of range, a corrupt or truncated
image, an empty split. Expectations are written out independently of the loaders
(hand-computed FER+ outcomes, array slices, class-by-class label maps).
"""
from __future__ import annotations

import csv
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fer_lab.cli import main as cli_main
from fer_lab.data import AFFECTNET8, DatasetError, build_dataset, build_transform, dataset_splits
from fer_lab.data import errors as errors_mod
from fer_lab.data.ferplus import (MAJ_NF, MAJ_UNKNOWN, NO_EMOTION, NO_MAJORITY, TIE, TOP_UNKNOWN,
                                  ferplus_labels)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def face(seed: int, shape=(48, 48)) -> np.ndarray:
    """A distinct uint8 test image per seed."""
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def save_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def save_jpg(path: Path, arr: np.ndarray) -> np.ndarray:
    """Write a JPEG and return the pixels it decodes to (JPEG is lossy)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=95)
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def corrupt(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not an image at all")


def truncate(path: Path, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    data = buf.getvalue()
    path.write_bytes(data[: len(data) // 2])


# ---------------------------------------------------------------------------------------
# FER+ label modes, hand-computed
# ---------------------------------------------------------------------------------------
#                      neu hap sur sad ang dis fea con unk NF
VOTE_CASES = [
    # single votes are outliers: 5 of the 5 remaining -> neutral (5 of 10 raw would not be a majority)
    ([5, 1, 1, 1, 1, 1, 0, 0, 0, 0], 0, 0, (1, 0, 0, 0, 0, 0, 0, 0)),
    # Microsoft's first training row: 4 of 9 after removing the single sadness vote -> no majority
    ([4, 0, 0, 1, 3, 2, 0, 0, 0, 0], NO_MAJORITY, 0, (4 / 9, 0, 0, 0, 3 / 9, 2 / 9, 0, 0)),
    # tie 5/5: no majority (5 is not more than half of 10), no plurality, probability 0.5/0.5 -> argmax neutral
    ([5, 5, 0, 0, 0, 0, 0, 0, 0, 0], NO_MAJORITY, TIE, (0.5, 0.5, 0, 0, 0, 0, 0, 0)),
    # 4-3-3: plurality neutral, not a majority
    ([4, 3, 3, 0, 0, 0, 0, 0, 0, 0], NO_MAJORITY, 0, (0.4, 0.3, 0.3, 0, 0, 0, 0, 0)),
    # unknown / NF majorities are left out
    ([0, 0, 0, 0, 0, 0, 0, 0, 8, 2], MAJ_UNKNOWN, TOP_UNKNOWN, None),
    ([2, 0, 0, 0, 0, 0, 0, 0, 0, 8], MAJ_NF, TOP_UNKNOWN, None),
    # every vote single: nothing left
    ([1, 1, 1, 1, 1, 1, 1, 1, 1, 1], NO_MAJORITY, NO_EMOTION, None),
    # contempt majority (class 7); the unknown votes count in the total
    ([0, 0, 0, 0, 0, 0, 0, 7, 3, 0], 7, 7, (0, 0, 0, 0, 0, 0, 0, 1)),
    # emotion ties with unknown: plurality tie, probability keeps neutral alone
    ([3, 0, 0, 0, 0, 0, 0, 0, 3, 2], NO_MAJORITY, TIE, (1, 0, 0, 0, 0, 0, 0, 0)),
    # 6 of 10 happiness, a single fear vote removed
    ([0, 6, 0, 0, 0, 0, 1, 0, 3, 0], 1, 1, (0, 1, 0, 0, 0, 0, 0, 0)),
]


@pytest.mark.parametrize("votes,majority,plurality,prob", VOTE_CASES)
def test_ferplus_label_modes_hand_computed(votes, majority, plurality, prob):
    for mode, expected in (("majority", majority), ("plurality", plurality)):
        labels, reasons, soft = ferplus_labels([votes], mode)
        assert soft is None
        if isinstance(expected, str):
            assert labels[0] == -1 and reasons[0] == expected, mode
        else:
            assert labels[0] == expected and reasons[0] is None, mode
    labels, reasons, soft = ferplus_labels([votes], "probability")
    if prob is None:
        assert labels[0] == -1 and reasons[0] is not None
        assert np.all(soft[0] == 0)
    else:
        np.testing.assert_allclose(soft[0], prob, atol=1e-12)
        assert labels[0] == int(np.argmax(prob)) and reasons[0] is None


def test_ferplus_labels_rejects_bad_input():
    with pytest.raises(ValueError, match="label_mode"):
        ferplus_labels([[0] * 10], "vote")
    with pytest.raises(ValueError, match=r"\(N, 10\)"):
        ferplus_labels([[0] * 9], "majority")


# ---------------------------------------------------------------------------------------
# FER+ fixtures: Microsoft's folders and the source CSVs
# ---------------------------------------------------------------------------------------
FERPLUS_ROWS = {  # split -> [(name, votes)]; images are face(number in the name)
    "train": [("fer0000000.png", [5, 1, 1, 1, 1, 1, 0, 0, 0, 0]),    # neutral
              ("fer0000001.png", [0, 6, 0, 0, 0, 0, 1, 0, 3, 0]),    # happiness
              ("fer0000002.png", [0, 0, 9, 0, 0, 0, 1, 0, 0, 0]),    # surprise
              ("fer0000003.png", [5, 5, 0, 0, 0, 0, 0, 0, 0, 0]),    # tie: out (majority)
              ("fer0000004.png", [0, 0, 0, 10, 0, 0, 0, 0, 0, 0]),   # sadness
              ("fer0000005.png", [0, 0, 0, 0, 7, 3, 0, 0, 0, 0]),    # anger
              ("fer0000006.png", [0, 0, 0, 0, 0, 0, 0, 0, 8, 2]),    # unknown: out
              ("fer0000007.png", [0, 0, 0, 0, 0, 8, 2, 0, 0, 0]),    # disgust
              ("fer0000008.png", [0, 0, 0, 0, 0, 0, 10, 0, 0, 0]),   # fear
              ("fer0000009.png", [2, 0, 0, 0, 0, 0, 0, 8, 0, 0])],   # contempt
    "val": [("fer0000010.png", [10, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            ("fer0000011.png", [0, 0, 0, 0, 0, 0, 0, 0, 0, 10])],    # NF: out
    "test": [("fer0000012.png", [0, 10, 0, 0, 0, 0, 0, 0, 0, 0])],
}
FOLDERS = {"train": "FER2013Train", "val": "FER2013Valid", "test": "FER2013Test"}
USAGE = {"train": "Training", "val": "PublicTest", "test": "PrivateTest"}
VOTE_HEADER = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt", "unknown",
               "NF"]


def _num(name: str) -> int:
    return int(name[3:10])


def make_ferplus_folders(root: Path, rows=FERPLUS_ROWS, splits=("train", "val", "test")) -> Path:
    for split in splits:
        d = root / FOLDERS[split]
        d.mkdir(parents=True, exist_ok=True)
        with open(d / "label.csv", "w", newline="") as f:
            w = csv.writer(f)
            for name, votes in rows[split]:
                save_png(d / name, face(_num(name)))
                w.writerow([name, "(0, 0, 48, 48)"] + votes)
    return root


def make_ferplus_source(root: Path, rows=FERPLUS_ROWS, extra=()) -> Path:
    """fer2013.csv + fer2013new.csv, row-aligned; ``extra``: (position, usage, name, votes, pixels) rows."""
    table = []
    for split in ("train", "val", "test"):
        for name, votes in rows[split]:
            table.append((USAGE[split], name, votes, face(_num(name))))
    for pos, usage, name, votes, pixels in extra:
        table.insert(pos, (usage, name, votes, pixels))
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "fer2013.csv", "w", newline="") as f1, open(root / "fer2013new.csv", "w", newline="") as f2:
        w1, w2 = csv.writer(f1), csv.writer(f2)
        w1.writerow(["emotion", "pixels", "Usage"])
        w2.writerow(["Usage", "Image name"] + VOTE_HEADER)
        for usage, name, votes, pixels in table:
            w1.writerow([0, " ".join(str(int(v)) for v in pixels.ravel()), usage])
            w2.writerow([usage, name] + votes)
    return root


EXPECTED_TRAIN = {  # name -> native FER+ class under majority
    "fer0000000.png": 0, "fer0000001.png": 1, "fer0000002.png": 2, "fer0000004.png": 3, "fer0000005.png": 4,
    "fer0000007.png": 5, "fer0000008.png": 6, "fer0000009.png": 7}


def test_ferplus_folders_majority(tmp_path):
    root = make_ferplus_folders(tmp_path / "fp")
    ds = build_dataset("ferplus", root=root, split="train")
    assert ds.layout == "folders"
    assert ds.classes == ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt")
    ids = ds.item_ids()
    assert ids == [f"FER2013Train/{n}" for n in EXPECTED_TRAIN]
    assert list(ds.targets) == list(EXPECTED_TRAIN.values())
    for i, name in enumerate(EXPECTED_TRAIN):
        np.testing.assert_array_equal(ds.load_image(i), face(_num(name)))
    assert ds.excluded == {NO_MAJORITY: 1, MAJ_UNKNOWN: 1}
    np.testing.assert_array_equal(ds.votes[1], [0, 6, 0, 0, 0, 0, 1, 0, 3, 0])
    x, y = ds[0]
    assert x.shape == (1, 48, 48) and x.dtype == torch.float32 and isinstance(y, int)
    val = build_dataset("ferplus", root=root, split="val")
    assert len(val) == 1 and val.excluded == {MAJ_NF: 1}
    assert len(build_dataset("ferplus", root=root, split="test")) == 1
    d = ds.describe()
    assert d["label_mode"] == "majority" and d["split_source"] == "FER2013Train/label.csv"
    assert d["class_counts"] == {c: 1 for c in ds.classes}
    assert d["excluded"] == {NO_MAJORITY: 1, MAJ_UNKNOWN: 1} and d["skipped"] == []


def test_ferplus_source_layout_matches_folders(tmp_path):
    folders = make_ferplus_folders(tmp_path / "folders")
    # a not-a-face row (empty name) in the middle: names are NOT fer<row>.png
    source = make_ferplus_source(tmp_path / "source",
                                 extra=[(2, "Training", "", [0] * 9 + [10], face(999))])
    for split in ("train", "val", "test"):
        a = build_dataset("ferplus", root=folders, split=split)
        b = build_dataset("ferplus", root=source, split=split)
        assert b.layout == "source"
        assert a.item_ids() == b.item_ids()
        assert list(a.targets) == list(b.targets)
        assert a.fingerprint() == b.fingerprint()
        for i in range(len(a)):
            np.testing.assert_array_equal(a.load_image(i), b.load_image(i))
    b = build_dataset("ferplus", root=source, split="train")
    assert b.excluded["empty image name in fer2013new.csv (not a face)"] == 1


def test_ferplus_source_duplicate_names_keep_both_rows(tmp_path):
    # a name used by two rows (as four names are in the real fer2013new.csv): both rows stay, ids disambiguated
    source = make_ferplus_source(tmp_path / "source",
                                 extra=[(5, "Training", "fer0000002.png", [0, 0, 0, 0, 0, 0, 0, 0, 0, 10], face(7)),
                                        (1, "Training", "fer0000008.png", [10, 0, 0, 0, 0, 0, 0, 0, 0, 0], face(77))])
    ds = build_dataset("ferplus", root=source, split="train", label_mode="plurality")
    ids = ds.item_ids()
    dup = [i for i in ids if "#row" in i]
    # rows after the two insertions: 1 = extra fer0000008, 3 = fer0000002, 6 = extra fer0000002 (NF: left out),
    # 10 = fer0000008
    assert sorted(dup) == ["FER2013Train/fer0000002.png#row3", "FER2013Train/fer0000008.png#row1",
                           "FER2013Train/fer0000008.png#row10"]
    k_extra = ids.index("FER2013Train/fer0000008.png#row1")
    np.testing.assert_array_equal(ds.load_image(k_extra), face(77))  # that row's own pixels
    assert ds.targets[k_extra] == 0
    assert any("used by two rows" in w for w in ds.warnings)


def test_ferplus_source_misaligned_and_missing_column(tmp_path):
    source = make_ferplus_source(tmp_path / "s1")
    with open(source / "fer2013new.csv", "a") as f:
        f.write("Training,fer0000099.png,10,0,0,0,0,0,0,0,0,0\n")
    with pytest.raises(DatasetError, match="more data rows"):
        build_dataset("ferplus", root=source, split="train")
    source = make_ferplus_source(tmp_path / "s2")
    text = (source / "fer2013new.csv").read_text().replace(",contempt,", ",contempt_votes,", 1)
    (source / "fer2013new.csv").write_text(text)
    with pytest.raises(DatasetError, match=r"no column 'contempt'.*fer2013new\.csv|fer2013new\.csv.*'contempt'"):
        build_dataset("ferplus", root=source, split="train")


def test_ferplus_layout_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="FER2013Train.*fer2013new.csv"):
        build_dataset("ferplus", root=tmp_path / "empty", split="train")
    with pytest.raises(DatasetError, match="does not exist"):
        build_dataset("ferplus", root=tmp_path / "nowhere", split="train")
    root = make_ferplus_folders(tmp_path / "fp", splits=("train", "val"))
    assert dataset_splits("ferplus", root=root) == ("train", "val")
    assert dataset_splits("ferplus") == ("train", "val", "test")
    with pytest.raises(DatasetError, match=r"FER2013Test.*missing"):
        build_dataset("ferplus", root=root, split="test")


def test_ferplus_bad_rows_fail_fast_or_skip(tmp_path):
    root = make_ferplus_folders(tmp_path / "fp")
    label = root / "FER2013Train" / "label.csv"
    lines = label.read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0] + ",x"          # line 3: a vote that is not a number
    lines[4] = "fer0000004.png,\"(0, 0, 48, 48)\",10,0"   # line 5: too few fields
    label.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"label\.csv:3: vote counts"):
        build_dataset("ferplus", root=root, split="train")
    ds = build_dataset("ferplus", root=root, split="train", on_error="skip")
    skipped = {s["where"].rsplit(":", 1)[1]: s["reason"] for s in ds.describe()["skipped"]}
    assert set(skipped) == {"3", "5"} and "12" in skipped["5"]
    assert "FER2013Train/fer0000002.png" not in ds.item_ids() and len(ds) == 6


def test_ferplus_corrupt_and_truncated_images(tmp_path):
    root = make_ferplus_folders(tmp_path / "fp")
    corrupt(root / "FER2013Train" / "fer0000001.png")
    truncate(root / "FER2013Train" / "fer0000002.png", face(2))
    # default: labels validated now, images lazily -> the error names the file
    ds = build_dataset("ferplus", root=root, split="train")
    with pytest.raises(DatasetError, match=r"fer0000001\.png"):
        ds.load_image(1)
    with pytest.raises(DatasetError, match=r"fer0000002\.png.*truncated|fer0000002\.png"):
        ds.load_image(2)
    # verify=True fails before training starts, naming the files
    with pytest.raises(DatasetError, match=r"2 image\(s\).*fer0000001\.png.*fer0000002\.png"):
        build_dataset("ferplus", root=root, split="train", verify=True)
    # skip: left out and listed
    ds = build_dataset("ferplus", root=root, split="train", on_error="skip")
    assert len(ds) == 6
    reasons = {s["item"]: s["reason"] for s in ds.describe()["skipped"]}
    assert set(reasons) == {"FER2013Train/fer0000001.png", "FER2013Train/fer0000002.png"}
    assert "truncated" in reasons["FER2013Train/fer0000002.png"]
    # a missing image file is caught at construction
    (root / "FER2013Train" / "fer0000004.png").unlink()
    with pytest.raises(DatasetError, match=r"missing.*fer0000004\.png"):
        build_dataset("ferplus", root=root, split="train")


def test_ferplus_empty_split(tmp_path):
    root = make_ferplus_folders(tmp_path / "fp")
    (root / "FER2013Valid" / "label.csv").write_text("")
    with pytest.raises(DatasetError, match=r"split 'val' is empty.*label\.csv"):
        build_dataset("ferplus", root=root, split="val")
    # a split whose every image the label rule leaves out is empty too, and says why
    rows = dict(FERPLUS_ROWS, val=[("fer0000011.png", [0] * 9 + [10])])
    root2 = make_ferplus_folders(tmp_path / "fp2", rows=rows)
    with pytest.raises(DatasetError, match="no usable items.*NF"):
        build_dataset("ferplus", root=root2, split="val")


# ---- probability mode and label spaces ----------------------------------------------------
AFFECTNET_OF_FERPLUS = {"neutral": "neutral", "happiness": "happy", "surprise": "surprise", "sadness": "sad",
                        "anger": "anger", "disgust": "disgust", "fear": "fear", "contempt": "contempt"}


def test_ferplus_probability_mode_sums_to_one_and_reorders(tmp_path):
    root = make_ferplus_folders(tmp_path / "fp")
    native = build_dataset("ferplus", root=root, split="train", label_mode="probability")
    mapped = build_dataset("ferplus", root=root, split="train", label_mode="probability", label_space="affectnet8")
    assert native.item_ids() == mapped.item_ids()
    assert len(native) == 9  # the 5/5 tie stays (a distribution), the unknown majority does not
    np.testing.assert_allclose(native.soft_targets.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(mapped.soft_targets.sum(axis=1), 1.0, atol=1e-6)
    k = native.item_ids().index("FER2013Train/fer0000003.png")   # 5 neutral / 5 happiness
    np.testing.assert_allclose(native.soft_targets[k], [0.5, 0.5, 0, 0, 0, 0, 0, 0])
    k = native.item_ids().index("FER2013Train/fer0000005.png")   # 7 anger / 3 disgust
    np.testing.assert_allclose(native.soft_targets[k], [0, 0, 0, 0, 0.7, 0.3, 0, 0], atol=1e-6)
    for j, cls in enumerate(native.classes):   # column by column
        col = AFFECTNET8.index(AFFECTNET_OF_FERPLUS[cls])
        np.testing.assert_allclose(mapped.soft_targets[:, col], native.soft_targets[:, j])
    x, y = mapped[k]
    assert y.dtype == torch.float32 and y.shape == (8,)
    np.testing.assert_allclose(y.numpy(), mapped.soft_targets[k])
    assert int(mapped.targets[k]) == AFFECTNET8.index("anger") == int(y.argmax())
    # targets are the argmax (for class balancing); ties go to the lowest native index
    tie = native.item_ids().index("FER2013Train/fer0000003.png")
    assert native.targets[tie] == 0 and mapped.targets[tie] == AFFECTNET8.index("neutral")
    # default collate stacks soft targets into (B, K)
    xb, yb = next(iter(DataLoader(mapped, batch_size=4)))
    assert yb.shape == (4, 8) and yb.dtype == torch.float32
    assert mapped.describe()["label_mode"] == "probability"
    assert native.fingerprint() != build_dataset("ferplus", root=root, split="train").fingerprint()


def test_ferplus_label_space_class_by_class_and_unmapped(tmp_path):
    root = make_ferplus_folders(tmp_path / "fp")
    native = build_dataset("ferplus", root=root, split="train")
    mapped = build_dataset("ferplus", root=root, split="train", label_space="affectnet8")
    assert mapped.classes == AFFECTNET8
    for t_native, t_mapped in zip(native.targets, mapped.targets):
        assert AFFECTNET8[t_mapped] == AFFECTNET_OF_FERPLUS[native.classes[t_native]]
    # affectnet7 has no contempt: a clear error, unless dropping is asked for (and recorded)
    with pytest.raises(DatasetError, match=r"contempt.*affectnet7.*drop_unmapped"):
        build_dataset("ferplus", root=root, split="train", label_space="affectnet7")
    ds = build_dataset("ferplus", root=root, split="train", label_space="affectnet7", drop_unmapped=True)
    assert len(ds) == 7 and ds.dropped_unmapped == {"contempt": 1}
    assert ds.describe()["dropped_unmapped"] == {"contempt": 1}
    # probability mode: contempt votes removed, the rest renormalised
    rows = dict(FERPLUS_ROWS, train=[("fer0000000.png", [6, 0, 0, 0, 0, 0, 0, 4, 0, 0]),
                                     ("fer0000001.png", [0, 10, 0, 0, 0, 0, 0, 0, 0, 0])])
    root2 = make_ferplus_folders(tmp_path / "fp2", rows=rows)
    p7 = build_dataset("ferplus", root=root2, split="train", label_mode="probability", label_space="affectnet7",
                       drop_unmapped=True)
    np.testing.assert_allclose(p7.soft_targets, [[1, 0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0]])


# ---------------------------------------------------------------------------------------
# FER2013
# ---------------------------------------------------------------------------------------
FER2013_TO_AFFECTNET = {0: "anger", 1: "disgust", 2: "fear", 3: "happy", 4: "sad", 5: "surprise", 6: "neutral"}


def make_fer2013(root: Path, rows) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "fer2013.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["emotion", "pixels", "Usage"])
        for emotion, pixels, usage in rows:
            w.writerow([emotion, pixels if isinstance(pixels, str) else " ".join(map(str, pixels.ravel())), usage])
    return root


def fer2013_rows():
    rows = [(k, face(100 + k), "Training") for k in range(7)]
    rows += [(6, face(200), "PublicTest"), (3, face(201), "PrivateTest"), (0, face(202), "PrivateTest")]
    return rows


def test_fer2013_splits_labels_pixels_and_label_space(tmp_path):
    root = make_fer2013(tmp_path / "fer", fer2013_rows())
    ds = build_dataset("fer2013", root=root, split="train")
    assert ds.classes == ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
    assert list(ds.targets) == list(range(7))
    for k in range(7):
        np.testing.assert_array_equal(ds.load_image(k), face(100 + k))
    assert ds.item_ids()[0] == "fer2013.csv#row0"
    val, test = (build_dataset("fer2013", root=root, split=s) for s in ("val", "test"))
    assert list(val.targets) == [6] and list(test.targets) == [3, 0]
    assert test.item_ids() == ["fer2013.csv#row8", "fer2013.csv#row9"]
    np.testing.assert_array_equal(test.load_image(1), face(202))
    mapped = build_dataset("fer2013", root=root, split="train", label_space="affectnet8")
    for k in range(7):
        assert AFFECTNET8[mapped.targets[k]] == FER2013_TO_AFFECTNET[k]
    # the root may also be the CSV itself
    assert len(build_dataset("fer2013", root=root / "fer2013.csv", split="train")) == 7


def test_fer2013_bad_input(tmp_path):
    rows = fer2013_rows()
    rows[3] = (9, rows[3][1], "Training")               # line 5: label out of range
    rows[5] = (5, "1 2 3", "Training")                 # line 7: truncated pixel string
    root = make_fer2013(tmp_path / "fer", rows)
    with pytest.raises(DatasetError, match=r"fer2013\.csv:5: emotion '9'"):
        build_dataset("fer2013", root=root, split="train")
    ds = build_dataset("fer2013", root=root, split="train", on_error="skip")
    where = sorted(s["where"].rsplit(":", 1)[1] for s in ds.skipped)
    assert where == ["5", "7"] and len(ds) == 5
    assert "3 pixel values, expected 2304" in " ".join(s["reason"] for s in ds.skipped)
    # missing column: names the column and the file
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "fer2013.csv").write_text("emotion,Usage\n0,Training\n")
    with pytest.raises(DatasetError, match=r"fer2013\.csv.*no column 'pixels'"):
        build_dataset("fer2013", root=tmp_path / "bad", split="train")
    with pytest.raises(DatasetError, match=r"fer2013\.csv.*Usage.*PrivateTest|expected.*fer2013\.csv"):
        build_dataset("fer2013", root=tmp_path, split="train")
    only_train = make_fer2013(tmp_path / "t", [(0, face(1), "Training")])
    with pytest.raises(DatasetError, match="split 'test' is empty.*PrivateTest"):
        build_dataset("fer2013", root=only_train, split="test")


def test_fer2013_cache_skips_pixel_parsing(tmp_path, monkeypatch):
    root = make_fer2013(tmp_path / "fer", fer2013_rows())
    cache = tmp_path / "cache"
    a = build_dataset("fer2013", root=root, split="train", cache=cache)
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".npy")  # no temp file left
    import fer_lab.data.fer2013 as fer_mod

    def boom(*args, **kwargs):
        raise AssertionError("pixels parsed although the cache holds them")

    monkeypatch.setattr(fer_mod, "parse_pixels", boom)
    b = build_dataset("fer2013", root=root, split="train", cache=cache)
    for k in range(7):
        np.testing.assert_array_equal(b.load_image(k), a.load_image(k))


# ---------------------------------------------------------------------------------------
# RAF-DB
# ---------------------------------------------------------------------------------------
RAFDB_TO_AFFECTNET = {1: "surprise", 2: "fear", 3: "disgust", 4: "happy", 5: "sad", 6: "anger", 7: "neutral"}


def make_rafdb(root: Path, train_labels=(1, 2, 3, 4, 5, 6, 7), test_labels=(7, 4), original=False):
    lines, decoded = [], {}
    for split, labels in (("train", train_labels), ("test", test_labels)):
        for k, lab in enumerate(labels, start=1):
            name = f"{split}_{k:05d}.jpg"
            arr = face(k + (0 if split == "train" else 50), (20, 20, 3))
            decoded[name] = save_jpg(root / "Image" / "aligned" / f"{split}_{k:05d}_aligned.jpg", arr)
            if original:
                save_jpg(root / "Image" / "original" / name, 255 - arr)
            lines.append(f"{name} {lab}")
    (root / "EmoLabel").mkdir(parents=True, exist_ok=True)
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    return root, decoded


def test_rafdb_labels_images_and_label_space(tmp_path):
    root, decoded = make_rafdb(tmp_path / "raf", original=True)
    ds = build_dataset("rafdb", root=root, split="train")
    assert ds.classes == ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")
    assert list(ds.targets) == list(range(7))  # file labels 1..7 -> 0..6
    assert ds.item_ids()[0] == "train_00001.jpg"
    np.testing.assert_array_equal(ds.load_image(0), decoded["train_00001.jpg"])
    assert ds.load_image(0).shape == (20, 20, 3)
    test = build_dataset("rafdb", root=root, split="test")
    assert list(test.targets) == [6, 3]
    mapped = build_dataset("rafdb", root=root, split="train", label_space="affectnet8")
    for k in range(7):
        assert AFFECTNET8[mapped.targets[k]] == RAFDB_TO_AFFECTNET[k + 1]
    with pytest.raises(ValueError, match=r"unknown split 'val'.*\('train', 'test'\)"):
        build_dataset("rafdb", root=root, split="val")
    # original images when asked; aligned_or_original falls back per file
    orig = build_dataset("rafdb", root=root, split="train", images="original")
    assert orig.item_ids() == ds.item_ids() and orig.describe()["pixel_options"] == {"images": "original"}
    assert not np.array_equal(orig.load_image(0), ds.load_image(0))
    (root / "Image" / "aligned" / "train_00002_aligned.jpg").unlink()
    with pytest.raises(DatasetError, match=r"missing.*train_00002_aligned\.jpg"):
        build_dataset("rafdb", root=root, split="train")
    mixed = build_dataset("rafdb", root=root, split="train", images="aligned_or_original")
    assert len(mixed) == 7 and any("Image/original" in w for w in mixed.warnings)
    np.testing.assert_array_equal(mixed.load_image(1), orig.load_image(1))


def test_rafdb_bad_label_and_corrupt_image(tmp_path):
    root, _ = make_rafdb(tmp_path / "raf")
    label = root / "EmoLabel" / "list_patition_label.txt"
    lines = label.read_text().splitlines()
    lines[3] = "train_00004.jpg 8"
    label.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"list_patition_label\.txt:4: label '8'"):
        build_dataset("rafdb", root=root, split="train")
    lines[3] = "train_00004.jpg 4"
    label.write_text("\n".join(lines) + "\n")
    corrupt(root / "Image" / "aligned" / "train_00003_aligned.jpg")
    with pytest.raises(DatasetError, match=r"train_00003_aligned\.jpg"):
        build_dataset("rafdb", root=root, split="train", cache="memory")
    ds = build_dataset("rafdb", root=root, split="train", on_error="skip")
    assert len(ds) == 6 and ds.skipped[0]["item"] == "train_00003.jpg"
    with pytest.raises(DatasetError, match=r"list_patition_label\.txt"):
        build_dataset("rafdb", root=tmp_path, split="train")


# ---------------------------------------------------------------------------------------
# AffectNet
# ---------------------------------------------------------------------------------------
AFFECTNET_COLUMNS = ["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
                     "facial_landmarks", "expression", "valence", "arousal"]


def make_affectnet(root: Path, rows_by_csv) -> Path:
    """rows: (relpath, image HxWx3 or None, x, y, w, h, expression, valence, arousal)."""
    for csv_name, rows in rows_by_csv.items():
        root.mkdir(parents=True, exist_ok=True)
        with open(root / csv_name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(AFFECTNET_COLUMNS)
            for rel, img, x, y, fw, fh, expr, val, aro in rows:
                if img is not None:
                    save_png(root / "Manually_Annotated_Images" / rel, img)
                w.writerow([rel, x, y, fw, fh, "1.0;2.0", expr, val, aro])
    return root


def _gradient_image(h=60, w=80) -> np.ndarray:
    """Rows and columns distinguishable: R = row, G = column, B = row + column."""
    r, c = np.mgrid[0:h, 0:w]
    return np.stack([r * 4, c * 3, (r + c) * 2], axis=-1).astype(np.uint8)


def affectnet_fixture(tmp_path):
    img = _gradient_image()
    train = [("1/a.png", img, 10, 5, 30, 20, 1, 0.5, 0.25),      # happy; x = column 10, y = row 5
             ("1/b.png", face(3, (40, 40, 3)), 0, 0, 40, 40, 0, -0.1, 0.2),
             ("2/c.png", None, 0, 0, 40, 40, 8, -2, -2),          # none: left out
             ("2/d.png", None, 0, 0, 40, 40, 10, -2, -2),         # no-face: left out
             ("2/e.png", face(4, (40, 40, 3)), 5, 5, 20, 20, 7, 0.0, 0.9)]   # contempt
    test = [("3/f.png", face(5, (40, 40, 3)), 0, 0, 40, 40, 6, -0.5, 0.5)]
    return make_affectnet(tmp_path / "an", {"training.csv": train, "validation.csv": test}), img


def test_affectnet_crop_axes_labels_and_valence_arousal(tmp_path):
    root, img = affectnet_fixture(tmp_path)
    ds = build_dataset("affectnet", root=root, split="train")
    assert ds.classes == AFFECTNET8 and ds.item_ids() == ["1/a.png", "1/b.png", "2/e.png"]
    assert list(ds.targets) == [1, 0, 7]
    crop = ds.load_image(0)
    np.testing.assert_array_equal(crop, img[5:5 + 20, 10:10 + 30])   # face_x is the column
    assert crop.shape == (20, 30, 3)
    assert not np.array_equal(crop[:, :20], img[10:30, 5:25])        # the public code's swapped crop differs
    assert ds.excluded == {"expression 8 (none)": 1, "expression 10 (no-face)": 1}
    assert ds.describe()["excluded"] == ds.excluded
    np.testing.assert_allclose(ds.valence_arousal, [[0.5, 0.25], [-0.1, 0.2], [0.0, 0.9]])
    test = build_dataset("affectnet", root=root, split="test")
    assert list(test.targets) == [6] and dataset_splits("affectnet", root=root) == ("train", "test")
    # label spaces class by class: AffectNet's own order is affectnet8; affectnet7 lacks contempt
    mapped = build_dataset("affectnet", root=root, split="train", label_space="affectnet8")
    assert [AFFECTNET8[t] for t in mapped.targets] == ["happy", "neutral", "contempt"]
    with pytest.raises(DatasetError, match=r"contempt.*affectnet7"):
        build_dataset("affectnet", root=root, split="train", label_space="affectnet7")
    seven = build_dataset("affectnet", root=root, split="train", label_space="affectnet7", drop_unmapped=True)
    assert seven.item_ids() == ["1/a.png", "1/b.png"] and seven.dropped_unmapped == {"contempt": 1}
    np.testing.assert_allclose(seven.valence_arousal, [[0.5, 0.25], [-0.1, 0.2]])
    whole = build_dataset("affectnet", root=root, split="train", crop=False)
    np.testing.assert_array_equal(whole.load_image(0), img)
    with pytest.raises(DatasetError, match="image_size"):
        build_dataset("affectnet", root=root, split="train", cache=tmp_path / "c")


def test_affectnet_cache_of_resized_crops(tmp_path, monkeypatch):
    root, img = affectnet_fixture(tmp_path)
    cache = tmp_path / "cache"
    plain = build_dataset("affectnet", root=root, split="train", image_size=16)
    cached = build_dataset("affectnet", root=root, split="train", image_size=16, cache=cache, cache_workers=0)
    assert cached.cache_file.parent == cache and cached.cache_file.suffix == ".npy"
    assert np.load(cached.cache_file, mmap_mode="r").shape == (3, 16, 16, 3)
    for i in range(3):
        np.testing.assert_array_equal(cached.load_image(i), plain.load_image(i))
    expected = np.asarray(Image.fromarray(img[5:25, 10:40]).resize((16, 16), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(cached.load_image(0), expected)
    # a second build reads the cache, never the image files
    monkeypatch.setattr("fer_lab.data.real.read_image", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    again = build_dataset("affectnet", root=root, split="train", image_size=16, cache=cache)
    assert again.cache_file == cached.cache_file
    np.testing.assert_array_equal(again.load_image(2), cached.load_image(2))
    # another size is another cache file
    monkeypatch.undo()
    other = build_dataset("affectnet", root=root, split="train", image_size=24, cache=cache)
    assert other.cache_file != cached.cache_file
    assert other.describe()["image_size"] == [24, 24]


def test_affectnet_bad_rows(tmp_path):
    root, _ = affectnet_fixture(tmp_path)
    text = (root / "training.csv").read_text().splitlines()
    text[2] = text[2].replace(",0,-0.1,", ",11,-0.1,")     # line 3: expression 11
    (root / "training.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(DatasetError, match=r"training\.csv:3: expression '11'"):
        build_dataset("affectnet", root=root, split="train")
    ds = build_dataset("affectnet", root=root, split="train", on_error="skip")
    assert ds.item_ids() == ["1/a.png", "2/e.png"] and ds.skipped[0]["where"].endswith("training.csv:3")
    (root / "validation.csv").write_text("subDirectory_filePath,face_x,face_y,face_width,expression,valence,arousal\n")
    with pytest.raises(DatasetError, match=r"validation\.csv.*no column 'face_height'"):
        build_dataset("affectnet", root=root, split="test")


# ---------------------------------------------------------------------------------------
# image folders
# ---------------------------------------------------------------------------------------
def test_folder_flat_and_split_layouts(tmp_path):
    flat = tmp_path / "flat"
    for k, cls in enumerate(("sad", "happy", "Neutral")):
        for j in range(2):
            save_png(flat / cls / f"{j}.png", face(10 * k + j, (12, 12)))
    (flat / "happy" / "notes.txt").write_text("not an image")
    ds = build_dataset("folder", root=flat, split="train")
    assert ds.classes == ("Neutral", "happy", "sad")          # sorted folder names
    assert ds.item_ids()[:2] == ["Neutral/0.png", "Neutral/1.png"]
    assert list(ds.targets) == [0, 0, 1, 1, 2, 2]
    assert ds.load_image(0).shape == (12, 12, 3)               # grayscale files become RGB
    np.testing.assert_array_equal(ds.load_image(0)[..., 1], face(20, (12, 12)))
    assert any("non-image" in w for w in ds.warnings)
    assert dataset_splits("folder", root=flat) == ("train",)
    with pytest.raises(DatasetError, match="flat layout"):
        build_dataset("folder", root=flat, split="val")
    mapped = build_dataset("folder", root=flat, split="train", label_space="affectnet8")
    assert [AFFECTNET8[t] for t in mapped.targets] == ["neutral"] * 2 + ["happy"] * 2 + ["sad"] * 2
    gray = build_dataset("folder", root=flat, split="train", color="L", classes=["sad", "happy", "Neutral"])
    assert list(gray.targets) == [0, 0, 1, 1, 2, 2] and gray.load_image(0).shape == (12, 12)

    split = tmp_path / "split"
    for sp in ("train", "validation"):
        for cls in ("anger", "surprise", "contempt_like"):
            save_png(split / sp / cls / "x.png", face(1, (10, 10)))
    save_png(split / "train" / "fear" / "y.png", face(2, (10, 10)))
    assert dataset_splits("folder", root=split) == ("train", "val")
    val = build_dataset("folder", root=split, split="val")
    assert val.classes == ("anger", "contempt_like", "fear", "surprise")   # the union over splits
    assert any("fear" in w for w in val.warnings)
    with pytest.raises(DatasetError, match=r"contempt_like.*affectnet8.*drop_unmapped"):
        build_dataset("folder", root=split, split="train", label_space="affectnet8")
    dropped = build_dataset("folder", root=split, split="train", label_space="affectnet8", drop_unmapped=True)
    assert dropped.dropped_unmapped == {"contempt_like": 1} and len(dropped) == 3
    with pytest.raises(DatasetError, match=r"split 'test' expects .*test/<class>"):
        build_dataset("folder", root=split, split="test")
    (split / "empty" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="split 'train' is empty"):
        build_dataset("folder", root=split / "empty", split="train")


def test_folder_mixed_sizes_need_image_size_for_a_cache(tmp_path):
    root = tmp_path / "f"
    save_png(root / "a" / "1.png", face(1, (10, 10)))
    save_png(root / "a" / "2.png", face(2, (12, 14)))
    save_png(root / "b" / "3.png", face(3, (10, 10)))
    ds = build_dataset("folder", root=root, split="train")   # fine without a cache
    assert ds.load_image(1).shape == (12, 14, 3)
    with pytest.raises(DatasetError, match=r"2\.png.*image_size"):
        build_dataset("folder", root=root, split="train", cache="memory")
    ok = build_dataset("folder", root=root, split="train", cache="memory", image_size=8)
    assert ok.load_image(1).shape == (8, 8, 3)


# ---------------------------------------------------------------------------------------
# caching, workers, pickling, transforms
# ---------------------------------------------------------------------------------------
def test_cache_is_reused_and_records_failures(tmp_path, monkeypatch):
    root = make_ferplus_folders(tmp_path / "fp")
    corrupt(root / "FER2013Train" / "fer0000005.png")
    cache = tmp_path / "cache"
    ds = build_dataset("ferplus", root=root, split="train", cache=cache, on_error="skip")
    assert len(ds) == 7 and ds.skipped[0]["item"] == "FER2013Train/fer0000005.png"
    meta = json.loads(ds.cache_file.with_suffix(".json").read_text())
    assert len(meta["failures"]) == 1 and meta["shape"] == [10, 48, 48]  # every label row, excluded ones too
    # reopened without decoding anything: the failure is replayed from the sidecar
    monkeypatch.setattr("fer_lab.data.real.read_image", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    again = build_dataset("ferplus", root=root, split="train", cache=cache, on_error="skip",
                          label_mode="probability")  # another label mode shares the pixels
    assert again.cache_file == ds.cache_file and again.skipped[0]["item"] == "FER2013Train/fer0000005.png"
    with pytest.raises(DatasetError, match=r"fer0000005\.png"):
        build_dataset("ferplus", root=root, split="train", cache=cache)
    np.testing.assert_array_equal(again.load_image(0), face(0))
    # in a DataLoader with worker processes, the memory map is reopened per worker
    monkeypatch.undo()
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._store is None
    np.testing.assert_array_equal(clone.load_image(3), ds.load_image(3))
    ds.transform = build_transform("esr_train", 32)
    batches = list(DataLoader(ds, batch_size=4, num_workers=2))
    assert batches[0][0].shape == (4, 3, 32, 32) and sum(len(b[1]) for b in batches) == 7


def test_cache_parallel_build_matches_serial(tmp_path):
    root = tmp_path / "f"
    for i in range(300):
        save_png(root / ("a" if i % 2 else "b") / f"{i:03d}.png", face(i, (8, 8)))
    serial = build_dataset("folder", root=root, split="train", cache=tmp_path / "c1")
    parallel = build_dataset("folder", root=root, split="train", cache=tmp_path / "c2", cache_workers=2)
    np.testing.assert_array_equal(np.load(serial.cache_file), np.load(parallel.cache_file))
    assert not list((tmp_path / "c2").glob("*.tmp"))


def test_describe_is_a_fingerprint(tmp_path):
    root = make_ferplus_folders(tmp_path / "fp")
    a = build_dataset("ferplus", root=root, split="train")
    b = build_dataset("ferplus", root=root, split="train")
    c = build_dataset("ferplus", root=root, split="train", image_size=32)
    d = a.describe([0, 2])
    assert d["size"] == 2 and d["class_counts"]["neutral"] == 1 and d["class_counts"]["surprise"] == 1
    assert a.describe() == b.describe()
    assert a.fingerprint() != c.fingerprint() and c.describe()["image_size"] == [32, 32]
    json.dumps(a.describe())   # JSON-able for dataset.json


def test_unknown_dataset_split_and_options():
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("ferplus2", root=".")
    with pytest.raises(ValueError, match="unknown split"):
        build_dataset("rafdb", root=".", split="val")
    with pytest.raises(ValueError, match="needs a data root|data root is needed"):
        build_dataset("fer2013", split="train")
    with pytest.raises(ValueError, match="on_error"):
        build_dataset("ferplus", root=".", split="train", on_error="ignore")
    with pytest.raises(ValueError, match="ferplus: .*label_mod.*unknown dataset option"):
        build_dataset("ferplus", root=".", split="train", label_mod="majority")
    with pytest.raises(ValueError, match="label_mode"):
        build_dataset("ferplus", root=".", split="train", label_mode="soft")


def test_read_image_box_is_column_row(tmp_path):
    img = _gradient_image(30, 50)
    save_png(tmp_path / "g.png", img)
    np.testing.assert_array_equal(errors_mod.read_image(tmp_path / "g.png", box=(7, 3, 20, 10)), img[3:13, 7:27])
    # clipped at the border, and a box outside the image is an error naming the file
    np.testing.assert_array_equal(errors_mod.read_image(tmp_path / "g.png", box=(40, 25, 20, 10)), img[25:30, 40:50])
    with pytest.raises(DatasetError, match=r"g\.png.*outside"):
        errors_mod.read_image(tmp_path / "g.png", box=(60, 0, 5, 5))


# ---------------------------------------------------------------------------------------
# python -m fer_lab data check
# ---------------------------------------------------------------------------------------
def _tree(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_data_check_lists_every_problem_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = make_ferplus_folders(tmp_path / "fp")
    rc = cli_main(["data", "check", "ferplus", str(root)])
    out = capsys.readouterr().out
    assert rc == 0 and "no problems found" in out
    assert "[train] 8 items" in out and "[val] 1 items" in out and "[test] 1 items" in out
    assert "neutral" in out and "majority is unknown" in out
    corrupt(root / "FER2013Train" / "fer0000001.png")
    truncate(root / "FER2013Train" / "fer0000002.png", face(2))
    lines = (root / "FER2013Valid" / "label.csv").read_text().splitlines()
    (root / "FER2013Valid" / "label.csv").write_text(lines[0] + "\nfer0000011.png,box,1,2\n")
    import shutil
    shutil.rmtree(root / "FER2013Test")
    before = _tree(tmp_path)
    rc = cli_main(["data", "check", "ferplus", str(root), "--label-mode", "probability"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "fer0000001.png" in out and "fer0000002.png" in out and "truncated" in out
    assert "label.csv:2" in out and "splits not present" in out and "3 problem(s) found" in out
    assert "label_mode probability" in out
    assert _tree(tmp_path) == before   # writes nothing
    rc = cli_main(["data", "check", "rafdb", str(tmp_path / "nothing"), "--split", "train"])
    out = capsys.readouterr().out
    assert rc == 1 and "list_patition_label.txt" in out


@pytest.mark.parametrize("angle,tx,ty,scale,flip", [(0, 0, 0, 1, False), (0, 0, 0, 1, True), (0, 0.1, 0, 1, False),
                                                    (30, 0, 0, 1, False), (-17, 0.1, -0.05, 1.1, False),
                                                    (12, 0.05, 0.1, 0.9, True)])
def test_batch_affine_equals_torchvision_per_face(angle, tx, ty, scale, flip):
    """The batch warp of a face = torchvision's flip then affine of that face (bilinear, same parameters)."""
    from torchvision.transforms.v2 import functional as TF

    from fer_lab.data.transforms import BatchAffine

    x = torch.rand(1, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    params = {"angle": torch.tensor([float(angle)], dtype=torch.float64), "flip": torch.tensor([flip]),
              "scale": torch.tensor([float(scale)], dtype=torch.float64),
              "tx": torch.tensor([float(tx)], dtype=torch.float64), "ty": torch.tensor([float(ty)], dtype=torch.float64)}
    grid = torch.nn.functional.affine_grid(BatchAffine.theta(params).float(), [1, 3, 20, 20], align_corners=False)
    out = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    src = TF.horizontal_flip(x[0]) if flip else x[0]
    ref = TF.affine(src, angle=angle, translate=[tx * 20, ty * 20], scale=scale, shear=[0.0, 0.0],
                    interpolation=TF.InterpolationMode.BILINEAR)
    assert torch.allclose(out[0], ref, atol=1e-5)


def test_batch_preset_light_batch():
    from fer_lab.data.transforms import BatchAffine, batch_transform

    face = torch.randint(0, 256, (1, 48, 48), dtype=torch.uint8)
    assert torch.equal(build_transform("light_batch", 48)(face), build_transform("eval", 48)(face))   # per face: eval
    assert batch_transform("light_train") is None and batch_transform(None) is None
    aug = batch_transform("light_batch")
    torch.manual_seed(0)
    p = aug.sample(20000)                                 # light_train's distributions
    assert p["angle"].abs().max() <= 10 and abs(float(p["angle"].mean())) < 0.2
    assert 0.95 <= float(p["scale"].min()) and float(p["scale"].max()) <= 1.05
    assert p["tx"].abs().max() <= 0.1 and p["ty"].abs().max() <= 0.1 and abs(float(p["flip"].float().mean()) - 0.5) < 0.02
    x = torch.rand(8, 3, 48, 48).contiguous(memory_format=torch.channels_last)
    y = aug(x)
    assert y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(y, x) and torch.equal(aug.eval()(x), x)   # identity in eval mode
    with pytest.raises(ValueError, match="random_erasing with the batch preset"):
        build_transform("light_batch", 48, random_erasing=True)
    with pytest.raises(ValueError, match="degrees >= 0"):
        BatchAffine(degrees=-1)
