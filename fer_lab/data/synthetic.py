"""Procedural synthetic faces: fer_lab's default, shippable FER dataset.

No real facial-expression dataset may ship with the project, so this module draws
cartoon faces analytically (ellipses, bands and curves on a pixel coordinate grid,
anti-aliased through signed distances) at any requested size. Each of the 8
AffectNet classes is a vector of FACS-like facial actions (brow height, inner-brow
angle, brows drawn together, eye openness, mouth curvature / opening / width, lip
press, one-sided lip-corner raise, nose wrinkle, upper-lip raise). Every sample
scales its class's vector by a random intensity and adds per-action noise, so
classes overlap and weak expressions look near-neutral.

On top of the expression come identity (face shape, skin tone, hair, glasses) and
"in the wild" nuisances (rotation, scale, translation, feature shift, lighting
ramps, colour casts, background clutter and texture, blur, noise) scaled by
``difficulty``, plus occluders (hands, medical masks, sunglasses, random patches)
on a fraction ``occlusion_rate`` of images. Because the renderer knows where the
eyes, brows, mouth and nose are, it also returns per-region masks, which
:func:`attention_in_regions` uses to measure where a model's spatial attention
falls.

What this is deliberately *not*: a realistic face model, a substitute for real FER
data in any claim about real-world accuracy, or a benchmark of anything except a
method's behaviour on a controlled task with known ground-truth regions. Images are
a pure function of ``(seed, split, index, generation parameters)``; nothing is
downloaded or read from disk except the optional cache this module itself writes.
"""
from __future__ import annotations

import logging
import math
import numbers
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import tv_tensors

from .base import FaceDataset, to_chw_uint8
from .cache import cache_path, open_cache, write_cache
from .labels import AFFECTNET8

logger = logging.getLogger(__name__)

#: Region mask channels, in the order ``masks`` stores them.
REGIONS: tuple[str, ...] = ("eyes", "brows", "mouth", "nose")
#: Facial actions (FACS-like), in the order the class prototypes list them.
ACTIONS: tuple[str, ...] = (
    "brow_raise",       # + brows up, - brows lowered
    "brow_inner",       # + inner ends raised (sad/fear), - inner ends pulled down (anger)
    "brow_together",    # + brows drawn toward the midline
    "eye_open",         # + wide open, - narrowed
    "mouth_curve",      # + corners up (smile), - corners down (frown)
    "mouth_open",       # + lips apart
    "mouth_width",      # + stretched, - narrow/round
    "lip_press",        # + thin pressed lips
    "lip_corner_asym",  # + one lip corner raised (side chosen per sample)
    "nose_wrinkle",     # + wrinkles on the nose bridge, nostrils raised
    "upper_lip_raise",  # + upper lip pulled up, upper teeth visible
)


def _proto(**actions: float) -> np.ndarray:
    return np.array([actions.get(a, 0.0) for a in ACTIONS], dtype=np.float64)


#: Action vector of each class at full intensity (AffectNet class order).
PROTOTYPES: dict[str, np.ndarray] = {
    "neutral": _proto(),
    "happy": _proto(mouth_curve=1.0, mouth_open=0.35, mouth_width=0.35, eye_open=-0.35),
    "sad": _proto(brow_inner=1.0, brow_raise=0.1, mouth_curve=-0.9, eye_open=-0.25, lip_press=0.2),
    "surprise": _proto(brow_raise=1.0, eye_open=1.0, mouth_open=1.0, mouth_width=-1.0),
    "fear": _proto(brow_raise=0.6, brow_inner=0.6, brow_together=0.8, eye_open=0.9, mouth_open=0.45,
                   mouth_width=0.6, mouth_curve=-0.25),
    "disgust": _proto(nose_wrinkle=1.0, upper_lip_raise=1.0, brow_raise=-0.5, eye_open=-0.4,
                      mouth_curve=-0.35),
    "anger": _proto(brow_raise=-0.6, brow_inner=-1.0, brow_together=0.8, eye_open=-0.5, lip_press=1.0,
                    mouth_width=-0.2, mouth_curve=-0.1),
    "contempt": _proto(lip_corner_asym=1.0, eye_open=-0.1, lip_press=0.25),
}

SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_SIZES: dict[str, int] = {"train": 6000, "val": 1200, "test": 1200}
OCCLUDERS: tuple[str, ...] = ("hand", "medical_mask", "sunglasses", "patch")
#: Bumped whenever the renderer's output changes; part of cache keys and item ids.
RENDER_VERSION = 2

INTENSITY_RANGE = (0.3, 1.0)
ACTION_NOISE = 0.15
_MAX_CLUTTER = 8
_N_UNIFORMS = 80

_SKIN_LIGHT = np.array([0.97, 0.82, 0.71])
_SKIN_DARK = np.array([0.36, 0.23, 0.16])
_HAIR = np.array([[0.08, 0.06, 0.05], [0.30, 0.18, 0.09], [0.55, 0.38, 0.20], [0.85, 0.70, 0.40],
                  [0.55, 0.22, 0.10], [0.62, 0.62, 0.62]])
_IRIS = np.array([[0.30, 0.18, 0.08], [0.15, 0.10, 0.06], [0.20, 0.35, 0.55], [0.25, 0.40, 0.25]])
_MASK_COLOURS = np.array([[0.70, 0.85, 0.95], [0.95, 0.95, 0.95], [0.15, 0.15, 0.17], [0.35, 0.55, 0.75]])


# ----------------------------------------------------------------------------------------
# parameter sampling
# ----------------------------------------------------------------------------------------
def _item_rng(seed: int, split_id: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, split_id, 0, index])


