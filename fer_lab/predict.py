"""Your own faces: a trained fer_lab model applied to photographs.

:class:`Predictor` holds a model with the preprocessing its run trained with (input size,
grayscale for FER2013/FER+-trained models, ImageNet normalisation where the run used it) and
the class names; it finds faces with OpenCV's Haar cascade (the cascade files ship inside
``opencv-python-headless``; nothing is downloaded), levels the eyes where both are found
(Haar eye cascade), crops a square around each face, and returns for every face each head's
class probabilities, every learner's spatial attention and Grad-CAM::

    p = Predictor.load("outputs/demo/esr4_div-synthetic-demo")     # a run, or a checkpoint file
    faces = p.predict_image("me.jpg")                               # list of FacePrediction
    p.predict_files(["a.jpg", "b.png"], out_dir="outputs/predict")  # CSV + JSON + one figure per face

Command line: ``python -m fer_lab predict RUN_OR_CHECKPOINT IMAGES... [--out DIR]``.
Unreadable images raise :class:`ImageReadError` and images without a face
:class:`NoFaceError` (``predict_files`` records them per file and goes on).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = ["Predictor", "FacePrediction", "ImageReadError", "NoFaceError", "load_image", "detect_faces",
           "crop_face"]


class ImageReadError(ValueError):
    """An image file that cannot be read or decoded."""


class NoFaceError(ValueError):
    """An image in which the face detector found no face."""


def load_image(path) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB of an image file; :class:`ImageReadError` names the file otherwise."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageReadError(f"{path}: cannot read it as an image ({e}); expected a JPEG, PNG, BMP, WebP or "
                             "another format Pillow reads") from None


def _cascade(name: str):
    import cv2

    path = Path(cv2.data.haarcascades) / name
    cascade = cv2.CascadeClassifier(str(path))
    if cascade.empty():
        raise RuntimeError(f"OpenCV's cascade {path} is missing or unreadable; reinstall opencv-python-headless")
    return cascade


def detect_faces(image: np.ndarray, min_size: float = 0.1) -> list[tuple[int, int, int, int]]:
    """Frontal faces ``(x, y, w, h)`` in an RGB image, largest first (OpenCV's
    ``haarcascade_frontalface_default``; ``min_size``: smallest face side as a share of the
    image's shorter side, at least 24 px)."""
    import cv2

    gray = cv2.equalizeHist(cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY))
    side = max(24, int(min_size * min(gray.shape)))
    boxes = _cascade("haarcascade_frontalface_default.xml").detectMultiScale(
        gray, scaleFactor=1.1, minNeighbors=5, minSize=(side, side))
    return sorted((tuple(int(v) for v in b) for b in boxes), key=lambda b: -b[2] * b[3])


