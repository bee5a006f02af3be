"""Your own faces (fer_lab.predict) and exported models (fer_lab.export).

Face detection is checked on faces pasted at known places into larger images (synthetic
faces always; real FER2013 faces when ../shared holds them); crops against direct slicing;
predictions against the model's own forward pass; onnxruntime against PyTorch to 1e-4.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fer_lab.predict import (ImageReadError, NoFaceError, Predictor, crop_face, detect_faces, eye_angle,
                             load_image)

REPO = Path(__file__).resolve().parents[1]
FERPLUS_VALID = REPO / "outputs" / "cache" / "ferplus_shared" / "FER2013Valid"


def _iou(a, b) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    w = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    h = max(0, min(ay + ah, by + bh) - max(ay, by))
    return w * h / (aw * ah + bw * bh - w * h)


def _pasted(face: np.ndarray, at=(150, 100), canvas=(400, 500)) -> np.ndarray:
    img = np.full((*canvas, 3), 200, np.uint8)
    x, y = at
    img[y:y + face.shape[0], x:x + face.shape[1]] = face
    return img


@pytest.fixture(scope="module")
def synthetic_scene():
    """A synthetic face (160 px) pasted at (150, 100) into a 500x400 image: the first of the test
    split that OpenCV's frontal cascade finds (6 of the first 40 are found)."""
    from fer_lab.data.synthetic import SyntheticFaces

    ds = SyntheticFaces(split="test", size=160, num_samples=40, difficulty=0.0, occlusion_rate=0.0)
    for i in range(40):
        face = np.asarray(ds.render(i)["image"])
        face = face if face.ndim == 3 else np.repeat(face[..., None], 3, axis=-1)
        scene = _pasted(face)
        if detect_faces(scene):
            return scene
    pytest.fail("no synthetic face of the first 40 was detected")


def test_detection_finds_the_pasted_face(synthetic_scene):
    (x, y, w, h), *_ = detect_faces(synthetic_scene)
    # inside the pasted 160 px image (the drawn face fills its middle), and most of the face
    assert 150 <= x and 100 <= y and x + w <= 310 and y + h <= 260 and w * h >= 0.3 * 160 * 160
    assert detect_faces(np.full((300, 300, 3), 90, np.uint8)) == []


@pytest.mark.skipif(not FERPLUS_VALID.is_dir(), reason="real FER+ faces not unpacked (../shared/data/ferplus)")
def test_detection_and_eye_levelling_on_real_faces():
    found, inside, angles = 0, 0, []
    import cv2

    for f in sorted(FERPLUS_VALID.glob("*.png"))[:40]:
        face = np.asarray(Image.open(f).convert("RGB").resize((192, 192), Image.BICUBIC))
        scene = _pasted(face, at=(200, 100), canvas=(480, 640))
        boxes = detect_faces(scene)
        if not boxes:
            continue
        found += 1
        x, y, w, h = boxes[0]
        inside += 200 <= x + w / 2 <= 392 and 100 <= y + h / 2 <= 292 and _iou(boxes[0], (200, 100, 192, 192)) > 0.3
        a0 = eye_angle(scene, boxes[0])
        # the same scene turned 8 degrees counter-clockwise about the face: the eye line turns by -8 degrees
        turned = cv2.warpAffine(scene, cv2.getRotationMatrix2D((296, 196), 8, 1.0), (640, 480),
                                borderMode=cv2.BORDER_REPLICATE)
        b = detect_faces(turned)
        a1 = eye_angle(turned, b[0]) if b else None
        if a0 is not None and a1 is not None:
            angles.append(a1 - a0)
    assert found >= 10 and inside >= 0.8 * found         # FER2013 crops are tight: about 40 % are found
    assert len(angles) >= 5 and abs(np.median(angles) + 8) < 3