def balanced_labels(seed: int, split: str, num_samples: int) -> np.ndarray:
    """Labels ``(num_samples,)`` int64: each block of 8 consecutive items is a seeded
    permutation of the 8 classes, so per-class counts differ by at most 1 and item
    ``i``'s label does not depend on ``num_samples``."""
    split_id = SPLITS.index(split)
    nblocks = -(-num_samples // 8)
    out = np.empty(nblocks * 8, dtype=np.int64)
    for b in range(nblocks):
        out[b * 8:(b + 1) * 8] = np.random.default_rng([seed, split_id, 1, b]).permutation(8)
    return out[:num_samples]


def _lerp(a: float, b: float, t: float) -> float:
    return float(a + (b - a) * t)


def sample_params(seed: int, split: str, index: int, label: int, *, difficulty: float = 1.0,
                  occlusion_rate: float = 0.25) -> dict[str, Any]:
    """All random choices of one item as a JSON-able dict (the renderer's only input).

    Draws happen in a fixed order and number whatever ``difficulty`` and
    ``occlusion_rate`` are, so the same item at another difficulty keeps its
    identity, expression and occluder and only its nuisance strength changes.
    """
    rng = _item_rng(seed, SPLITS.index(split), index)
    u = rng.random(_N_UNIFORMS)
    z = rng.standard_normal(len(ACTIONS))
    clut = rng.random((_MAX_CLUTTER, 10))
    d = float(difficulty)
    cls = AFFECTNET8[label]
    intensity = _lerp(*INTENSITY_RANGE, u[0])
    act = intensity * PROTOTYPES[cls] + ACTION_NOISE * z
    actions = {a: float(v) for a, v in zip(ACTIONS, act)}

    skin_t = u[1] ** 0.8
    skin = (1 - skin_t) * _SKIN_LIGHT + skin_t * _SKIN_DARK
    skin = skin * (1 + 0.06 * (u[2:5] - 0.5))
    hair = _HAIR[int(u[5] * len(_HAIR))] * (0.85 + 0.3 * u[6])
    identity = {
        "face_a": _lerp(0.46, 0.54, u[7]), "face_b": _lerp(0.62, 0.70, u[8]),
        "eye_x": _lerp(0.175, 0.205, u[9]), "eye_y": _lerp(-0.12, -0.08, u[10]),
        "eye_w": _lerp(0.085, 0.105, u[11]), "eye_h": _lerp(0.042, 0.056, u[12]),
        "brow_gap": _lerp(0.085, 0.105, u[13]), "brow_t": _lerp(0.014, 0.022, u[14]),
        "brow_arch": _lerp(0.0, 0.03, u[15]),
        "nose_y": _lerp(0.12, 0.16, u[16]), "mouth_y": _lerp(0.31, 0.36, u[17]),
        "mouth_w": _lerp(0.15, 0.19, u[18]), "lip_t": _lerp(0.018, 0.03, u[19]),
        "skin": [float(c) for c in np.clip(skin, 0, 1)],
        "hair": [float(c) for c in np.clip(hair, 0, 1)],
        "hair_style": int(u[20] * 5),            # 0 short, 1 long, 2 bald, 3 curly, 4 crop
        "hairline": _lerp(-0.46, -0.30, u[21]),
        "iris": int(u[22] * len(_IRIS)),
        "gaze_x": _lerp(-0.02, 0.02, u[23]), "gaze_y": _lerp(-0.008, 0.008, u[24]),
        "glasses": bool(u[25] < 0.2 * min(d, 1.0)),
        "shirt": [float(c) for c in u[26:29] * 0.8 + 0.1],
    }
    pose = {
        "rotation_deg": float((2 * u[30] - 1) * 18.0 * d),
        "scale": float(1.2 * (1.0 + _lerp(-0.15, 0.08, u[31]) * d)),
        "tx": float((2 * u[32] - 1) * 0.08 * d), "ty": float(0.06 + (2 * u[33] - 1) * 0.07 * d),
        "feature_dx": float((2 * u[34] - 1) * 0.03 * d), "feature_dy": float((2 * u[35] - 1) * 0.015 * d),
    }
    grey = np.full(3, 0.78)
    bg = (1 - min(d, 1.0)) * grey + min(d, 1.0) * (0.1 + 0.8 * u[36:39])
    n_clutter = int(math.floor(u[39] * (_MAX_CLUTTER + 1) * min(d, 1.0)))
    clutter = []
    for k in range(n_clutter):
        c = clut[k]
        clutter.append({"kind": "ellipse" if c[0] < 0.5 else "rect",
                        "x": float(2 * c[1] - 1), "y": float(2 * c[2] - 1),
                        "rx": float(0.08 + 0.4 * c[3]), "ry": float(0.08 + 0.4 * c[4]),
                        "angle": float(math.pi * c[5]),
                        "colour": [float(v) for v in 0.05 + 0.9 * c[6:9]]})
    scene = {
        "background": [float(c) for c in bg],
        "bg_gradient": float(0.25 * d * (2 * u[40] - 1)), "bg_gradient_angle": float(2 * math.pi * u[41]),
        "texture_amp": float(0.10 * d * u[42]), "texture_freq": _lerp(6.0, 30.0, u[43]),
        "texture_angle": float(math.pi * u[44]), "texture_phase": float(2 * math.pi * u[45]),
        "clutter": clutter,
        "light_strength": float(0.55 * d * u[46]), "light_angle": float(2 * math.pi * u[47]),
        "brightness": float(0.18 * d * (2 * u[48] - 1)), "contrast": float(1.0 + 0.35 * d * (2 * u[49] - 1)),
        "colour_cast": [float(0.08 * d * (2 * c - 1)) for c in u[50:53]],
        "blur_px96": float(1.2 * d * u[54] ** 1.5), "noise": float(0.05 * d * u[55]),
    }
    occ_kind = OCCLUDERS[int(u[57] * len(OCCLUDERS))] if u[56] < occlusion_rate else "none"
    occluder = {
        "kind": occ_kind,
        "x": _lerp(-0.3, 0.3, u[58]), "y": _lerp(-0.2, 0.45, u[59]),
        "size": _lerp(0.75, 1.25, u[60]), "angle": float(math.pi * (2 * u[61] - 1)),
        "colour": ([float(c) for c in _MASK_COLOURS[int(u[62] * len(_MASK_COLOURS))]]
                   if occ_kind == "medical_mask" else
                   [float(c) for c in np.clip((1 - u[63]) * _SKIN_LIGHT + u[63] * _SKIN_DARK, 0, 1)]
                   if occ_kind == "hand" else [float(c) for c in 0.05 + 0.9 * u[64:67]]),
    }
    return {
        "label": int(label), "class": cls, "intensity": float(intensity),
        "asym_side": 1 if u[29] < 0.5 else -1,
        "actions": actions, "identity": identity, "pose": pose, "scene": scene, "occluder": occluder,
        "difficulty": d,
    }


# ----------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------
_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(X, Y)`` in ``[-1, 1]``, each ``(size, size)`` float32."""
    g = _GRIDS.get(size)
    if g is None:
        xs = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1).astype(np.float32)
        X, Y = np.meshgrid(xs, xs)
        g = _GRIDS[size] = (X, Y)
    return g


def _cov(sd: np.ndarray, pw: float) -> np.ndarray:
    """Coverage in [0, 1] from a signed distance (negative inside), edge ~1 pixel wide."""
    x = 0.5 - sd * (1.0 / pw)
    np.maximum(x, 0.0, out=x)
    return np.minimum(x, 1.0, out=x)


def _ellipse_sd(du: np.ndarray, dv: np.ndarray, a: float, b: float) -> np.ndarray:
    """Approximate signed distance to an axis-aligned ellipse (exact for circles)."""
    qa, qb = du * (1.0 / a), dv * (1.0 / b)
    k = np.sqrt(qa * qa + qb * qb)
    grad = np.sqrt((qa * (1.0 / a)) ** 2 + (qb * (1.0 / b)) ** 2) + 1e-6
    return k * (k - 1.0) / grad


def _paint(canvas: np.ndarray, sl, alpha: np.ndarray, colour) -> None:
    region = canvas[sl]
    region += alpha[..., None] * (np.asarray(colour, dtype=np.float32) - region)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of ``(H, W, C)`` by shifted sums (no BLAS threads), edge padding."""
    r = max(1, int(math.ceil(2.5 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    h, w = img.shape[:2]
    p = np.pad(img, ((r, r), (0, 0), (0, 0)), mode="edge")
    out = k[0] * p[0:h]
    for j in range(1, 2 * r + 1):
        out += k[j] * p[j:j + h]
    p = np.pad(out, ((0, 0), (r, r), (0, 0)), mode="edge")
    out = k[0] * p[:, 0:w]
    for j in range(1, 2 * r + 1):
        out += k[j] * p[:, j:j + w]
    return out


class _Frame:
    """Affine map face coordinates -> canvas, and pixel windows of face-space boxes."""

    def __init__(self, size: int, pose: dict[str, float]):
        self.size = size
        self.s = pose["scale"]
        th = math.radians(pose["rotation_deg"])
        self.c, self.sn = math.cos(th), math.sin(th)
        self.tx, self.ty = pose["tx"], pose["ty"]
        X, Y = _grid(size)
        dx, dy = X - self.tx, Y - self.ty
        inv = 1.0 / self.s
        self.u = (self.c * inv) * dx + (self.sn * inv) * dy
        self.v = (-self.sn * inv) * dx + (self.c * inv) * dy
        self.pw = 2.0 / size / self.s  # one pixel in face units

    def window(self, u0: float, u1: float, v0: float, v1: float):
        """Slice ``(rows, cols)`` covering the face-space box, or None when off-canvas."""
        us = np.array([u0, u1, u0, u1])
        vs = np.array([v0, v0, v1, v1])
        X = self.s * (self.c * us - self.sn * vs) + self.tx
        Y = self.s * (self.sn * us + self.c * vs) + self.ty
        n = self.size
        cols = (X + 1) / 2 * n - 0.5
        rows = (Y + 1) / 2 * n - 0.5
        c0, c1 = max(int(math.floor(cols.min())) - 2, 0), min(int(math.ceil(cols.max())) + 3, n)
        r0, r1 = max(int(math.floor(rows.min())) - 2, 0), min(int(math.ceil(rows.max())) + 3, n)
        if c0 >= c1 or r0 >= r1:
            return None
        return (slice(r0, r1), slice(c0, c1))


class _Geometry:
    """Face-space positions and shapes derived from actions and identity."""

    def __init__(self, p: dict[str, Any]):
        A, I = p["actions"], p["identity"]
        pose = p["pose"]
        fdx, fdy = pose["feature_dx"], pose["feature_dy"]
        self.fa, self.fb = I["face_a"], I["face_b"]
        self.cx = fdx
        # eyes
        eo = A["eye_open"]
        smile = max(A["mouth_curve"], 0.0)
        self.ex, self.ey = I["eye_x"], I["eye_y"] + fdy
        self.ew = I["eye_w"]
        self.eh_up = max(I["eye_h"] * (1 + 0.65 * eo), 0.22 * I["eye_h"])
        self.eh_lo = max(0.7 * I["eye_h"] * (1 + 0.35 * eo) * (1 - 0.35 * smile), 0.15 * I["eye_h"])
        self.iris_r = 0.55 * I["eye_h"] + 0.012
        self.gx, self.gy = I["gaze_x"], I["gaze_y"]
        # brows
        self.brow_y = self.ey - I["brow_gap"] - 0.065 * A["brow_raise"]
        self.brow_inner = 0.055 * A["brow_inner"]
        self.brow_x = self.ex + 0.01 - 0.035 * max(A["brow_together"], -0.5)
        self.brow_hw = 0.105
        self.brow_t = I["brow_t"]
        self.brow_arch = I["brow_arch"]
        # nose
        wr = float(np.clip(A["nose_wrinkle"], 0.0, 1.3))
        self.wrinkle = wr
        self.ny = I["nose_y"] + fdy - 0.015 * wr
        self.nostril_dx = 0.036 * (1 + 0.25 * wr)
        # mouth
        self.my = I["mouth_y"] + fdy
        self.mw = I["mouth_w"] * (1 + 0.3 * float(np.clip(A["mouth_width"], -1.0, 1.3)))
        self.curve = 0.075 * A["mouth_curve"]
        self.asym = 0.07 * max(A["lip_corner_asym"], 0.0)
        self.asym_side = p["asym_side"]
        self.open = 0.095 * max(A["mouth_open"] - 0.1, 0.0)  # small dead zone: noise keeps lips closed
        self.ulr = 0.03 * max(A["upper_lip_raise"], 0.0)
        press = float(np.clip(A["lip_press"], -0.5, 1.0))
        self.lip_up = I["lip_t"] * (1 - 0.75 * press)
        self.lip_lo = 1.25 * I["lip_t"] * (1 - 0.75 * press)
        self.fold = float(np.clip(0.3 * smile + 0.25 * wr + 0.15 * max(A["upper_lip_raise"], 0), 0, 0.4))

    # --- analytic shapes on windowed face coordinates ---------------------------------
    def eye_shape(self, u, v, side):
        s = (u - (self.cx + side * self.ex)) * (1.0 / self.ew)
        base = np.clip(1 - s * s, 0, None) ** 0.7
        top = self.ey - self.eh_up * base
        bot = self.ey + self.eh_lo * base
        sd = np.maximum(np.maximum(top - v, v - bot), (np.abs(s) - 1) * self.ew)
        return sd, top, s

    def brow_shape(self, u, v, side):
        s = (u - (self.cx + side * self.brow_x)) * (side / self.brow_hw)  # -1 inner .. +1 outer
        sc = np.clip(s, -1, 1)
        centre = self.brow_y - self.brow_arch * (1 - sc * sc) - self.brow_inner * (1 - sc) * 0.5
        th = self.brow_t * (1.15 - 0.35 * (sc + 1) * 0.5)
        return np.maximum(np.abs(v - centre) - th, (np.abs(s) - 1) * self.brow_hw)

    def mouth_curves(self, u):
        s = (u - self.cx) * (1.0 / self.mw)
        sc = np.clip(s, -1, 1)
        base = 1 - sc * sc
        centre = self.my - self.curve * (sc * sc - 0.35) - self.asym * np.clip(self.asym_side * sc, 0, None) ** 2
        ob = base ** 0.6
        h_up = self.open * ob + self.ulr * base ** 0.5
        h_lo = self.open * ob
        lb = base ** 0.5
        return s, centre, h_up, h_lo, self.lip_up * lb, self.lip_lo * lb

    # bounding boxes (face coordinates), generous
    def eye_box(self, side, pad=0.02):
        cx = self.cx + side * self.ex
        return (cx - self.ew - pad, cx + self.ew + pad, self.ey - self.eh_up - pad, self.ey + self.eh_lo + pad)

    def brow_box(self, side, pad=0.02):
        cx = self.cx + side * self.brow_x
        return (cx - self.brow_hw - pad, cx + self.brow_hw + pad,
                self.brow_y - abs(self.brow_inner) - self.brow_arch - self.brow_t * 1.2 - pad,
                self.brow_y + abs(self.brow_inner) + self.brow_t * 1.2 + pad)

    def mouth_box(self, pad=0.03):
        ext = abs(self.curve) + self.asym + self.open + self.ulr + self.lip_lo + self.lip_up
        return (self.cx - self.mw - pad, self.cx + self.mw + pad, self.my - ext - pad, self.my + ext + pad)

    def nose_box(self):
        return (self.cx - 0.095, self.cx + 0.095, self.ey + 0.0, self.ny + 0.05)


def _render_masks(fr: _Frame, g: _Geometry) -> np.ndarray:
    """Region masks ``(4, H, W)`` uint8 (0/1) in :data:`REGIONS` order."""
    n = fr.size
    out = np.zeros((len(REGIONS), n, n), dtype=np.uint8)
    pad = 0.02
    for side in (-1, 1):
        w = fr.window(*g.eye_box(side, pad=0.04))
        if w is not None:
            u, v = fr.u[w], fr.v[w]
            cx = g.cx + side * g.ex
            sd = _ellipse_sd(u - cx, v - (g.ey + 0.5 * (g.eh_lo - g.eh_up)), g.ew + pad,
                             0.5 * (g.eh_up + g.eh_lo) + pad)
            out[0][w] |= (sd <= 0)
        w = fr.window(*g.brow_box(side, pad=0.04))
        if w is not None:
            sd = g.brow_shape(fr.u[w], fr.v[w], side)
            out[1][w] |= (sd <= pad)
    w = fr.window(*g.mouth_box(pad=0.05))
    if w is not None:
        u, v = fr.u[w], fr.v[w]
        s, centre, h_up, h_lo, t_up, t_lo = g.mouth_curves(u)
        sd = np.maximum(np.maximum(centre - h_up - t_up - v, v - (centre + h_lo + t_lo)),
                        (np.abs(s) - 1) * g.mw)
        out[2][w] |= (sd <= pad)
    x0, x1, y0, y1 = g.nose_box()
    w = fr.window(x0, x1, y0, y1)
    if w is not None:
        u, v = fr.u[w], fr.v[w]
        sd = _ellipse_sd(u - g.cx, v - 0.5 * (y0 + y1), 0.08, 0.5 * (y1 - y0))
        out[3][w] |= (sd <= 0)
    return out


def _segment_sd(u, v, p0, p1, half_width):
    ax, ay = p0
    bx, by = p1
    dx, dy = bx - ax, by - ay
    L2 = dx * dx + dy * dy + 1e-12
    t = np.clip(((u - ax) * dx + (v - ay) * dy) * (1.0 / L2), 0, 1)
    px, py = u - (ax + t * dx), v - (ay + t * dy)
    return np.sqrt(px * px + py * py) - half_width


def _rot(u, v, cx, cy, angle):
    c, s = math.cos(angle), math.sin(angle)
    du, dv = u - cx, v - cy
    return c * du + s * dv, -s * du + c * dv


def _draw_background(img: np.ndarray, p: dict[str, Any]) -> None:
    sc = p["scene"]
    n = img.shape[0]
    X, Y = _grid(n)
    bg = np.asarray(sc["background"], dtype=np.float32)
    img[:] = bg
    a = sc["bg_gradient_angle"]
    field = sc["bg_gradient"] * (math.cos(a) * X + math.sin(a) * Y)
    if sc["texture_amp"] > 0.005:
        ta = sc["texture_angle"]
        field = field + sc["texture_amp"] * np.sin(sc["texture_freq"] * (math.cos(ta) * X + math.sin(ta) * Y)
                                                   + sc["texture_phase"])
    img += field[..., None]
    pw = 2.0 / n
    for c in sc["clutter"]:
        r = max(c["rx"], c["ry"]) if c["kind"] == "ellipse" else math.hypot(c["rx"], c["ry"])
        cols = ((c["x"] - r + 1) / 2 * n - 2, (c["x"] + r + 1) / 2 * n + 2)
        rows = ((c["y"] - r + 1) / 2 * n - 2, (c["y"] + r + 1) / 2 * n + 2)
        c0, c1 = max(int(cols[0]), 0), min(int(math.ceil(cols[1])), n)
        r0, r1 = max(int(rows[0]), 0), min(int(math.ceil(rows[1])), n)
        if c0 >= c1 or r0 >= r1:
            continue
        w = (slice(r0, r1), slice(c0, c1))
        du, dv = _rot(X[w], Y[w], c["x"], c["y"], c["angle"])
        if c["kind"] == "ellipse":
            sd = _ellipse_sd(du, dv, c["rx"], c["ry"])
        else:
            sd = np.maximum(np.abs(du) - c["rx"], np.abs(dv) - c["ry"])
        _paint(img, w, _cov(sd, pw), c["colour"])


def _render_image(fr: _Frame, g: _Geometry, p: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """RGB float32 ``(H, W, 3)`` in [0, 1] (before quantisation)."""
    n = fr.size
    I = p["identity"]
    img = np.empty((n, n, 3), dtype=np.float32)
    _draw_background(img, p)
    u_all, v_all, pw = fr.u, fr.v, fr.pw
    skin = np.asarray(I["skin"], dtype=np.float32)
    hair = np.asarray(I["hair"], dtype=np.float32)
    fa, fb = g.fa, g.fb
    style = I["hair_style"]

    # long hair behind the head
    if style == 1:
        w = fr.window(-fa * 1.35, fa * 1.35, -fb * 1.2, fb * 1.5)
        if w is not None:
            u, v = u_all[w], v_all[w]
            sd = np.maximum(_ellipse_sd(u, v + 0.1, fa * 1.3, fb * 1.25), v - fb * 1.2)
            _paint(img, w, _cov(sd, pw), hair * 0.85)
    # shoulders and neck
    w = fr.window(-1.1, 1.1, 0.3, 2.2)
    if w is not None:
        u, v = u_all[w], v_all[w]
        neck = np.maximum(np.abs(u) - 0.2, 0.35 - v)
        _paint(img, w, _cov(neck, pw), skin * 0.78)
        sh = _ellipse_sd(u, v - (fb + 0.75), 1.0, 0.5)
        _paint(img, w, _cov(sh, pw), I["shirt"])
    # ears
    for side in (-1, 1):
        w = fr.window(side * fa - 0.09, side * fa + 0.09, -0.17, 0.13)
        if w is not None:
            sd = _ellipse_sd(u_all[w] - side * fa * 0.97, v_all[w] + 0.02, 0.055, 0.11)
            _paint(img, w, _cov(sd, pw), skin * 0.88)
    # face with radial shading
    w = fr.window(-fa - 0.02, fa + 0.02, -fb - 0.02, fb + 0.02)
    if w is not None:
        u, v = u_all[w], v_all[w]
        q = (u * (1.0 / fa)) ** 2 + (v * (1.0 / fb)) ** 2
        # slightly narrower jaw: widen the lower half of the ellipse less
        sd = _ellipse_sd(u * (1 + 0.12 * np.clip(v * (1 / fb), 0, 1)), v, fa, fb)
        shade = (1.06 - 0.2 * q * q)[..., None] * skin
        _paint(img, w, _cov(sd, pw), shade)
    # hair on top
    if style != 2:
        w = fr.window(-fa * 1.2, fa * 1.2, -fb * 1.25, 0.1)
        if w is not None:
            u, v = u_all[w], v_all[w]
            outer = (_ellipse_sd(u, v + 0.03, fa * 1.05, fb * 0.99) if style == 4 else
                     _ellipse_sd(u, v + 0.06, fa * 1.12, fb * 1.02))
            if style == 3:
                ang = np.arctan2(v + 0.06, u)
                outer = outer - 0.025 * np.sin(14 * ang)
            hl = (I["hairline"] - (0.1 if style == 4 else 0.0)) + 0.22 * (u * (1.0 / fa)) ** 2
            above = _cov(v - hl, pw)
            in_face = _cov(_ellipse_sd(u, v, fa, fb), pw)
            sides = _cov(v - (0.0 if style != 0 else -0.12), pw)
            alpha = _cov(outer, pw) * np.maximum(above, (1 - in_face) * sides)
            _paint(img, w, alpha, hair)

    dark = skin * 0.35
    brow_col = np.minimum(hair * 0.9, skin * 0.45)
    # brows
    for side in (-1, 1):
        w = fr.window(*g.brow_box(side))
        if w is not None:
            _paint(img, w, _cov(g.brow_shape(u_all[w], v_all[w], side), pw), brow_col)
    # eyes
    iris_col = _IRIS[I["iris"]].astype(np.float32)
    lid_w = max(0.009, 0.55 * pw)
    for side in (-1, 1):
        w = fr.window(*g.eye_box(side))
        if w is None:
            continue
        u, v = u_all[w], v_all[w]
        sd, top, s = g.eye_shape(u, v, side)
        a_eye = _cov(sd, pw)
        _paint(img, w, a_eye, (0.96, 0.95, 0.93))
        icx = g.cx + side * g.ex + g.gx
        a_iris = _cov(_ellipse_sd(u - icx, v - (g.ey + g.gy), g.iris_r, g.iris_r), pw) * a_eye
        _paint(img, w, a_iris, iris_col)
        a_pup = _cov(_ellipse_sd(u - icx, v - (g.ey + g.gy), 0.45 * g.iris_r, 0.45 * g.iris_r), pw) * a_eye
        _paint(img, w, a_pup, (0.03, 0.03, 0.03))
        lid = np.maximum(np.abs(v - top + 0.3 * lid_w) - lid_w, (np.abs(s) - 1.08) * g.ew)
        _paint(img, w, _cov(lid, pw) * 0.9, (0.08, 0.06, 0.05))
    # nose
    x0, x1, y0, y1 = g.nose_box()
    w = fr.window(x0 - 0.15, x1 + 0.15, y0, g.my + 0.05)
    if w is not None:
        u, v = u_all[w], v_all[w]
        tip = _ellipse_sd(u - g.cx, v - (g.ny + 0.012), 0.06, 0.028)
        _paint(img, w, _cov(tip, pw * 2.5) * 0.22, dark)
        for side in (-1, 1):
            sd = _ellipse_sd(u - (g.cx + side * g.nostril_dx), v - g.ny, 0.02, 0.011)
            _paint(img, w, _cov(sd, pw) * 0.8, dark * 0.7)
            ridge = _segment_sd(u, v, (g.cx + side * 0.028, g.ey + 0.04), (g.cx + side * 0.05, g.ny - 0.03), 0.006)
            _paint(img, w, _cov(ridge, pw * 1.5) * 0.25, dark)
            if g.fold > 0.02:
                cu = g.cx + side * (g.mw + 0.03)
                fold = _segment_sd(u, v, (g.cx + side * 0.085, g.ny - 0.005), (cu, g.my - 0.02), 0.005)
                _paint(img, w, _cov(fold, pw * 1.5) * g.fold, dark)
        if g.wrinkle > 0.05:
            for k in range(3):
                vy = g.ey + 0.01 + 0.024 * k
                sd = np.maximum(np.abs(v - vy + 4.0 * (u - g.cx) ** 2) - 0.0055, np.abs(u - g.cx) - 0.04)
                _paint(img, w, _cov(sd, pw) * min(0.8 * g.wrinkle, 0.8), dark)
    # mouth
    w = fr.window(*g.mouth_box())
    if w is not None:
        u, v = u_all[w], v_all[w]
        s, centre, h_up, h_lo, t_up, t_lo = g.mouth_curves(u)
        ends = (np.abs(s) - 1) * g.mw
        lips = np.maximum(np.maximum(centre - h_up - t_up - v, v - (centre + h_lo + t_lo)), ends)
        lip_col = skin * np.array([0.85, 0.52, 0.52], dtype=np.float32)
        _paint(img, w, _cov(lips, pw), lip_col)
        inner = np.maximum(np.maximum(centre - h_up - v, v - (centre + h_lo)), ends)
        a_in = _cov(inner, pw)
        _paint(img, w, a_in, (0.22, 0.05, 0.06))
        teeth_h = np.minimum(0.45 * (h_up + h_lo), 0.03)
        teeth = np.maximum(np.maximum(centre - h_up - v, v - (centre - h_up + teeth_h)), ends + 0.01)
        _paint(img, w, _cov(teeth, pw) * a_in, (0.95, 0.94, 0.88))
        line = np.maximum(np.abs(v - centre) - 0.45 * lid_w, ends)
        _paint(img, w, _cov(line, pw) * 0.85, lip_col * 0.45)
    # glasses
    if I["glasses"]:
        w = fr.window(-0.4, 0.4, g.ey - 0.15, g.ey + 0.15)
        if w is not None:
            u, v = u_all[w], v_all[w]
            col = np.asarray(I["hair"], dtype=np.float32) * 0.5
            for side in (-1, 1):
                ring = _ellipse_sd(u - (g.cx + side * g.ex), v - g.ey, 0.125, 0.085)
                _paint(img, w, _cov(ring, pw) * 0.12, (0.6, 0.7, 0.75))
                _paint(img, w, _cov(np.abs(ring) - 0.008, pw), col)
            bridge = _segment_sd(u, v, (g.cx - g.ex + 0.125, g.ey - 0.01), (g.cx + g.ex - 0.125, g.ey - 0.01), 0.008)
            _paint(img, w, _cov(bridge, pw), col)
    # occluder
    _draw_occluder(img, fr, g, p)
    # lighting, colour cast, brightness/contrast
    sc = p["scene"]
    X, Y = _grid(n)
    la = sc["light_angle"]
    gain = 1.0 + sc["light_strength"] * (math.cos(la) * X + math.sin(la) * Y)
    cast = 1.0 + np.asarray(sc["colour_cast"], dtype=np.float32)
    img *= gain[..., None] * cast
    c = sc["contrast"]
    img *= c
    img += sc["brightness"] + 0.5 * (1 - c)
    # blur and noise
    sigma = sc["blur_px96"] * n / 96.0
    if sigma > 0.25:
        img = _blur(img, sigma)
    if sc["noise"] > 0.002:
        img += sc["noise"] * rng.standard_normal((n, n, 3), dtype=np.float32)
    return img


def _occluder_alpha(fr: _Frame, g: _Geometry, p: dict[str, Any], w) -> np.ndarray:
    """Occluder coverage on window ``w`` of the canvas."""
    o = p["occluder"]
    u, v = fr.u[w], fr.v[w]
    pw = fr.pw
    kind = o["kind"]
    if kind == "hand":
        du, dv = _rot(u, v, o["x"], o["y"], o["angle"])
        k = o["size"]
        sd = _ellipse_sd(du, dv, 0.15 * k, 0.18 * k)
        for j, off in enumerate((-0.09, -0.03, 0.03, 0.09)):
            fu = du - off * k
            fv = dv + (0.24 - 0.02 * abs(j - 1.5)) * k
            sd = np.minimum(sd, _ellipse_sd(fu, fv, 0.032 * k, 0.13 * k))
        return _cov(sd, pw)
    if kind == "medical_mask":
        fa, fb = g.fa, g.fb
        sd = np.maximum(_ellipse_sd(u, v, fa * 1.04, fb * 1.02), g.ny - 0.06 - v)
        sd = np.maximum(sd, v - fb * 0.92)
        strap = np.minimum(_segment_sd(u, v, (-fa * 0.9, g.ny - 0.04), (-fa * 1.02, -0.02), 0.006),
                           _segment_sd(u, v, (fa * 0.9, g.ny - 0.04), (fa * 1.02, -0.02), 0.006))
        return _cov(np.minimum(sd, strap), pw)
    if kind == "sunglasses":
        sd = np.minimum(_ellipse_sd(u - (g.cx - g.ex), v - g.ey, 0.13, 0.09),
                        _ellipse_sd(u - (g.cx + g.ex), v - g.ey, 0.13, 0.09))
        sd = np.minimum(sd, _segment_sd(u, v, (g.cx - 0.08, g.ey - 0.02), (g.cx + 0.08, g.ey - 0.02), 0.012))
        return _cov(sd, pw)
    if kind == "patch":
        du, dv = _rot(u, v, o["x"], o["y"], o["angle"])
        k = o["size"]
        return _cov(np.maximum(np.abs(du) - 0.16 * k, np.abs(dv) - 0.11 * k), pw)
    raise ValueError(f"unknown occluder kind {kind!r}")


def _occluder_window(fr: _Frame, g: _Geometry, p: dict[str, Any]):
    o = p["occluder"]
    if o["kind"] == "none":
        return None
    if o["kind"] in ("hand", "patch"):
        r = 0.45 * o["size"]
        return fr.window(o["x"] - r, o["x"] + r, o["y"] - r, o["y"] + r)
    if o["kind"] == "medical_mask":
        return fr.window(-g.fa * 1.1, g.fa * 1.1, g.ny - 0.1, g.fb)
    return fr.window(-0.4, 0.4, g.ey - 0.12, g.ey + 0.12)


def _draw_occluder(img: np.ndarray, fr: _Frame, g: _Geometry, p: dict[str, Any]) -> None:
    w = _occluder_window(fr, g, p)
    if w is None:
        return
    o = p["occluder"]
    alpha = _occluder_alpha(fr, g, p, w)
    col = np.asarray(o["colour"], dtype=np.float32)
    if o["kind"] == "hand":
        du, dv = _rot(fr.u[w], fr.v[w], o["x"], o["y"], o["angle"])
        col = col * (1.05 - 0.25 * np.clip((du * du + dv * dv) * (1.0 / (0.2 * o["size"]) ** 2), 0, 1))[..., None]
    elif o["kind"] == "sunglasses":
        col = col * 0.15
    elif o["kind"] == "medical_mask":
        pleat = np.abs(np.sin((fr.v[w] - g.ny) * 60.0))
        col = col * (0.9 + 0.1 * pleat)[..., None]
    _paint(img, w, alpha, col)


def _occluded_fractions(fr: _Frame, g: _Geometry, p: dict[str, Any], masks: np.ndarray) -> dict[str, float]:
    w = _occluder_window(fr, g, p)
    occ = np.zeros(masks.shape[1:], dtype=bool)
    if w is not None:
        occ[w] = _occluder_alpha(fr, g, p, w) >= 0.5
    out = {}
    for r, name in enumerate(REGIONS):
        m = masks[r].astype(bool)
        tot = int(m.sum())
        out[name] = float((m & occ).sum() / tot) if tot else 0.0
    return out


def render_params(p: dict[str, Any], size: int, *, grayscale: bool = False, image: bool = True,
                  masks: bool = False, noise_rng: np.random.Generator | None = None
                  ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Draw the face described by ``p`` (from :func:`sample_params`) at ``size`` px.

    Returns ``(image, masks)``: ``image`` uint8 ``(size, size)`` (grayscale) or
    ``(size, size, 3)`` (RGB), ``masks`` uint8 ``(4, size, size)`` with 0/1 values in
    :data:`REGIONS` order; each is None when not asked for. ``noise_rng`` draws the
    pixel noise (a fixed generator when None).
    """
    fr = _Frame(size, p["pose"])
    g = _Geometry(p)
    img_out = mask_out = None
    if image:
        rng = noise_rng if noise_rng is not None else np.random.default_rng(0)
        img = _render_image(fr, g, p, rng)
        np.clip(img, 0.0, 1.0, out=img)
        if grayscale:
            img = 0.299 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2]
        img_out = (img * 255.0 + 0.5).astype(np.uint8)
    if masks:
        mask_out = _render_masks(fr, g)
    return img_out, mask_out


# ----------------------------------------------------------------------------------------
# dataset
# ----------------------------------------------------------------------------------------
def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


class SyntheticFaces(FaceDataset):
    """Procedurally rendered faces with 8 expression classes (AffectNet order).

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``; splits never share items.
        size: image side in pixels (16..1024; faces are drawn at this size directly).
        num_samples: number of items (default 6000 train / 1200 val / 1200 test), or a
            dict ``{split: n}`` giving some splits their own size (the others keep the
            default). Item ``i`` is the same image whatever ``num_samples`` is.
        seed: non-negative int; with ``split`` and the index it fixes every item.
        grayscale: ``load_image`` returns ``(H, W)`` instead of ``(H, W, 3)``.
        transform: applied to the uint8 ``(C, H, W)`` tensor (jointly with the masks
            when ``return_masks``; v2 transforms accept ``transform(image, mask)``).
            When None, ``__getitem__`` returns float32 ``(C, H, W)`` in ``[0, 1]``.
        label_space: see :class:`FaceDataset`.
        return_masks: ``__getitem__`` returns ``(image, label, masks)`` with ``masks`` a
            ``tv_tensors.Mask`` ``(4, H, W)`` uint8 in :data:`REGIONS` order.
        cache: None (render on the fly) or a directory: all images are rendered once
            into one memory-mapped uint8 ``.npy`` named after the generation parameters.
        occlusion_rate: probability in [0, 1] that an image has an occluder (hand,
            medical mask, sunglasses, patch). Independent of ``difficulty``: pass 0 for
            unoccluded faces.
        difficulty: nuisance strength in [0, 2]: 0 = clean frontal faces on a plain
            background, no glasses (identity and expression still vary), 1 = default "in the
            wild" level, 2 = extreme.
    """

    name = "synthetic"
    native_classes = AFFECTNET8

    def __init__(self, split: str = "train", size: int = 96, num_samples: int | dict | None = None, seed: int = 0,
                 grayscale: bool = False, transform: Callable | None = None, label_space: str | None = None,
                 return_masks: bool = False, cache: str | os.PathLike | None = None,
                 occlusion_rate: float = 0.25, difficulty: float = 1.0):
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: expected one of {SPLITS}")
        if not _is_int(size) or not 16 <= size <= 1024:
            raise ValueError(f"size={size!r}: expected an int between 16 and 1024 (pixels)")
        if isinstance(num_samples, dict):
            unknown = sorted(set(num_samples) - set(DEFAULT_SIZES))
            if unknown:
                raise ValueError(f"num_samples: unknown split(s) {unknown}; expected keys from {tuple(DEFAULT_SIZES)}")
            num_samples = num_samples.get(split)
        if num_samples is not None and (not _is_int(num_samples) or num_samples < 1):
            raise ValueError(f"num_samples={num_samples!r}: expected None, an int >= 1 or a dict of them per split")
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"seed={seed!r}: expected a non-negative int")
        if not isinstance(grayscale, bool):
            raise ValueError(f"grayscale={grayscale!r}: expected a bool")
        if not isinstance(return_masks, bool):
            raise ValueError(f"return_masks={return_masks!r}: expected a bool")
        if transform is not None and not callable(transform):
            raise ValueError(f"transform={transform!r}: expected None or a callable")
        if cache is not None and not isinstance(cache, (str, os.PathLike)):
            raise ValueError(f"cache={cache!r}: expected None or a directory path")
        if not _is_real(occlusion_rate) or not 0.0 <= float(occlusion_rate) <= 1.0:
            raise ValueError(f"occlusion_rate={occlusion_rate!r}: expected a number in [0, 1]")
        if not _is_real(difficulty) or not 0.0 <= float(difficulty) <= 2.0:
            raise ValueError(f"difficulty={difficulty!r}: expected a number in [0, 2]")
        super().__init__(transform=transform, label_space=label_space)
        self.split = split
        self.size = int(size)
        self.seed = int(seed)
        self.grayscale = grayscale
        self.return_masks = return_masks
        self.occlusion_rate = float(occlusion_rate)
        self.difficulty = float(difficulty)
        self._split_id = SPLITS.index(split)
        n = DEFAULT_SIZES[split] if num_samples is None else int(num_samples)
        self.native_targets = balanced_labels(self.seed, split, n)
        _ = self.targets  # reject a label space that lacks some of the classes now
        self.cache_path: Path | None = None
        self._images: np.ndarray | None = None
        if cache is not None:
            params = self.generation_params()
            self.cache_path = cache_path(cache, "synthetic", split, params)
            opened = open_cache(self.cache_path, params, len(self))
            if opened is None:
                shape = (len(self), self.size, self.size) + (() if self.grayscale else (3,))
                opened = write_cache(self.cache_path, params, shape, lambda i: self._render(i, True, False)[1])
            self._images = opened[0]

    # ---- identity ---------------------------------------------------------------------
    def generation_params(self) -> dict[str, Any]:
        """Everything that determines the images (cache key and item ids)."""
        return {"version": RENDER_VERSION, "split": self.split, "size": self.size, "num_samples": len(self),
                "seed": self.seed, "grayscale": self.grayscale, "occlusion_rate": self.occlusion_rate,
                "difficulty": self.difficulty}

    def item_ids(self) -> list[str]:
        q = (f"v{RENDER_VERSION}&size={self.size}&gray={int(self.grayscale)}"
             f"&occ={self.occlusion_rate:g}&diff={self.difficulty:g}")
        return [f"synthetic/{self.split}/{self.seed}/{i}?{q}" for i in range(len(self))]

    def describe(self, indices=None) -> dict[str, Any]:
        """The base summary plus ``"generation"``: the parameters that determine the images."""
        d = super().describe(indices)
        d["generation"] = self.generation_params()
        return d

    # ---- rendering --------------------------------------------------------------------
    def params(self, index: int) -> dict[str, Any]:
        """The sampled actions, intensity, identity and nuisances of item ``index`` (JSON-able)."""
        i = self.check_index(index)
        return sample_params(self.seed, self.split, i, int(self.native_targets[i]),
                             difficulty=self.difficulty, occlusion_rate=self.occlusion_rate)

    def _render(self, i: int, image: bool, masks: bool):
        p = sample_params(self.seed, self.split, i, int(self.native_targets[i]),
                          difficulty=self.difficulty, occlusion_rate=self.occlusion_rate)
        noise_rng = np.random.default_rng([self.seed, self._split_id, 2, i])
        img, m = render_params(p, self.size, grayscale=self.grayscale, image=image, masks=masks,
                               noise_rng=noise_rng)
        return p, img, m

    def render(self, index: int) -> dict[str, Any]:
        """Render item ``index`` from scratch (ignores the cache and the transform).

        Returns ``{"image": uint8 (H, W) or (H, W, 3), "label": int (in :attr:`classes`
        order), "masks": uint8 (4, H, W) 0/1 in REGIONS order, "params": dict}``;
        ``params["occluded"]`` gives the fraction of each region hidden by the occluder.
        Masks mark where the regions are, occluded or not.
        """
        i = self.check_index(index)
        p, img, m = self._render(i, True, True)
        fr, g = _Frame(self.size, p["pose"]), _Geometry(p)
        p["occluded"] = _occluded_fractions(fr, g, p, m)
        return {"image": img, "label": int(self.targets[i]), "masks": m, "params": p}

    def render_masks(self, index: int) -> np.ndarray:
        """Region masks of item ``index``: uint8 ``(4, H, W)``, 0/1, :data:`REGIONS` order."""
        return self._render(self.check_index(index), False, True)[2]

    def load_image(self, index: int) -> np.ndarray:
        """Item ``index`` as uint8 ``(H, W)`` (grayscale) or ``(H, W, 3)`` (RGB), from the cache if any."""
        i = self.check_index(index)
        if self.cache_path is not None:
            return np.array(self._cached()[i])
        return self._render(i, True, False)[1]

    def __getitem__(self, index: int):
        """``(image, label)``, or ``(image, label, masks)`` with ``return_masks``.

        Without a transform ``image`` is float32 ``(C, H, W)`` in ``[0, 1]`` (C = 1 or 3) and
        ``masks`` a uint8 ``tv_tensors.Mask`` ``(4, H, W)``; with one, both are what
        ``transform(image)`` / ``transform(image, masks)`` return for the uint8 ``(C, H, W)`` image.
        """
        i = self.check_index(index)
        label = int(self.targets[i])
        if self.return_masks and self.cache_path is None:
            _, img, m = self._render(i, True, True)
        else:
            img = self.load_image(i)
            m = self.render_masks(i) if self.return_masks else None
        image = to_chw_uint8(img)
        if not self.return_masks:
            if self.transform is None:
                return image.to(torch.float32).div_(255.0), label
            return self.transform(image), label
        masks = tv_tensors.Mask(torch.from_numpy(m))
        if self.transform is None:
            return image.to(torch.float32).div_(255.0), label, masks
        image, masks = self.transform(image, masks)
        return image, label, masks

    # ---- cache ------------------------------------------------------------------------
    def _cached(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self.cache_path, mmap_mode="r")
        return self._images

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_images"] = None  # reopen the memory map in each worker
        return state


# ----------------------------------------------------------------------------------------
# attention analysis
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def attention_in_regions(maps: torch.Tensor, masks: torch.Tensor,
                         regions: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """How much of each attention map falls inside the face regions.

    Args:
        maps: ``(B, h, w)`` non-negative attention (e.g. ESR's 6x6 spatial attention).
        masks: ``(B, R, H, W)`` 0/1 region masks at image resolution (any dtype).
        regions: names of the ``R`` mask channels (default :data:`REGIONS`).

    The maps are upsampled bilinearly (``align_corners=False``) to ``(H, W)`` and
    normalised to unit mass. Returns a dict of float32 tensors of shape ``(B,)`` on
    ``maps``' device:

    - ``"inside"``: share of attention mass inside the union of the regions;
    - ``"area"``: area fraction of that union (what uniform attention scores);
    - ``"lift"``: ``inside / area`` (1 = no better than uniform; NaN when area is 0);
    - ``"<region>"`` for each region name: share of mass inside that region.

    A map with zero total mass gets 0 shares.
    """
    if maps.ndim != 3:
        raise ValueError(f"maps: expected shape (B, h, w), got {tuple(maps.shape)}")
    if masks.ndim != 4 or masks.shape[0] != maps.shape[0]:
        raise ValueError(f"masks: expected shape (B, R, H, W) with B={maps.shape[0]}, got {tuple(masks.shape)}")
    names = tuple(REGIONS if regions is None else regions)
    if len(names) != masks.shape[1]:
        raise ValueError(f"regions: {len(names)} names for {masks.shape[1]} mask channels")
    H, W = masks.shape[-2:]
    m = torch.as_tensor(masks).to(device=maps.device, dtype=torch.float32)
    a = maps.to(torch.float32).clamp_min(0)
    if a.shape[-2:] != (H, W):
        a = F.interpolate(a[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0]
    total = a.sum(dim=(1, 2))
    safe = torch.where(total > 0, total, torch.ones_like(total))
    union = m.amax(dim=1)
    out: dict[str, torch.Tensor] = {}
    inside = (a * union).sum(dim=(1, 2)) / safe
    inside = torch.where(total > 0, inside, torch.zeros_like(inside))
    area = union.mean(dim=(1, 2))
    out["inside"] = inside
    out["area"] = area
    out["lift"] = torch.where(area > 0, inside / area.clamp_min(1e-12), torch.full_like(area, float("nan")))
    shares = (a[:, None] * m).sum(dim=(2, 3)) / safe[:, None]
    shares = torch.where(total[:, None] > 0, shares, torch.zeros_like(shares))
    for r, name in enumerate(names):
        out[name] = shares[:, r]
    return out