def eye_angle(image: np.ndarray, box: tuple[int, int, int, int]) -> float | None:
    """Angle in degrees of the line through the two eyes found in the upper half of the face
    ``box`` (OpenCV's ``haarcascade_eye``), or ``None`` when two eyes are not found."""
    import cv2

    x, y, w, h = box
    gray = cv2.cvtColor(np.ascontiguousarray(image[y:y + h // 2 + h // 10, x:x + w]), cv2.COLOR_RGB2GRAY)
    eyes = _cascade("haarcascade_eye.xml").detectMultiScale(gray, 1.1, 5, minSize=(max(8, w // 10),) * 2)
    if len(eyes) < 2:
        return None
    eyes = sorted(eyes, key=lambda e: -e[2] * e[3])[:2]
    (x1, y1), (x2, y2) = sorted((ex + ew / 2, ey + eh / 2) for ex, ey, ew, eh in eyes)
    angle = math.degrees(math.atan2(y2 - y1, x2 - x1))
    return angle if abs(angle) <= 30 else None        # a steeper pair is a false detection


def crop_face(image: np.ndarray, box: tuple[int, int, int, int], margin: float = 0.15,
              angle: float | None = None) -> np.ndarray:
    """A square crop around ``box`` enlarged by ``margin`` on every side (borders replicated
    where it leaves the image), rotated by ``angle`` degrees about the face's centre first so
    that the eyes are level."""
    import cv2

    x, y, w, h = box
    cx, cy = x + w / 2, y + h / 2
    side = max(w, h) * (1 + 2 * margin)
    if angle:
        image = cv2.warpAffine(np.ascontiguousarray(image), cv2.getRotationMatrix2D((cx, cy), angle, 1.0),
                               (image.shape[1], image.shape[0]), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REPLICATE)
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    s = int(round(side))
    pad = max(0, -x0, -y0, x0 + s - image.shape[1], y0 + s - image.shape[0])
    if pad:
        image = cv2.copyMakeBorder(np.ascontiguousarray(image), pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        x0, y0 = x0 + pad, y0 + pad
    return np.ascontiguousarray(image[y0:y0 + s, x0:x0 + s])


@dataclass
class FacePrediction:
    """One face: where it is, what each head says and where each learner looks."""

    image: str                                   # the file (or "array")
    face_index: int                              # 0 = the largest face of the image
    box: tuple[int, int, int, int]               # (x, y, w, h) in the image
    angle: float | None                          # eye-levelling rotation applied, degrees
    face: np.ndarray                             # (S, S, 3) uint8 crop the model saw (before resizing)
    classes: tuple[str, ...]
    main_head: str
    probabilities: dict[str, np.ndarray]         # head -> (K,) (the vote head: vote shares)
    attention: dict[str, np.ndarray] = field(default_factory=dict)     # learner -> (h, w), last attention layer
    grad_cam: dict[str, np.ndarray] = field(default_factory=dict)      # head -> (S', S') in [0, 1]

    def decision(self, head: str | None = None) -> str:
        return self.classes[int(np.argmax(self.probabilities[head or self.main_head]))]

    def record(self) -> dict:
        """A flat, JSON-able row: file, face, box, each head's decision and confidence, and the
        main head's probability of every class."""
        row = {"image": self.image, "face": self.face_index, "box": list(self.box),
               "eye_angle": None if self.angle is None else round(self.angle, 2), "decision": self.decision(),
               "main_head": self.main_head}
        for head, p in self.probabilities.items():
            row[f"{head}_class"] = self.decision(head)
            row[f"{head}_confidence"] = float(np.max(p))
        row.update({f"p_{c}": float(v) for c, v in zip(self.classes, self.probabilities[self.main_head])})
        return row


class Predictor:
    """A trained model with its preprocessing, ready for photographs (see the module docstring).

    ``model``: any fer_lab model (the contract of :mod:`fer_lab.models.base`); ``classes``: its
    class names in output order; ``image_size``: input side; ``grayscale``: convert faces to
    gray first (models trained on FER2013/FER+); ``image_normalize``: ``"imagenet"`` when the
    run normalised its input.
    """

    def __init__(self, model, classes: Sequence[str], image_size: int, grayscale: bool = False,
                 image_normalize: str | None = None, device: str | torch.device = "cpu", source: str | None = None):
        from .data.transforms import build_transform

        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.classes = tuple(classes)
        self.image_size = int(image_size)
        self.grayscale = bool(grayscale)
        self.normalize = image_normalize
        self.source = source
        self.transform = build_transform("eval", self.image_size, normalize=image_normalize)
        with torch.no_grad():
            probe = self.model(torch.zeros(1, 3, self.image_size, self.image_size, device=self.device))
            K = next(iter(self.model.heads(probe).values())).shape[1]
        if K != len(self.classes):
            raise ValueError(f"{source or 'model'}: {K} outputs but {len(self.classes)} class names {self.classes}")

    @classmethod
    def load(cls, path, device: str | torch.device = "cpu", which: str = "best") -> "Predictor":
        """From a run directory (its checkpoint ``which``) or a checkpoint file (``best.pt`` of a
        run: the run's ``config.json`` and ``dataset.json`` beside it are read when present)."""
        from .config import TrainConfig
        from .data.labels import LABEL_SPACES
        from .models import build_model_from_config, model_spec
        from .runs import load_checkpoint, read_json

        path = Path(path)
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"{path} is not a fer_lab run directory (no config.json); give a run "
                                        "directory or a checkpoint file (checkpoints/best.pt)")
            run_dir, ckpt_path = path, path / "checkpoints" / f"{which}.pt"
        else:
            run_dir, ckpt_path = path.parent.parent, path
        ckpt = load_checkpoint(ckpt_path)
        if not isinstance(ckpt, dict) or "model_config" not in ckpt or "model" not in ckpt:
            raise ValueError(f"{ckpt_path}: not a fer_lab checkpoint (expected the keys 'model' and 'model_config'; "
                             "official ESR weights load through --init-weights into a run first)")
        model = build_model_from_config(ckpt["model_config"])
        model.load_state_dict(ckpt["model"])
        meta = dict(ckpt.get("meta") or {})
        run_cfg = read_json(run_dir / "config.json") if (run_dir / "config.json").is_file() else {}
        data = read_json(run_dir / "dataset.json") if (run_dir / "dataset.json").is_file() else {}
        train_cfg = TrainConfig.from_dict(ckpt.get("train_config") or {})
        classes = meta.get("classes") or run_cfg.get("classes")
        if classes is None:        # a bare checkpoint: the label space it trained in
            space = train_cfg.data.label_space
            if space == "auto":
                space = model_spec(ckpt["model_config"]["name"]).data.get("label_space")
            classes = LABEL_SPACES.get(space) or [f"class_{k}" for k in range(ckpt["model_config"]["num_classes"])]
        image_size = meta.get("image_size") or run_cfg.get("image_size") or ckpt["model_config"].get("input_size", 96)
        color = meta.get("color") or next((s.get("color") for s in (data.get("splits") or {}).values()), None)
        normalize = train_cfg.data.image_normalize
        return cls(model, classes, image_size, grayscale=color == "L", image_normalize=normalize, device=device,
                   source=str(path))

    # ---- faces ------------------------------------------------------------------------------
    def faces(self, image: np.ndarray, detect: bool = True, align: bool = True, all_faces: bool = False,
              name: str = "array") -> list[tuple[tuple[int, int, int, int], float | None, np.ndarray]]:
        """``[(box, eye angle, crop)]`` of the faces in ``image`` (the largest only unless
        ``all_faces``); ``detect=False`` takes the whole image as one face."""
        if not detect:
            h, w = image.shape[:2]
            return [((0, 0, w, h), None, image)]
        boxes = detect_faces(image)
        if not boxes:
            raise NoFaceError(f"{name}: no face found (OpenCV Haar cascade, frontal faces of at least a tenth of the "
                              "image); pass detect=False (--no-detect) if the image is already a face crop")
        out = []
        for box in boxes if all_faces else boxes[:1]:
            angle = eye_angle(image, box) if align else None
            out.append((box, angle, crop_face(image, box, angle=angle)))
        return out

    def tensor(self, faces: Sequence[np.ndarray]) -> torch.Tensor:
        """``(B, 3, S, S)`` model input of RGB uint8 face crops, preprocessed as the run's evaluation."""
        batch = []
        for f in faces:
            f = np.asarray(f, dtype=np.uint8)
            if self.grayscale:
                f = np.repeat(np.round(f @ np.array([0.299, 0.587, 0.114])).clip(0, 255).astype(np.uint8)[..., None],
                              3, axis=-1)
            batch.append(self.transform(torch.from_numpy(np.ascontiguousarray(f)).permute(2, 0, 1)))
        return torch.stack(batch).to(self.device)

    # ---- prediction -------------------------------------------------------------------------
    def predict_faces(self, faces: Sequence[np.ndarray], grad_cam: bool = True) -> list[dict]:
        """For each RGB uint8 crop: ``{"probabilities": {head: (K,)}, "attention": {learner: (h, w)},
        "grad_cam": {head: (S, S)}}`` (Grad-CAM of every differentiable head: each learner's and
        the ensemble's, each for its own prediction)."""
        from .cam import grad_cam_per_learner

        x = self.tensor(faces)
        with torch.no_grad():
            out = self.model(x)
            probs = {h: torch.softmax(s.float(), dim=1).cpu().numpy() for h, s in self.model.heads(out).items()}
            layers = self.model.attention_layers()
            att = {k: v.float().cpu().numpy() for k, v in self.model.attention_maps(out, "last").items()} \
                if layers else {}
        cams = grad_cam_per_learner(self.model, x) if grad_cam else {}
        return [{"probabilities": {h: p[i] for h, p in probs.items()}, "attention": {k: v[i] for k, v in att.items()},
                 "grad_cam": {h: m[i] for h, m in cams.items()}} for i in range(len(faces))]

    def predict_image(self, image, detect: bool = True, align: bool = True, all_faces: bool = False,
                      grad_cam: bool = True) -> list[FacePrediction]:
        """Every face of one image (a path or an RGB array): see :class:`FacePrediction`."""
        name = str(image) if not isinstance(image, np.ndarray) else "array"
        array = load_image(image) if not isinstance(image, np.ndarray) else image
        found = self.faces(array, detect, align, all_faces, name)
        results = self.predict_faces([crop for _, _, crop in found], grad_cam=grad_cam)
        return [FacePrediction(name, i, box, angle, crop, self.classes, self.model.main_head, **r)
                for i, ((box, angle, crop), r) in enumerate(zip(found, results))]

    def predict_files(self, paths: Sequence, out_dir=None, detect: bool = True, align: bool = True,
                      all_faces: bool = False, grad_cam: bool = True, figures: bool = True,
                      progress: bool = False) -> tuple[list[FacePrediction], dict[str, str]]:
        """:meth:`predict_image` for every file; ``(predictions, {file: error})``. With ``out_dir``:
        ``predictions.csv`` and ``predictions.json`` (one row per face, errors included) and,
        with ``figures``, ``figures/<image>_face<n>.png`` (n from 1; the face, each learner's attention,
        Grad-CAM, each head's prediction and confidence), each written atomically."""
        from tqdm.auto import tqdm

        preds: list[FacePrediction] = []
        errors: dict[str, str] = {}
        out = Path(out_dir) if out_dir is not None else None
        for path in tqdm(list(paths), desc="images", disable=not progress):
            try:
                faces = self.predict_image(path, detect, align, all_faces, grad_cam)
            except (ImageReadError, NoFaceError) as e:
                errors[str(path)] = str(e)
                continue
            preds += faces
            if out is not None and figures:
                import matplotlib.pyplot as plt

                from . import viz

                for f in faces:
                    fig = viz.plot_face_prediction(f)
                    viz.save_figure(fig, out / "figures", f"{Path(f.image).stem}_face{f.face_index + 1}",
                                    formats=("png",))
                    plt.close(fig)
        if out is not None:
            write_predictions(out, preds, errors, source=self.source)
        return preds, errors


def write_predictions(out_dir, preds: Sequence[FacePrediction], errors: dict[str, str], source: str | None = None):
    """``predictions.csv`` (one row per face, then one per failed file with its error) and
    ``predictions.json`` (the same rows with the model's source and classes), atomically."""
    import pandas as pd

    from .runs import atomic_write_bytes, write_json

    out = Path(out_dir)
    rows = [p.record() for p in preds] + [{"image": k, "error": v} for k, v in errors.items()]
    table = pd.DataFrame(rows)
    if "face" in table:
        table["face"] = table["face"].astype("Int64")       # failed files have no face number
    atomic_write_bytes(out / "predictions.csv", table.to_csv(index=False).encode())
    classes = list(preds[0].classes) if preds else None
    write_json(out / "predictions.json", {"model": source, "classes": classes, "rows": json.loads(
        json.dumps(rows, default=float))})
