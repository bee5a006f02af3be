"""FER+ loaders on the real data in ``../shared/data/ferplus/`` (skipped when absent).

The archive ``ferplus_train_valid.tar.gz`` (FER2013Train + FER2013Valid in Microsoft's
layout, no FER2013Test) is unpacked once into ``outputs/cache/ferplus_shared/`` under
the repository root and reused by later runs. ``FER_LAB_SHARED_DATA`` overrides where
the shared data directory is (the one holding ``ferplus/``).

Checks: Microsoft's majority rule keeps exactly 25,045 train / 3,191 valid images with
the class distribution below; the split without FER2013Test; the original FER2013
labels file agrees with the folders; the source layout (fer2013.csv + fer2013new.csv)
rebuilt from real rows gives the same items; one short training run of a small ESR.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fer_lab.data import AFFECTNET8, DatasetError, build_dataset, dataset_splits
from fer_lab.data.cache import unpack_once
from fer_lab.data.ferplus import FERPLUS_CLASSES, MAJ_NF, MAJ_UNKNOWN, NO_MAJORITY

pytestmark = pytest.mark.realdata

REPO = Path(__file__).resolve().parents[1]
_shared = os.environ.get("FER_LAB_SHARED_DATA")
SHARED = (Path(_shared) if _shared else Path(__file__).resolve().parents[2] / "shared" / "data")
SHARED = SHARED if (SHARED / "ferplus_train_valid.tar.gz").exists() else SHARED / "ferplus"
ARCHIVE = SHARED / "ferplus_train_valid.tar.gz"
ORIGINAL_LABELS = SHARED / "fer2013_original_labels_train_valid.csv"
UNPACKED = REPO / "outputs" / "cache" / "ferplus_shared"

# Microsoft's majority rule on the shared copy (counted independently with numpy when written).
TRAIN_COUNTS = {"neutral": 8733, "happiness": 7284, "surprise": 3136, "sadness": 3022, "anger": 2098,
                "disgust": 116, "fear": 536, "contempt": 120}
VALID_COUNTS = {"neutral": 1180, "happiness": 862, "surprise": 411, "sadness": 348, "anger": 289,
                "disgust": 25, "fear": 60, "contempt": 16}


@pytest.fixture(scope="module")
def ferplus_root() -> Path:
    """The unpacked archive (unpacked once, atomically, reused across runs)."""
    if not ARCHIVE.is_file():
        pytest.skip(f"real FER+ data not found at {ARCHIVE}")
    return unpack_once(ARCHIVE, UNPACKED)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ferplus_cache")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_majority_counts_and_class_distribution(ferplus_root):
    train = build_dataset("ferplus", root=ferplus_root, split="train")
    val = build_dataset("ferplus", root=ferplus_root, split="val")
    assert len(train) == 25_045 and len(val) == 3_191
    assert train.class_counts() == TRAIN_COUNTS
    assert val.class_counts() == VALID_COUNTS
    assert train.excluded == {NO_MAJORITY: 3434, MAJ_UNKNOWN: 77, MAJ_NF: 2}
    assert val.excluded == {NO_MAJORITY: 377, MAJ_UNKNOWN: 11}
    assert len(train.describe()["skipped"]) == 0
    # the same counts in ESR's (AffectNet) order
    mapped = build_dataset("ferplus", root=ferplus_root, split="train", label_space="affectnet8")
    names = dict(zip(FERPLUS_CLASSES, ("neutral", "happy", "surprise", "sad", "anger", "disgust", "fear",
                                       "contempt")))
    assert mapped.class_counts() == {names[c]: n for c, n in TRAIN_COUNTS.items()}
    assert list(mapped.class_counts()) == list(AFFECTNET8)


def test_no_test_split_in_the_shared_copy(ferplus_root):
    assert dataset_splits("ferplus", root=ferplus_root) == ("train", "val")
    with pytest.raises(DatasetError, match="FER2013Test"):
        build_dataset("ferplus", root=ferplus_root, split="test")


def test_probability_mode_on_real_votes(ferplus_root):
    ds = build_dataset("ferplus", root=ferplus_root, split="val", label_mode="probability", label_space="affectnet8")
    soft = ds.soft_targets
    assert soft.shape == (len(ds), 8) and len(ds) == 3_555
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, atol=1e-5)
    # targets are the argmax of the distribution (lowest native index on ties)
    assert np.all(soft[np.arange(len(ds)), ds.targets] == soft.max(axis=1))
    maj = build_dataset("ferplus", root=ferplus_root, split="val", label_space="affectnet8")
    common = {i: k for k, i in enumerate(ds.item_ids())}
    agree = [ds.targets[common[i]] == t for i, t in zip(maj.item_ids(), maj.targets)]
    assert all(agree)  # every majority image is kept with the same label


def test_cache_matches_png_decoding(ferplus_root, cache_dir):
    plain = build_dataset("ferplus", root=ferplus_root, split="val")
    cached = build_dataset("ferplus", root=ferplus_root, split="val", cache=cache_dir)
    assert cached.item_ids() == plain.item_ids()
    for i in np.linspace(0, len(plain) - 1, 25).astype(int):
        np.testing.assert_array_equal(cached.load_image(int(i)), plain.load_image(int(i)))
    assert np.load(cached.cache_file, mmap_mode="r").shape == (3_579, 48, 48)


def _original_rows():
    if not ORIGINAL_LABELS.is_file():
        pytest.skip(f"{ORIGINAL_LABELS} not found")
    with open(ORIGINAL_LABELS, newline="") as f:
        return list(csv.DictReader(f))


def test_original_fer2013_labels_are_consistent(ferplus_root):
    rows = _original_rows()
    folder = {"Training": "FER2013Train", "PublicTest": "FER2013Valid"}
    listed = {}
    for split in ("FER2013Train", "FER2013Valid"):
        with open(ferplus_root / split / "label.csv", newline="") as f:
            for r in csv.reader(f):
                listed[r[0]] = split
    unique = [r for r in rows if r["label_status"] == "unique"]
    assert len(rows) == 32_298 and len(unique) == 29_825
    # every reliable row names an image that exists in the folder of its Usage
    for r in unique:
        assert listed.get(r["image"]) == folder[r["Usage"]], r
        assert 0 <= int(r["fer2013_emotion"]) <= 6
    assert all(not r["image"] for r in rows if r["label_status"] == "no_image_NF_removed")
    # FER2013 happy faces are mostly FER+ happiness (the relabelling keeps clear cases)
    train = build_dataset("ferplus", root=ferplus_root, split="train")
    label_of = dict(zip((i.split("/", 1)[1] for i in train.item_ids()), train.targets))
    happy = [label_of[r["image"]] for r in unique if r["fer2013_emotion"] == "3" and r["image"] in label_of]
    assert np.mean(np.array(happy) == FERPLUS_CLASSES.index("happiness")) > 0.9


def test_source_layout_rebuilt_from_real_rows(ferplus_root, tmp_path):
    """fer2013.csv + fer2013new.csv rebuilt from real rows (first 1,500 plus the rows whose
    names appear twice) give the same items, labels and pixels as the folders."""
    rows = _original_rows()
    names = [r["image"] for r in rows if r["image"]]
    seen, dups = set(), set()
    for n in names:
        (dups if n in seen else seen).add(n)
    chosen = [r for r in rows if int(r["row"]) < 1500 or r["image"] in dups]
    assert len(dups) == 3 and sum(r["image"] in dups for r in chosen) == 6
    votes = {}
    for split in ("FER2013Train", "FER2013Valid"):
        with open(ferplus_root / split / "label.csv", newline="") as f:
            for r in csv.reader(f):
                votes[r[0]] = r[2:]
    from PIL import Image
    with (open(tmp_path / "fer2013.csv", "w", newline="") as f1,
          open(tmp_path / "fer2013new.csv", "w", newline="") as f2):
        w1, w2 = csv.writer(f1), csv.writer(f2)
        w1.writerow(["emotion", "pixels", "Usage"])
        w2.writerow(["Usage", "Image name", "neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
                     "contempt", "unknown", "NF"])
        for r in chosen:
            if r["image"]:
                folder = "FER2013Train" if r["Usage"] == "Training" else "FER2013Valid"
                px = np.asarray(Image.open(ferplus_root / folder / r["image"]))
                w1.writerow([r["fer2013_emotion"] or 0, " ".join(map(str, px.ravel())), r["Usage"]])
                w2.writerow([r["Usage"], r["image"]] + votes[r["image"]])
            else:  # not a face: pixels unknown here, an empty name in fer2013new.csv
                w1.writerow([0, " ".join(["0"] * 2304), r["Usage"]])
                w2.writerow([r["Usage"], ""] + ["0"] * 9 + ["10"])
    src = build_dataset("ferplus", root=tmp_path, split="train")
    assert src.layout == "source"
    n_empty = sum(1 for r in chosen if not r["image"] and r["Usage"] == "Training")
    assert src.excluded["empty image name in fer2013new.csv (not a face)"] == n_empty
    folders = build_dataset("ferplus", root=ferplus_root, split="train")
    by_id = {i: k for k, i in enumerate(folders.item_ids())}
    # each row is an item (a name used by two rows gives two items, ids <name>#row<k>)
    train_rows = [r for r in chosen if r["image"] and r["Usage"] == "Training"]
    assert len(src) == sum(f"FER2013Train/{r['image']}" in by_id for r in train_rows)
    dup_ids = [i for i in src.item_ids() if "#row" in i]
    assert len(dup_ids) == 6 and {i.split("#")[0].split("/")[1] for i in dup_ids} == dups
    for k, item in enumerate(src.item_ids()):
        j = by_id[item.split("#", 1)[0]]
        assert src.targets[k] == folders.targets[j]
        np.testing.assert_array_equal(src.load_image(k), folders.load_image(j))
    # FER2013's own labels from the rebuilt fer2013.csv equal the original labels file
    fer = build_dataset("fer2013", root=tmp_path, split="train")
    expected = [int(r["fer2013_emotion"] or 0) for r in chosen if r["Usage"] == "Training"]
    assert list(fer.targets) == expected


def _small_valid_root(ferplus_root: Path, dest: Path, rows: int = 600) -> Path:
    """The real FER2013Train (linked) and the first ``rows`` label rows of FER2013Valid:
    real data, no test split, evaluation small enough for a 2-core test run."""
    dest.mkdir()
    (dest / "FER2013Train").symlink_to(ferplus_root / "FER2013Train", target_is_directory=True)
    valid = dest / "FER2013Valid"
    valid.mkdir()
    with open(ferplus_root / "FER2013Valid" / "label.csv", newline="") as f:
        lines = f.read().splitlines(keepends=True)[:rows]
    (valid / "label.csv").write_text("".join(lines))
    for line in lines:
        name = line.split(",", 1)[0]
        (valid / name).symlink_to(ferplus_root / "FER2013Valid" / name)
    return dest


def test_one_epoch_of_a_small_esr_on_a_2000_image_subset(ferplus_root, cache_dir, tmp_path):
    """The engine trains a 2-branch quarter-width ESR* for one epoch on a class-balanced subset
    (250 images per class) of FER+ mapped to ESR's order. No test split: val is held out of
    train and FER2013Valid (its first 600 rows here, to keep the test short) is reported.
    (One ``single``-protocol epoch rather than two one-epoch ESR stages: half the CPU time.)"""
    import fer_lab.train as engine
    from fer_lab.runs import read_json

    root = _small_valid_root(ferplus_root, tmp_path / "fp")
    valid = build_dataset("ferplus", root=root, split="val", label_space="affectnet8")
    cfg = engine.TrainConfig(dataset="ferplus", data_root=str(root), model="esr9_div",
                             model_options={"num_branches": 2, "width": 0.25}, label_space="affectnet8",
                             data_options={"cache": str(cache_dir)}, image_size=64, protocol="single", epochs=1,
                             epochs_later=1, subset_per_class=250, val_fraction=0.01, batch_size=32,
                             eval_batch_size=256,
                             output_dir=str(tmp_path / "runs"), cache_dir=str(cache_dir), progress=False,
                             figures=False, name="ferplus-esr2")
    run = engine.train(cfg)
    metrics, data = read_json(run / "metrics.json"), read_json(run / "dataset.json")
    history = (run / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 1  # header + one epoch
    assert data["roles"]["test"] == "val" and metrics["test_split"] == "val"
    assert data["splits"]["test"]["size"] == len(valid) and data["splits"]["test"]["classes"] == list(AFFECTNET8)
    assert data["splits"]["test"]["fingerprint"] == valid.fingerprint()
    assert sum(data["splits"]["train"]["class_counts"].values()) + data["splits"]["val"]["size"] == 25_045
    assert data["splits"]["train"]["label_mode"] == "majority"
    assert data["splits"]["train"]["image_size"] == [48, 48]
    assert all(0.0 <= v <= 1.0 for k, v in metrics["test"].items() if k.startswith("acc_"))
    assert np.asarray(metrics["test"]["confusion"]).sum() == len(valid)


def test_engine_asks_for_the_splits_present(ferplus_root):
    """train.build_data uses the splits present under data_root: the shared copy has no
    FER2013Test, so val is held out of train and FER2013Valid is the reported split."""
    import fer_lab.train as engine

    cfg = engine.TrainConfig(dataset="ferplus", data_root=str(ferplus_root), label_space="affectnet8",
                             model_options={"num_branches": 2, "width": 0.25}, progress=False, figures=False)
    data = engine.build_data(cfg, 64, "affectnet8")
    assert data.describe["roles"]["test"] == "val"