def test_crop_face_is_a_padded_square():
    img = np.arange(100 * 120 * 3, dtype=np.int64).reshape(100, 120, 3).astype(np.uint8)
    c = crop_face(img, (40, 30, 20, 20), margin=0.25)     # side 20 * 1.5 = 30, centred on (50, 40)
    assert c.shape == (30, 30, 3) and np.array_equal(c, img[25:55, 35:65])
    edge = crop_face(img, (0, 0, 20, 20), margin=0.5)      # leaves the image: borders replicated
    assert edge.shape == (40, 40, 3) and np.array_equal(edge[10:, 10:], img[:30, :30])
    assert np.array_equal(edge[0, 0], img[0, 0])
    assert np.array_equal(crop_face(img, (40, 30, 20, 20), margin=0.25, angle=0.0), c)


def test_unreadable_images_name_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_text("not an image")
    with pytest.raises(ImageReadError, match="broken.jpg: cannot read it as an image"):
        load_image(bad)
    with pytest.raises(ImageReadError, match="missing.png: no such file"):
        load_image(tmp_path / "missing.png")


@pytest.fixture(scope="module")
def run_dir(affectnet_checkpoint):
    return affectnet_checkpoint.parent.parent


def test_predictor_matches_the_model_and_writes_results(run_dir, synthetic_scene, tmp_path):
    p = Predictor.load(run_dir)
    assert p.classes == ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt")
    assert p.image_size == 64 and not p.grayscale
    # the probabilities are the model's own heads on the preprocessed crop
    (box, angle, crop), = p.faces(synthetic_scene, align=False)
    faces = p.predict_image(synthetic_scene, align=False)
    with torch.no_grad():
        heads = p.model.heads(p.model(p.tensor([crop])))
    for head, scores in heads.items():
        np.testing.assert_allclose(faces[0].probabilities[head], torch.softmax(scores, 1)[0].numpy(), atol=1e-6)
    assert set(faces[0].attention) == {"branch_1", "branch_2"} and faces[0].attention["branch_1"].ndim == 2
    assert set(faces[0].grad_cam) == {"ensemble", "branch_1", "branch_2"}       # the vote has no gradient
    assert faces[0].decision() == p.classes[int(heads["vote"][0].argmax())]
    # files: one row per face, one per failure; figures; the checkpoint file alone gives the same answer
    Image.fromarray(synthetic_scene).save(tmp_path / "scene.png")
    (tmp_path / "broken.jpg").write_text("no")
    Image.fromarray(np.full((200, 200, 3), 90, np.uint8)).save(tmp_path / "blank.png")
    out = tmp_path / "out"
    preds, errors = p.predict_files([tmp_path / "scene.png", tmp_path / "broken.jpg", tmp_path / "blank.png"], out,
                                    align=False)
    assert len(preds) == 1 and set(errors) == {str(tmp_path / "broken.jpg"), str(tmp_path / "blank.png")}
    assert "no face found" in errors[str(tmp_path / "blank.png")]
    import pandas as pd

    table = pd.read_csv(out / "predictions.csv")
    assert list(table["image"]) == [str(tmp_path / n) for n in ("scene.png", "broken.jpg", "blank.png")]
    assert table.loc[0, "decision"] == faces[0].decision() and table["error"].notna().sum() == 2
    row = json.loads((out / "predictions.json").read_text())["rows"][0]
    assert abs(sum(row[f"p_{c}"] for c in p.classes) - 1) < 1e-5
    assert (out / "figures" / "scene_face1.png").stat().st_size > 0
    alone = Predictor.load(run_dir / "checkpoints" / "best.pt").predict_image(synthetic_scene, align=False)
    np.testing.assert_allclose(alone[0].probabilities["ensemble"], faces[0].probabilities["ensemble"], atol=1e-6)
    assert p.predict_image(crop, detect=False)[0].box == (0, 0, crop.shape[1], crop.shape[0])
    with pytest.raises(NoFaceError, match="array: no face found"):
        p.predict_image(np.full((300, 300, 3), 90, np.uint8))


