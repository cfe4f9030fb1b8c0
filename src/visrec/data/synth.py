"""Synthetic, labelled face-like identities with exact 106-point landmarks, written in the real formats.

Each identity (derived deterministically from ``(seed, identity)``) has its own geometry (face outline,
eye/brow/nose/mouth placement and size), colours (skin, hair, iris, lips) and a skin texture (a fixed
pattern of marks). Each image adds expression (mouth opening, eye closure), yaw (inner features shift
with their depth), in-plane pose (rotation, scale, translation), illumination (gain, gradient), blur,
noise and occlusion; ``difficulty`` in [0, 1] scales every nuisance.

The face is drawn in a canonical 112x112 frame from polygons whose vertices include the landmarks, then
the in-plane pose is applied with one affine warp to the image and the same matrix to the points, so the
landmarks are exact (pixel coordinates in OpenCV's convention: pixel (x, y) has its centre at (x, y)). The order is JD-landmark 106 (``visrec.data.schemes``).

Landmark sidecars (documented format):
  RecordIO      ``landmarks106.npy`` beside ``train.rec``: float32 (num_images, 106, 2) in image order
                (the order of ``RecordIOReader.image(i)``).
  image folder  ``<root>-landmarks/<identity>/<image stem>.txt`` (a sibling of the root): first line
                ``106``, then one ``x y`` per line — the JD-landmark annotation format — kept outside
                the root so readers of the folder see only identity folders of images.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

SIZE = 112
_CX, _CY = 56.0, 58.0


def _identity_params(seed: int, identity: int) -> dict:
    rng = np.random.default_rng([seed, identity, 7919])
    u = rng.uniform
    return {
        "face_a": u(27, 36), "face_b": u(37, 46), "jaw": u(0.75, 1.15),
        "eye_dx": u(13, 19), "eye_y": u(-10, -4), "eye_w": u(5.5, 9), "eye_h": u(2.2, 4.2),
        "brow_dy": u(5, 10), "brow_w": u(8, 13), "brow_arch": u(0, 4), "brow_thick": int(rng.integers(1, 4)),
        "nose_len": u(11, 19), "nose_w": u(5, 10), "mouth_y": u(17, 25), "mouth_w": u(9, 16),
        "lip_h": u(1.5, 4), "skin": rng.uniform(60, 235, 3), "hair": rng.uniform(0, 200, 3),
        "iris": rng.uniform(0, 200, 3), "lips": rng.uniform(60, 220, 3), "hair_h": u(0.15, 0.6),
        "marks": [(u(-0.8, 0.8), u(-0.7, 0.8), u(1.2, 3.5), u(-60, 60)) for _ in range(int(rng.integers(2, 6)))],
    }


def _arc(cx, cy, a, b, start, end, n) -> np.ndarray:
    t = np.radians(np.linspace(start, end, n))
    return np.stack([cx + a * np.cos(t), cy + b * np.sin(t)], axis=1)


def _canonical(p: dict, smile: float, mouth_open: float, eye_open: float, yaw: float) -> dict[str, np.ndarray]:
    """Named point groups in the canonical frame (y down). ``yaw`` in [-1, 1] shifts features by depth."""
    a, b = p["face_a"], p["face_b"]
    contour = _arc(_CX, _CY, a, b, 170, 10, 33)
    contour[:, 1] = _CY + (contour[:, 1] - _CY) * np.where(contour[:, 1] > _CY, p["jaw"], 1.0)
    g: dict[str, np.ndarray] = {"contour": contour}
    ey = _CY + p["eye_y"]
    for side, sgn in (("left", -1), ("right", 1)):
        ex = _CX + sgn * p["eye_dx"]
        w, h = p["eye_w"], p["eye_h"] * eye_open
        outer, inner = (ex + sgn * w, ey), (ex - sgn * w, ey)
        up = [(ex + sgn * w * 0.5, ey - h * 0.85), (ex - sgn * w * 0.5, ey - h * 0.85)]
        lo = [(ex - sgn * w * 0.5, ey + h * 0.85), (ex + sgn * w * 0.5, ey + h * 0.85)]
        # left eye runs outer->upper->inner->lower; right eye inner->upper->outer->lower (JD order)
        if side == "left":
            ring = [outer, *up, inner, *lo]
        else:
            ring = [inner, up[1], up[0], outer, lo[1], lo[0]]
        g[f"{side}_eye"] = np.array(ring + [(ex, ey - h), (ex, ey + h)])
        g[f"{side}_eye_center"] = np.array([[ex, ey]])
        g[f"{side}_pupil"] = np.array([[ex + yaw * 1.5, ey]])
        by = ey - p["brow_dy"]
        xs = np.linspace(ex + sgn * p["brow_w"], ex - sgn * p["brow_w"] * 0.8, 5)  # outer -> inner
        arch = p["brow_arch"] * np.sin(np.linspace(0, math.pi, 5))
        upper = np.stack([xs, by - arch], 1)
        lower = np.stack([xs[:4] + (xs[1] - xs[0]) * 0.5, by - arch[:4] + 2.0 + p["brow_thick"]], 1)
        g[f"{side}_brow_upper"] = upper if side == "left" else upper[::-1]
        g[f"{side}_brow_lower"] = lower if side == "left" else lower[::-1]
    nose_top, tip_y = ey + 1, ey + 1 + p["nose_len"]
    g["nose_bridge"] = np.stack([np.full(4, _CX), np.linspace(nose_top, tip_y, 4)], 1)
    nw = p["nose_w"]
    g["nose_base"] = np.array([[_CX - nw, tip_y - 1], [_CX - nw / 2, tip_y + 1.5], [_CX, tip_y + 2],
                               [_CX + nw / 2, tip_y + 1.5], [_CX + nw, tip_y - 1]])
    wing_y = np.linspace(nose_top + p["nose_len"] * 0.4, tip_y - 1, 3)
    g["nose_wings"] = np.array([[_CX + s * nw * (0.45 + 0.25 * k), y] for k, y in enumerate(wing_y) for s in (-1, 1)])
    my, mw, lh = _CY + p["mouth_y"], p["mouth_w"] * (1 + 0.15 * smile), p["lip_h"]
    corner_y = my - 2.5 * smile
    gap = 3.5 * mouth_open
    xs = np.linspace(_CX - mw, _CX + mw, 7)
    upper_outer = np.stack([xs, my - gap / 2 - lh * np.sin(np.linspace(0, math.pi, 7)) - 0.8], 1)
    upper_outer[[0, -1], 1] = corner_y
    lower_outer = np.stack([xs[1:-1][::-1], my + gap / 2 + lh * 1.3 * np.sin(np.linspace(0, math.pi, 7))[1:-1]], 1)
    g["outer_lip"] = np.concatenate([upper_outer, lower_outer])  # 84 left corner .. 90 right corner .. 95
    xi = np.linspace(_CX - mw * 0.8, _CX + mw * 0.8, 5)
    inner_up = np.stack([xi, np.full(5, my - gap / 2)], 1)
    inner_up[[0, -1], 1] = corner_y
    inner_lo = np.stack([xi[1:-1][::-1], np.full(3, my + gap / 2)], 1)
    g["inner_lip"] = np.concatenate([inner_up, inner_lo])
    # yaw: features nearer the camera move more (nose tip most, contour sides least)
    depth = {"nose_bridge": 0.5, "nose_base": 0.6, "nose_wings": 0.5, "outer_lip": 0.35, "inner_lip": 0.35}
    for name, pts in g.items():
        if name != "contour":
            g[name] = pts + np.array([yaw * 9 * depth.get(name, 0.25), 0])
    squash = 1 - 0.25 * abs(yaw)
    side = contour[:, 0] < _CX if yaw > 0 else contour[:, 0] > _CX
    g["contour"][side, 0] = _CX + (contour[side, 0] - _CX) * squash
    return g


def _assemble(g: dict[str, np.ndarray]) -> np.ndarray:
    from visrec.data.schemes import get_scheme

    out = np.zeros((106, 2), np.float64)
    for name, idx in get_scheme("jd106").groups.items():
        out[idx] = g[name]
    return out


def _poly(img, pts, color) -> None:
    cv2.fillPoly(img, [np.round(pts * 16).astype(np.int32)], color, cv2.LINE_AA, shift=4)


def _draw(p: dict, g: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    bg = rng.uniform(30, 225, 3)
    img = np.empty((SIZE, SIZE, 3), np.float32)
    img[:] = bg
    img = img.astype(np.uint8)
    top = _arc(_CX, _CY, p["face_a"], p["face_b"], 350, 190, 16)  # right -> left over the top
    _poly(img, np.concatenate([g["contour"], top]), tuple(float(c) for c in p["skin"]))
    hair = _arc(_CX, _CY, p["face_a"] * 1.05, p["face_b"] * 1.05, 180, 360, 16)
    hair_line = hair.copy()
    hair_line[:, 1] = np.maximum(hair_line[:, 1], _CY - p["face_b"] * (1 - p["hair_h"]))
    _poly(img, np.concatenate([hair, hair_line[::-1]]), tuple(float(c) for c in p["hair"]))
    skin_dark = tuple(float(c) * 0.6 for c in p["skin"])
    for mx, my, r, ang in p["marks"]:
        cv2.ellipse(img, (int(_CX + mx * p["face_a"] * 0.7), int(_CY + my * p["face_b"] * 0.6)),
                    (int(r * 2), int(r)), ang, 0, 360, skin_dark, -1, cv2.LINE_AA)
    for side in ("left", "right"):
        eye = g[f"{side}_eye"][:6]
        _poly(img, eye, (245, 245, 245))
        c = g[f"{side}_pupil"][0]
        r = max(1.0, p["eye_h"] * 0.9)
        cv2.circle(img, (int(round(c[0] * 16)), int(round(c[1] * 16))), int(r * 16), tuple(float(x) for x in p["iris"]), -1, cv2.LINE_AA, 4)
        cv2.circle(img, (int(round(c[0] * 16)), int(round(c[1] * 16))), int(r * 7), (10, 10, 10), -1, cv2.LINE_AA, 4)
        brow = np.concatenate([g[f"{side}_brow_upper"], g[f"{side}_brow_lower"][::-1]])
        _poly(img, brow, tuple(float(c) * 0.8 for c in p["hair"]))
    nose = np.concatenate([g["nose_bridge"][:1], g["nose_base"][[4]], g["nose_base"][[0]]])
    _poly(img, nose, tuple(float(c) * 0.85 for c in p["skin"]))
    for k in (1, 3):
        n = g["nose_base"][k]
        cv2.circle(img, (int(n[0]), int(n[1] - 1)), 1, (40, 30, 30), -1)
    _poly(img, g["outer_lip"], tuple(float(c) for c in p["lips"]))
    _poly(img, g["inner_lip"], (40, 20, 20))
    return img


def render_face(identity: int, rng: np.random.Generator, difficulty: float = 0.3, seed: int = 0):
    """One image of ``identity``: (HxWx3 RGB uint8 112x112, float32 (106, 2) landmarks, JD order)."""
    d = float(np.clip(difficulty, 0, 1))
    p = _identity_params(seed, identity)
    g = _canonical(p, smile=rng.uniform(0, d), mouth_open=rng.uniform(0, d),
                   eye_open=1 - rng.uniform(0, 0.6 * d), yaw=rng.uniform(-d, d) * 0.8)
    canvas = _draw(p, g, rng)
    angle = rng.uniform(-1, 1) * (4 + 22 * d)
    scale = 1 + rng.uniform(-1, 1) * 0.12 * d
    shift = rng.uniform(-1, 1, 2) * (1 + 7 * d)
    M = cv2.getRotationMatrix2D((_CX, _CY), angle, scale)
    M[:, 2] += shift
    img = cv2.warpAffine(canvas, M, (SIZE, SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    pts = _assemble(g)
    pts = pts @ M[:, :2].T + M[:, 2]
    img = img.astype(np.float32)
    gain = 1 + rng.uniform(-0.45, 0.35) * d
    grad_dir = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE - 0.5
    img *= (gain + 0.6 * d * rng.uniform(0, 1) * (np.cos(grad_dir) * xx + np.sin(grad_dir) * yy))[..., None]
    img += rng.uniform(-20, 20, 3) * d  # colour cast
    sigma = rng.uniform(0, 1.6 * d)
    if sigma > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    img += rng.normal(0, 1 + 10 * d, img.shape).astype(np.float32)
    if rng.uniform() < 0.5 * d:  # occluder: a bar or a patch of random colour
        w, h = rng.integers(15, 15 + int(45 * d) + 1, 2)
        x0, y0 = rng.integers(0, SIZE - 10, 2)
        img[y0:y0 + h, x0:x0 + w] = rng.uniform(0, 255, 3)
    return np.clip(img, 0, 255).astype(np.uint8), pts.astype(np.float32)


def iter_faces(num_identities: int, images_per_identity: int, *, seed: int = 0, difficulty: float = 0.3,
               first_identity: int = 0) -> Iterator[tuple[np.ndarray, int, np.ndarray]]:
    """Yield (image, label, landmarks); labels 0..num_identities-1 render identity first_identity+label."""
    for label in range(num_identities):
        rng = np.random.default_rng([seed, first_identity + label, 104729])
        for _ in range(images_per_identity):
            img, pts = render_face(first_identity + label, rng, difficulty, seed)
            yield img, label, pts


def write_face_dataset(out_dir: str | Path, num_identities: int, images_per_identity: int, *,
                       format: str = "recordio", seed: int = 0, difficulty: float = 0.3,
                       first_identity: int = 0, progress=None) -> Path:
    """Render and write a training set (RecordIO or image folder) plus its landmark sidecar."""
    out = Path(out_dir)
    faces = iter_faces(num_identities, images_per_identity, seed=seed, difficulty=difficulty,
                       first_identity=first_identity)
    points = []
    if format == "recordio":
        from visrec.data.recordio import RecordIOWriter

        with RecordIOWriter(out) as writer:
            for img, label, pts in faces:
                writer.add(img, label)
                points.append(pts)
                if progress:
                    progress()
        np.save(out / "landmarks106.npy", np.stack(points))
    elif format == "folder":
        from visrec.data.folders import write_image_folder

        def items():
            for img, label, pts in faces:
                points.append((label, pts))
                if progress:
                    progress()
                yield img, label

        write_image_folder(out, items())
        counts: dict[int, int] = {}
        for label, pts in points:
            n = counts.get(label, 0)
            counts[label] = n + 1
            path = out.parent / f"{out.name}-landmarks" / f"{label:06d}" / f"{n:05d}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("106\n" + "\n".join(f"{x:.3f} {y:.3f}" for x, y in pts) + "\n")
    else:
        raise ValueError(f"format must be 'recordio' or 'folder', got {format!r}")
    return out


def write_verification_pairs(path: str | Path, num_identities: int, num_pairs: int, *, seed: int = 0,
                             difficulty: float = 0.3, first_identity: int = 100_000) -> Path:
    """A verification .bin of held-out identities: half genuine pairs, half impostor pairs."""
    from visrec.data.verification import write_verification_bin

    rng = np.random.default_rng([seed, first_identity, 31337])
    images, issame = [], []
    for k in range(num_pairs):
        same = k % 2 == 0
        a = int(rng.integers(num_identities))
        b = a if same else int((a + rng.integers(1, num_identities)) % num_identities)
        for ident in (a, b):
            img, _ = render_face(first_identity + ident, rng, difficulty, seed)
            images.append(img)
        issame.append(same)
    return write_verification_bin(path, images, issame)
