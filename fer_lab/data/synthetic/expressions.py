"""What a synthetic face is: regions, facial actions, class prototypes, and the sampling of
every random choice of one item (:func:`sample_params`, the renderer's only input).

Each of the 8 AffectNet classes is a vector of FACS-like facial actions; every sample scales
its class's vector by a random intensity and adds per-action noise, so classes overlap and
weak expressions look near-neutral. Identity, pose, scene and occluder are drawn here too,
scaled by ``difficulty``. Draws are a pure function of ``(seed, split, index)``.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..labels import AFFECTNET8

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
OCCLUDERS: tuple[str, ...] = ("hand", "medical_mask", "sunglasses", "patch")
#: Bumped whenever the renderer's output changes; part of cache keys and item ids.

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