def test_predict_command(run_dir, synthetic_scene, tmp_path, capsys):
    from fer_lab.cli import main

    Image.fromarray(synthetic_scene).save(tmp_path / "scene.jpg")
    (tmp_path / "broken.jpg").write_text("no")
    code = main(["predict", str(run_dir), str(tmp_path / "scene.jpg"), str(tmp_path / "broken.jpg"),
                 "--out", str(tmp_path / "out"), "--no-grad-cam"])
    captured = capsys.readouterr()
    assert code == 1 and "scene.jpg face 1:" in captured.out and "broken.jpg: cannot read" in captured.err
    assert (tmp_path / "out" / "predictions.csv").is_file()
    assert main(["predict", str(tmp_path), str(tmp_path / "scene.jpg")]) == 2           # not a run
    assert "not a fer_lab run directory" in capsys.readouterr().err


# ---- export --------------------------------------------------------------------------------
def _checkpoint(model, path: Path, image_size: int, classes) -> Path:
    from fer_lab.runs import save_checkpoint

    save_checkpoint(path, {"model": model.state_dict(), "model_config": model.config, "train_config": {},
                           "meta": {"classes": list(classes), "image_size": image_size, "color": "RGB"}})
    return path


def _onnx_matches_torch(source: Path, out: Path, image_size: int):
    import onnxruntime as ort

    from fer_lab.export import ExportWrapper, export_model

    info = export_model(source, out, formats=("onnx", "torchscript"))
    p = Predictor.load(source)
    wrapper = ExportWrapper(p.model, image_size)
    x = torch.rand(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = [t.numpy() for t in wrapper(x)]
    session = ort.InferenceSession(info["files"]["onnx"], providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})
    assert [o.name for o in session.get_outputs()] == info["outputs"]
    for name, a, b in zip(info["outputs"], ref, got):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(b, a, atol=1e-4, rtol=0, err_msg=name)
    traced = torch.jit.load(info["files"]["torchscript"])
    with torch.no_grad():
        for a, b in zip(ref, traced(x)):
            np.testing.assert_allclose(b.numpy(), a, atol=1e-5, rtol=0)
    return info, ref


def test_export_esr_star_run(run_dir, tmp_path):
    info, ref = _onnx_matches_torch(run_dir, tmp_path / "esr", 64)
    assert info["heads"][0] == "vote" and info["learners"] == ["branch_1", "branch_2"]
    assert ref[1].shape == (3, len(info["heads"]), 8) and ref[2].shape[:2] == (3, 2)
    np.testing.assert_allclose(ref[1].sum(-1), 1, atol=1e-5)
    saved = json.loads((tmp_path / "esr" / "export.json").read_text())
    assert saved["classes"][1] == "happy" and saved["input"]["shape"] == ["batch", 3, 64, 64]


def test_export_manet_star(tmp_path):
    from fer_lab.models import build_model

    torch.manual_seed(0)
    model = build_model("manet_div").eval()
    ckpt = _checkpoint(model, tmp_path / "manet" / "checkpoints" / "best.pt", 224, [f"c{k}" for k in range(7)])
    info, ref = _onnx_matches_torch(ckpt, tmp_path / "manet_export", 224)
    assert info["main_head"] == "fused" and info["learners"] == ["local patches"]


def test_export_official_esr9(tmp_path):
    from test_esr_official import write_official

    from fer_lab.models import build_model
    from fer_lab.models.pretrained import load_pretrained

    model = build_model("esr9")
    load_pretrained(model, write_official(tmp_path / "official", range(1, 10)))
    ckpt = _checkpoint(model.eval(), tmp_path / "esr9" / "checkpoints" / "best.pt", 96,
                       ["neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt"])
    info, ref = _onnx_matches_torch(ckpt, tmp_path / "esr9_export", 96)
    assert info["learners"] == [] and info["outputs"] == ["decision", "probabilities"]
    assert len(info["heads"]) == 2 + 9
