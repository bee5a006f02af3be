"""Tests for the procedural synthetic face dataset and ``fer_lab.analysis.attention_in_regions``."""
from __future__ import annotations

import hashlib
import json
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

from fer_lab.data.labels import AFFECTNET8
from fer_lab.analysis import attention_in_regions
from fer_lab.data.synthetic import REGIONS, SyntheticFaces, render_params, sample_params


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


@pytest.fixture
def one_thread():
    """Single-threaded torch: on a shared 2-core box, 2 OpenMP threads can be 20x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- determinism and splits -------------------------------------------------------------
def test_items_are_deterministic_and_order_independent():
    a = SyntheticFaces(split="train", size=48, num_samples=24, seed=3)
    forward = [_digest(a.load_image(i)) for i in range(24)]
    again = [_digest(a.load_image(i)) for i in range(24)]
    b = SyntheticFaces(split="train", size=48, num_samples=24, seed=3)
    backward = {i: _digest(b.load_image(i)) for i in reversed(range(24))}
    assert forward == again == [backward[i] for i in range(24)]
    # item i does not depend on how many items the split has
    c = SyntheticFaces(split="train", size=48, num_samples=200, seed=3)
    assert [_digest(c.load_image(i)) for i in range(24)] == forward
    assert np.array_equal(c.targets[:24], a.targets)
    # a different seed gives different images
    d = SyntheticFaces(split="train", size=48, num_samples=24, seed=4)
    assert sum(_digest(d.load_image(i)) == forward[i] for i in range(24)) == 0
    # negative indexing and out-of-range
    assert _digest(a.load_image(-1)) == forward[-1]
    with pytest.raises(IndexError):
        a.load_image(24)


def test_cache_matches_on_the_fly_rendering(tmp_path):
    kw = dict(split="val", size=40, num_samples=20, seed=1)
    plain = SyntheticFaces(**kw)
    cached = SyntheticFaces(cache=tmp_path, **kw)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".npy"]  # no temporary file left behind
    files = sorted(tmp_path.glob("*.npy"))
    arr = np.load(files[0], mmap_mode="r")
    assert arr.shape == (20, 40, 40, 3) and arr.dtype == np.uint8
    for i in (0, 7, 19):
        assert np.array_equal(cached.load_image(i), plain.load_image(i))
    x1, y1 = cached[5]
    x2, y2 = plain[5]
    assert torch.equal(x1, x2) and y1 == y2
    mtime = files[0].stat().st_mtime_ns
    again = SyntheticFaces(cache=tmp_path, **kw)  # reuses the file
    assert files[0].stat().st_mtime_ns == mtime and np.array_equal(again.load_image(3), plain.load_image(3))
    SyntheticFaces(cache=tmp_path, difficulty=0.5, **kw)  # other parameters -> another file
    assert len(list(tmp_path.glob("*.npy"))) == 2
    # pickling (DataLoader workers) drops the memory map and reopens it
    clone = pickle.loads(pickle.dumps(cached))
    assert clone._images is None and np.array_equal(clone.load_image(11), plain.load_image(11))


def test_dataloader_workers_give_the_same_items():
    ds = SyntheticFaces(split="test", size=32, num_samples=8, seed=2)
    direct = torch.stack([ds[i][0] for i in range(8)])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2)))
    assert torch.equal(batch[0], direct)


def test_splits_do_not_share_items():
    digests = {}
    for split in ("train", "val", "test"):
        ds = SyntheticFaces(split=split, size=32, num_samples=150, seed=0)
        digests[split] = {_digest(ds.load_image(i)) for i in range(len(ds))}
        assert len(digests[split]) == 150
    assert not digests["train"] & digests["test"]
    assert not digests["train"] & digests["val"]
    assert not digests["val"] & digests["test"]


def test_classes_are_balanced():
    ds = SyntheticFaces(split="train")
    assert len(ds) == 6000 and ds.classes == AFFECTNET8 and ds.num_classes == 8
    assert set(ds.class_counts().values()) == {750}
    assert len(SyntheticFaces(split="val")) == len(SyntheticFaces(split="test")) == 1200
    for n in (1, 13, 101):
        counts = np.bincount(SyntheticFaces(num_samples=n).targets, minlength=8)
        assert counts.sum() == n and counts.max() - counts.min() <= 1
    assert ds.targets.dtype == np.int64


# ---- shapes and dtypes --------------------------------------------------------------
@pytest.mark.parametrize("size", [32, 57, 96, 224])
@pytest.mark.parametrize("grayscale", [False, True])
def test_shapes_and_dtypes(size, grayscale):
    ds = SyntheticFaces(size=size, num_samples=4, grayscale=grayscale)
    img = ds.load_image(1)
    assert img.dtype == np.uint8
    assert img.shape == ((size, size) if grayscale else (size, size, 3))
    assert img.std() > 5  # not blank
    x, y = ds[1]
    assert x.dtype == torch.float32 and x.shape == (1 if grayscale else 3, size, size)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert torch.allclose(x, torch.from_numpy(img.reshape(size, size, -1)).permute(2, 0, 1).float() / 255)
    assert isinstance(y, int) and y == int(ds.targets[1])


def test_grayscale_is_the_luminance_of_rgb():
    rgb = SyntheticFaces(size=48, num_samples=3).load_image(2).astype(np.float64)
    gray = SyntheticFaces(size=48, num_samples=3, grayscale=True).load_image(2).astype(np.float64)
    lum = rgb @ np.array([0.299, 0.587, 0.114])
    assert np.abs(gray - lum).max() <= 2.0


def test_render_returns_image_label_masks_and_json_params():
    ds = SyntheticFaces(split="val", size=64, num_samples=16, occlusion_rate=1.0)
    out = ds.render(3)
    assert set(out) == {"image", "label", "masks", "params"}
    assert np.array_equal(out["image"], ds.load_image(3))
    assert out["label"] == int(ds.targets[3])
    assert out["masks"].shape == (4, 64, 64) and out["masks"].dtype == np.uint8
    assert set(np.unique(out["masks"])) <= {0, 1}
    p = json.loads(json.dumps(out["params"]))  # JSON-able
    assert p["class"] == AFFECTNET8[out["label"]]
    assert 0.3 <= p["intensity"] <= 1.0
    assert p["occluder"]["kind"] != "none" and set(p["occluded"]) == set(REGIONS)
    assert all(0.0 <= v <= 1.0 for v in p["occluded"].values())
    assert np.array_equal(ds.render_masks(3), out["masks"])


def test_occlusion_rate_and_difficulty_change_only_what_they_should():
    def kinds(rate):
        ds = SyntheticFaces(num_samples=400, occlusion_rate=rate)
        return [ds.params(i)["occluder"]["kind"] for i in range(400)]
    assert set(kinds(0.0)) == {"none"}
    assert "none" not in kinds(1.0) and len(set(kinds(1.0))) == 4
    share = np.mean([k != "none" for k in kinds(0.25)])
    assert 0.17 < share < 0.33
    # the same item at another difficulty keeps its label, identity and expression
    easy, hard = SyntheticFaces(num_samples=10, difficulty=0.0), SyntheticFaces(num_samples=10, difficulty=1.0)
    pe, ph = easy.params(4), hard.params(4)
    assert pe["actions"] == ph["actions"] and pe["label"] == ph["label"]
    assert pe["identity"]["skin"] == ph["identity"]["skin"]
    assert pe["pose"]["rotation_deg"] == 0.0 and pe["scene"]["clutter"] == [] and pe["scene"]["noise"] == 0.0
    assert not np.array_equal(easy.load_image(4), hard.load_image(4))


def test_fingerprint_and_item_ids_track_generation_parameters():
    base = SyntheticFaces(num_samples=16)
    assert base.item_ids()[3].startswith("synthetic/train/0/3?")
    assert base.fingerprint() == SyntheticFaces(num_samples=16).fingerprint()
    for kw in (dict(size=64), dict(seed=1), dict(difficulty=0.5), dict(occlusion_rate=0.1),
               dict(grayscale=True), dict(split="val")):
        assert SyntheticFaces(num_samples=16, **kw).fingerprint() != base.fingerprint(), kw
    d = base.describe()
    assert d["name"] == "synthetic" and d["size"] == 16 and d["generation"]["difficulty"] == 1.0
    sub = base.describe([0, 1, 2])
    assert sub["size"] == 3 and sum(sub["class_counts"].values()) == 3 and sub["fingerprint"] != d["fingerprint"]
    json.dumps(d)


# ---- masks ----------------------------------------------------------------------------
def _centroid(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask)
    return np.array([rows.mean(), cols.mean()])


def test_masks_sit_on_the_face_parts_of_a_clean_face():
    ds = SyntheticFaces(split="test", size=96, num_samples=16, difficulty=0.0, occlusion_rate=0.0)
    for i in range(16):
        m = ds.render_masks(i)
        assert all(m[r].sum() > 10 for r in range(4)), i
        eyes, brows, mouth, nose = (_centroid(m[r]) for r in range(4))
        # top-to-bottom order of an upright face; mouth in the lower half, eyes in the upper half
        assert brows[0] < eyes[0] < nose[0] < mouth[0], i
        assert mouth[0] > 48 and eyes[0] < 48
        # left/right symmetric around the image centre (no pose jitter at difficulty 0)
        for c in (eyes, brows, mouth, nose):
            assert abs(c[1] - 47.5) < 4
        # both eyes present: mask pixels on both sides of the midline
        cols = np.nonzero(m[0])[1]
        assert (cols < 44).any() and (cols > 52).any()


@pytest.mark.parametrize("rotation", [-20.0, 0.0, 20.0])
def test_masks_follow_rotation_translation_and_scale(rotation):
    p = sample_params(0, "train", 5, label=AFFECTNET8.index("surprise"), difficulty=0.0, occlusion_rate=0.0)
    # light skin and brown hair: only the irises, pupils and eyelid lines are near-black
    p["identity"].update(glasses=False, hair=[0.5, 0.35, 0.2], skin=[0.9, 0.75, 0.65], iris=1)
    p["pose"].update(rotation_deg=rotation, tx=0.15, ty=-0.1, scale=0.9)
    img, m = render_params(p, 128, masks=True)
    # the two eye components: tilt of the line joining them equals the head rotation
    rows, cols = np.nonzero(m[0])
    centre = np.array([rows.mean(), cols.mean()])
    th = math.radians(rotation)
    # split along the rotated face's horizontal axis
    side = (cols - centre[1]) * math.cos(th) + (rows - centre[0]) * math.sin(th)
    left = np.array([rows[side < 0].mean(), cols[side < 0].mean()])
    right = np.array([rows[side > 0].mean(), cols[side > 0].mean()])
    tilt = math.degrees(math.atan2(right[0] - left[0], right[1] - left[1]))
    assert abs(tilt - rotation) < 3.0
    # the face centre moved by (tx, ty): eye centre right of and above the image centre
    assert centre[1] > 64 + 0.1 * 64 - 6
    dark = img.max(-1) < 45
    assert dark.sum() > 5 and m[0][dark].mean() > 0.95


def test_masks_survive_a_joint_flip():
    flip = v2.RandomHorizontalFlip(p=1.0)
    ds = SyntheticFaces(split="val", size=64, num_samples=8, return_masks=True, transform=flip)
    ref = SyntheticFaces(split="val", size=64, num_samples=8)
    for i in (0, 5):
        img, label, masks = ds[i]
        r = ref.render(i)
        assert isinstance(masks, tv_tensors.Mask) and masks.shape == (4, 64, 64) and masks.dtype == torch.uint8
        assert torch.equal(masks.as_subclass(torch.Tensor), torch.from_numpy(r["masks"]).flip(-1))
        assert torch.equal(img, torch.from_numpy(r["image"]).permute(2, 0, 1).flip(-1))
        assert label == r["label"]


def test_masks_without_transform_and_through_the_esr_preset():
    from fer_lab.data.transforms import build_transform

    ds = SyntheticFaces(split="val", size=64, num_samples=4, return_masks=True)
    img, label, masks = ds[1]
    assert img.dtype == torch.float32 and img.shape == (3, 64, 64)
    assert masks.dtype == torch.uint8 and masks.shape == (4, 64, 64)
    assert torch.equal(masks.as_subclass(torch.Tensor), torch.from_numpy(ds.render(1)["masks"]))
    torch.manual_seed(0)
    aug = SyntheticFaces(split="val", size=64, num_samples=4, return_masks=True, grayscale=True,
                         transform=build_transform("esr_train", 48))
    img, label, masks = aug[2]
    assert img.shape == (3, 48, 48) and img.dtype == torch.float32
    assert masks.shape == (4, 48, 48) and set(masks.unique().tolist()) <= {0, 1}


# ---- the expressions are really there ----------------------------------------------
def test_class_actions_are_visible_in_the_pixels():
    ds = SyntheticFaces(split="val", size=64, num_samples=160, difficulty=0.0, occlusion_rate=0.0)
    mouth_dark = {c: [] for c in range(8)}
    eye_white = {c: [] for c in range(8)}
    for i in range(len(ds)):
        r = ds.render(i)
        im, m = r["image"].astype(int), r["masks"].astype(bool)
        # the open mouth's interior is drawn in RGB (0.22, 0.05, 0.06) whatever the skin
        inner_mouth = (np.abs(im[..., 0] - 56) < 12) & (im[..., 1] < 22) & (im[..., 2] < 24)
        mouth_dark[r["label"]].append(inner_mouth[m[2]].mean())
        eye_white[r["label"]].append((im.min(-1) > 217)[m[0]].mean())
    c = AFFECTNET8.index
    assert np.mean(mouth_dark[c("surprise")]) > 1.8 * np.mean(mouth_dark[c("neutral")])
    assert np.mean(eye_white[c("surprise")]) > 1.8 * np.mean(eye_white[c("anger")])


def _linear_accuracy(difficulty: float) -> float:
    def data(split, n):
        ds = SyntheticFaces(split=split, size=32, num_samples=n, grayscale=True, difficulty=difficulty,
                            occlusion_rate=0.0 if difficulty == 0 else 0.25)
        x = np.stack([ds.load_image(i) for i in range(n)]).reshape(n, -1).astype(np.float32) / 255
        return x, torch.from_numpy(ds.targets)

    x, y = data("train", 800)
    xt, yt = data("test", 320)
    mu, sd = x.mean(0), x.std(0) + 1e-2
    X, Xt = torch.from_numpy((x - mu) / sd), torch.from_numpy((xt - mu) / sd)
    W = torch.zeros(X.shape[1], 8, requires_grad=True)
    b = torch.zeros(8, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=60, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(X @ W + b, y) + 0.05 * W.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return float(((Xt @ W + b).argmax(1) == yt).float().mean())


def test_a_linear_model_reads_clean_faces_but_not_wild_ones(one_thread):
    clean, wild = _linear_accuracy(0.0), _linear_accuracy(1.0)
    assert clean > 0.45  # chance is 0.125
    assert wild < clean - 0.2


# ---- validation -----------------------------------------------------------------------
@pytest.mark.parametrize("kw, name", [
    (dict(split="training"), "split"), (dict(size=8), "size"), (dict(size=96.0), "size"),
    (dict(num_samples=0), "num_samples"), (dict(seed=-1), "seed"), (dict(seed=1.5), "seed"),
    (dict(grayscale="yes"), "grayscale"), (dict(occlusion_rate=1.5), "occlusion_rate"),
    (dict(difficulty=-0.1), "difficulty"), (dict(difficulty="hard"), "difficulty"),
    (dict(return_masks=1), "return_masks"), (dict(transform=3), "transform"), (dict(cache=5), "cache"),
    (dict(label_space="fer2013"), "label_space"),
])
def test_bad_parameters_raise_value_errors_naming_them(kw, name):
    with pytest.raises(ValueError, match=name):
        SyntheticFaces(**{"num_samples": 8, **kw})


def test_label_spaces():
    assert SyntheticFaces(num_samples=8, label_space="affectnet8").classes == AFFECTNET8
    with pytest.raises(ValueError, match="contempt"):
        SyntheticFaces(num_samples=8, label_space="affectnet7")  # contempt has no place there


def test_library_code_prints_nothing(capsys, tmp_path):
    ds = SyntheticFaces(num_samples=4, size=32, cache=tmp_path, return_masks=True)
    ds.render(0)
    ds[1]
    assert capsys.readouterr().out == ""


# ---- attention_in_regions --------------------------------------------------------------
def test_uniform_attention_scores_the_area():
    masks = torch.zeros(2, 4, 12, 12)
    masks[0, 0, 2:5, 1:11] = 1  # eyes: 30 px
    masks[0, 2, 8:10, 3:9] = 1  # mouth: 12 px
    masks[1, 3, :6, :] = 1      # nose: half the image
    out = attention_in_regions(torch.ones(2, 6, 6), masks)
    assert set(out) == {"inside", "area", "lift", *REGIONS}
    assert all(v.shape == (2,) for v in out.values())
    assert torch.allclose(out["area"], torch.tensor([42 / 144, 0.5]))
    assert torch.allclose(out["inside"], out["area"])
    assert torch.allclose(out["lift"], torch.ones(2))
    assert torch.allclose(out["eyes"], torch.tensor([30 / 144, 0.0]))
    assert torch.allclose(out["nose"], torch.tensor([0.0, 0.5]))


def test_delta_attention_inside_a_region():
    masks = torch.zeros(1, 4, 8, 8)
    masks[0, 2, 5:7, 2:6] = 1
    maps = torch.zeros(1, 8, 8)
    maps[0, 6, 3] = 5.0  # same resolution: no interpolation
    out = attention_in_regions(maps, masks)
    assert out["inside"].item() == pytest.approx(1.0)
    assert out["mouth"].item() == pytest.approx(1.0) and out["eyes"].item() == 0.0
    assert out["lift"].item() == pytest.approx(64 / 8)
    # a 6x6 delta spreads bilinearly over at most the 3x3 block of cells around it
    maps = torch.zeros(1, 6, 6)
    maps[0, 2, 3] = 1.0
    masks = torch.zeros(1, 4, 60, 60)
    masks[0, 1, 10:40, 20:50] = 1
    out = attention_in_regions(maps, masks)
    assert out["inside"].item() == pytest.approx(1.0) and out["brows"].item() == pytest.approx(1.0)


def test_bilinear_upsampling_by_hand():
    # a (1, 2) map [1, 0] upsampled to width 4 with align_corners=False is [1, .75, .25, 0]
    maps = torch.tensor([[[1.0, 0.0]]])
    masks = torch.zeros(1, 1, 1, 4)
    masks[0, 0, 0, :2] = 1
    out = attention_in_regions(maps, masks, regions=["left"])
    assert out["inside"].item() == pytest.approx(1.75 / 2.0)
    assert out["area"].item() == pytest.approx(0.5)
    assert out["lift"].item() == pytest.approx(1.75)
    assert out["left"].item() == pytest.approx(1.75 / 2.0)


def test_attention_edge_cases():
    masks = torch.zeros(2, 4, 6, 6, dtype=torch.uint8)
    masks[:, 0, :3] = 1
    maps = torch.zeros(2, 6, 6)
    maps[1, 0, 0] = 1.0
    out = attention_in_regions(maps, masks.bool())
    assert out["inside"][0].item() == 0.0 and out["inside"][1].item() == 1.0  # zero map -> 0 shares
    empty = attention_in_regions(torch.ones(1, 6, 6), torch.zeros(1, 4, 6, 6))
    assert math.isnan(empty["lift"].item()) and empty["area"].item() == 0.0
    with pytest.raises(ValueError, match="regions"):
        attention_in_regions(torch.ones(1, 6, 6), torch.zeros(1, 3, 6, 6))
    with pytest.raises(ValueError, match="maps"):
        attention_in_regions(torch.ones(6, 6), torch.zeros(1, 4, 6, 6))


def test_attention_on_real_masks_prefers_the_regions():
    ds = SyntheticFaces(split="val", size=48, num_samples=4, difficulty=0.0, occlusion_rate=0.0)
    masks = torch.from_numpy(np.stack([ds.render_masks(i) for i in range(4)]))
    focused = F.avg_pool2d(masks.float().amax(1, keepdim=True), 8)[:, 0]  # 6x6 attention on the parts
    out = attention_in_regions(focused, masks)
    uniform = attention_in_regions(torch.ones(4, 6, 6), masks)
    assert (out["lift"] > 1.5).all() and torch.allclose(uniform["lift"], torch.ones(4), atol=1e-5)
    assert (out["area"] > 0.02).all() and (out["area"] < 0.5).all()


def test_num_samples_per_split():
    """A dict gives some splits their own size; the others keep the default; items are unchanged."""
    val = SyntheticFaces(split="val", size=32, num_samples={"val": 16, "test": 8})
    train = SyntheticFaces(split="train", size=32, num_samples={"val": 16})
    assert len(val) == 16 and len(train) == 6000
    assert np.array_equal(val.load_image(3), SyntheticFaces(split="val", size=32).load_image(3))
    with pytest.raises(ValueError, match="num_samples"):
        SyntheticFaces(split="val", num_samples={"validation": 3})
