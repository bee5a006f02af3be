"""The analytic renderer of synthetic faces: ellipses, bands and curves on a pixel grid,
anti-aliased through signed distances, at any size; plus the per-region masks (eyes, brows,
mouth, nose) the renderer knows because it drew them. :func:`render_params` turns one
:func:`~fer_lab.data.synthetic.expressions.sample_params` dict into an image and masks.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .expressions import _IRIS, REGIONS

#: Bumped whenever the renderer's output changes; part of cache keys and item ids.
RENDER_VERSION = 2


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
