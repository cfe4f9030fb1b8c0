"""Synthetic, labelled face-like identities with exact 106-point landmarks, written in the real formats.

Each identity (derived deterministically from ``(seed, identity)``) has its own geometry (face outline,
jaw, eye/brow/nose/mouth placement and size), colours (skin, hair, iris, lips, brows) and a skin texture
(a fixed pattern of marks). Each image adds expression (smile, mouth opening, eye closure), mild yaw
(inner features shift by their depth, the far cheek is squashed), in-plane pose (rotation, scale,
translation), illumination (gain, linear gradient, colour cast), Gaussian blur, noise and an occluder
(a bar or patch of random colour). ``difficulty`` in [0, 1] scales every nuisance at once; identity
never depends on it, so a network trained at one difficulty meets the same identities at another.

Geometry: the face is drawn in a canonical 112x112 frame from polygons whose vertices ARE the landmarks,
then the in-plane pose is one affine warp applied to the image and, with the same matrix, to the points;
so the landmarks are exact. Coordinates are pixels, origin top-left, in OpenCV's convention (pixel
(x, y) has its centre at (x, y)). Point order: JD-landmark 106 (``visrec.data.schemes``, "left" = image
left); the occluder can hide points but never removes them.

Landmark sidecars (the format ``write_face_dataset`` writes):
  RecordIO      ``landmarks106.npy`` beside ``train.rec``: float32 (num_images, 106, 2), row i = the
                image of ``RecordIOReader.image(i)`` (the order images were added: identity by identity).
  image folder  ``<root>-landmarks/<identity folder>/<image stem>.txt`` — a sibling of ``<root>``,
                mirroring its tree (``<root>/000003/00007.jpg`` -> ``<root>-landmarks/000003/00007.txt``);
                JD-landmark text: first line ``106``, then one ``x y`` per line. Kept outside the image
                root because an image folder must hold only images (its reader rejects other files).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np

from visrec._files import names_its_output, replacing
from visrec.data.folders import write_image_folder
from visrec.data.images import encode_jpeg
from visrec.data.landmarks import write_landmark_txt, write_pose_txt
from visrec.data.recordio import RecordIOWriter
from visrec.data.verification import write_verification_bin
from visrec.errors import DataError, VisrecError

SIZE = 112
_CX, _CY = 56.0, 58.0
# pixel-centre coordinates in [-0.5, 0.5), for the illumination gradient
_YY, _XX = (np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE - 0.5)
_U7 = np.linspace(-1.0, 1.0, 7)                        # mouth x positions, corner to corner
_S7 = np.sin(np.linspace(0.0, math.pi, 7))             # lip bulge profile
_U5 = np.linspace(-0.8, 0.8, 5)                        # inner-lip x positions

# yaw shifts each point by yaw * 9 px * depth: the nose (nearest the camera) most, the contour not at all
# (it is squashed instead). JD-106 index ranges, see visrec.data.schemes.
_DEPTH = np.full(106, 0.25)
_DEPTH[0:33] = 0.0
_DEPTH[43:47] = 0.5
_DEPTH[47:52] = 0.6
_DEPTH[78:84] = 0.5
_DEPTH[84:104] = 0.35


@functools.cache
def _noise_bank() -> np.ndarray:
    """A fixed field of unit Gaussian noise; each image takes a random window of it (drawing 37k normals
    per image would cost as much as all the drawing)."""
    return np.random.default_rng(20190603).standard_normal((SIZE + 64, SIZE + 64, 3), dtype=np.float32)


@functools.lru_cache(maxsize=4096)
def _identity_params(seed: int, identity: int) -> dict:
    """The identity's random parameters (lengths in pixels of the canonical 112x112 frame, colours RGB)."""
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


@functools.lru_cache(maxsize=4096)
def _identity_shape(seed: int, identity: int) -> dict:
    """Everything about the identity's neutral frontal face that no image changes: the 106 points with
    expression-dependent ones (eyes, mouth) left for ``_face_points``, plus drawing outlines and colours."""
    p = _identity_params(seed, identity)
    a, b = p["face_a"], p["face_b"]
    pts = np.zeros((106, 2))
    contour = _arc(_CX, _CY, a, b, 170, 10, 33)          # image left -> chin -> image right
    contour[:, 1] = _CY + (contour[:, 1] - _CY) * np.where(contour[:, 1] > _CY, p["jaw"], 1.0)
    pts[0:33] = contour
    ey = _CY + p["eye_y"]
    for sgn, upper_idx, lower_idx in ((-1, slice(33, 38), slice(64, 68)), (1, slice(38, 43), slice(68, 72))):
        ex = _CX + sgn * p["eye_dx"]
        by = ey - p["brow_dy"]
        xs = np.linspace(ex + sgn * p["brow_w"], ex - sgn * p["brow_w"] * 0.8, 5)  # outer -> inner
        arch = p["brow_arch"] * np.sin(np.linspace(0, math.pi, 5))
        upper = np.stack([xs, by - arch], 1)
        lower = np.stack([xs[:4] + (xs[1] - xs[0]) * 0.5, by - arch[:4] + 2.0 + p["brow_thick"]], 1)
        # JD order runs image-left -> image-right: the left brow outer -> inner, the right inner -> outer
        pts[upper_idx] = upper if sgn < 0 else upper[::-1]
        pts[lower_idx] = lower if sgn < 0 else lower[::-1]
    nose_top, tip_y = ey + 1, ey + 1 + p["nose_len"]
    pts[43:47] = np.stack([np.full(4, _CX), np.linspace(nose_top, tip_y, 4)], 1)
    nw = p["nose_w"]
    pts[47:52] = [[_CX - nw, tip_y - 1], [_CX - nw / 2, tip_y + 1.5], [_CX, tip_y + 2],
                  [_CX + nw / 2, tip_y + 1.5], [_CX + nw, tip_y - 1]]
    wing_y = np.linspace(nose_top + p["nose_len"] * 0.4, tip_y - 1, 3)
    pts[78:84] = [[_CX + s * nw * (0.45 + 0.25 * k), y] for k, y in enumerate(wing_y) for s in (-1, 1)]
    top = _arc(_CX, _CY, a, b, 350, 190, 16)             # forehead, right -> left, closes the skin outline
    hair = _arc(_CX, _CY, a * 1.05, b * 1.05, 180, 360, 16)
    hair_line = hair.copy()
    hair_line[:, 1] = np.maximum(hair_line[:, 1], _CY - b * (1 - p["hair_h"]))
    colour = lambda c, k=1.0: tuple(float(v) * k for v in c)  # noqa: E731
    marks = [((int(_CX + mx * a * 0.7), int(_CY + my * b * 0.6)), (int(r * 2), int(r)), ang)
             for mx, my, r, ang in p["marks"]]
    return {
        "pts": pts, "eye_y": ey, "top": top, "hair": np.concatenate([hair, hair_line[::-1]]), "marks": marks,
        "skin": colour(p["skin"]), "skin_dark": colour(p["skin"], 0.6), "nose": colour(p["skin"], 0.85),
        "hair_rgb": colour(p["hair"]), "brow": colour(p["hair"], 0.8), "iris": colour(p["iris"]),
        "lips": colour(p["lips"]), "pupil_r": max(1.0, p["eye_h"] * 0.9),
    }


def _face_points(p: dict, shape: dict, smile: float, mouth_open: float, eye_open: float,
                 yaw: float) -> np.ndarray:
    """(106, 2) canonical-frame points for one expression; ``yaw`` in [-1, 1]."""
    pts = shape["pts"].copy()
    ey = shape["eye_y"]
    w, h = p["eye_w"], p["eye_h"] * eye_open
    for sgn, ring, mid, centre, pupil in ((-1, slice(52, 58), slice(72, 74), 74, 104),
                                          (1, slice(58, 64), slice(75, 77), 77, 105)):
        ex = _CX + sgn * p["eye_dx"]
        # ring in image-x order: left corner, upper lid left->right, right corner, lower lid right->left.
        # For the left eye the left corner is the outer one (52), for the right eye the inner one (58).
        pts[ring] = np.stack([ex + w * np.array([-1, -0.5, 0.5, 1, 0.5, -0.5]),
                              ey + h * np.array([0, -0.85, -0.85, 0, 0.85, 0.85])], 1)
        pts[mid] = [[ex, ey - h], [ex, ey + h]]
        pts[centre] = [ex, ey]
        pts[pupil] = [ex + yaw * 1.5, ey]                 # the gaze follows the turn a little
    my, mw, lh = _CY + p["mouth_y"], p["mouth_w"] * (1 + 0.15 * smile), p["lip_h"]
    corner_y, gap = my - 2.5 * smile, 3.5 * mouth_open
    xs = _CX + mw * _U7
    pts[84:91, 0] = xs                                   # 84 left corner -> 90 right corner
    pts[84:91, 1] = my - gap / 2 - lh * _S7 - 0.8
    pts[[84, 90], 1] = corner_y
    pts[91:96, 0] = xs[1:-1][::-1]                       # lower lip, right -> left
    pts[91:96, 1] = my + gap / 2 + lh * 1.3 * _S7[1:-1]
    xi = _CX + mw * _U5
    pts[96:101, 0] = xi                                  # inner lip: 96 left corner -> 100 right corner
    pts[96:101, 1] = my - gap / 2
    pts[[96, 100], 1] = corner_y
    pts[101:104, 0] = xi[1:-1][::-1]
    pts[101:104, 1] = my + gap / 2
    pts[:, 0] += yaw * 9 * _DEPTH
    # the cheek turning away from the camera foreshortens
    side = pts[0:33, 0] < _CX if yaw > 0 else pts[0:33, 0] > _CX
    contour_x = pts[0:33, 0]
    contour_x[side] = _CX + (contour_x[side] - _CX) * (1 - 0.25 * abs(yaw))
    return pts


def _poly(img, pts, color) -> None:
    cv2.fillPoly(img, [np.round(pts * 16).astype(np.int32)], color, cv2.LINE_AA, shift=4)


def _draw(shape: dict, pts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    img = np.empty((SIZE, SIZE, 3), np.uint8)
    img[:] = rng.uniform(30, 225, 3).astype(np.uint8)  # background
    _poly(img, np.concatenate([pts[0:33], shape["top"]]), shape["skin"])
    _poly(img, shape["hair"], shape["hair_rgb"])
    for centre, axes, angle in shape["marks"]:
        cv2.ellipse(img, centre, axes, angle, 0, 360, shape["skin_dark"], -1, cv2.LINE_AA)
    r16 = int(shape["pupil_r"] * 16)
    for ring, pupil, brow in ((slice(52, 58), 104, [*range(33, 38), *range(67, 63, -1)]),
                              (slice(58, 64), 105, [*range(38, 43), *range(71, 67, -1)])):
        _poly(img, pts[ring], (245, 245, 245))
        c = (int(round(pts[pupil, 0] * 16)), int(round(pts[pupil, 1] * 16)))
        cv2.circle(img, c, r16, shape["iris"], -1, cv2.LINE_AA, 4)
        cv2.circle(img, c, r16 * 7 // 16, (10, 10, 10), -1, cv2.LINE_AA, 4)
        _poly(img, pts[brow], shape["brow"])
    _poly(img, pts[[43, 51, 47]], shape["nose"])
    for k in (48, 50):  # nostrils
        cv2.circle(img, (int(pts[k, 0]), int(pts[k, 1] - 1)), 1, (40, 30, 30), -1)
    _poly(img, pts[84:96], shape["lips"])
    _poly(img, pts[96:104], (40, 20, 20))
    return img


def render_face(identity: int, rng: np.random.Generator, difficulty: float = 0.3, seed: int = 0):
    """One image of ``identity`` -> (112x112x3 RGB uint8, float32 (106, 2) landmarks in JD order, pixels,
    origin top-left). Identity parameters come from ``(seed, identity)``; everything else from ``rng``."""
    d = float(np.clip(difficulty, 0, 1))
    p = _identity_params(seed, identity)
    shape = _identity_shape(seed, identity)
    pts = _face_points(p, shape, smile=rng.uniform(0, d), mouth_open=rng.uniform(0, d),
                       eye_open=1 - rng.uniform(0, 0.6 * d), yaw=rng.uniform(-d, d) * 0.8)
    canvas = _draw(shape, pts, rng)
    angle = rng.uniform(-1, 1) * (4 + 22 * d)  # degrees
    scale = 1 + rng.uniform(-1, 1) * 0.12 * d
    shift = rng.uniform(-1, 1, 2) * (1 + 7 * d)  # pixels
    M = cv2.getRotationMatrix2D((_CX, _CY), angle, scale)
    M[:, 2] += shift
    img = cv2.warpAffine(canvas, M, (SIZE, SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    pts = pts @ M[:, :2].T + M[:, 2]
    img = img.astype(np.float32)
    gain = 1 + rng.uniform(-0.45, 0.35) * d
    grad_dir = rng.uniform(0, 2 * math.pi)
    slope = 0.6 * d * rng.uniform(0, 1)
    img *= (gain + (slope * math.cos(grad_dir)) * _XX + (slope * math.sin(grad_dir)) * _YY)[..., None]
    img += (rng.uniform(-20, 20, 3) * d).astype(np.float32)  # colour cast
    sigma = rng.uniform(0, 1.6 * d)
    if sigma > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    ox, oy = rng.integers(0, 65, 2)
    sign = 1 if rng.uniform() < 0.5 else -1
    img += _noise_bank()[oy:oy + SIZE, ox:ox + SIZE] * np.float32(sign * (1 + 10 * d))
    if rng.uniform() < 0.5 * d:  # occluder: a bar or a patch of random colour
        w, h = rng.integers(15, 15 + int(45 * d) + 1, 2)
        x0, y0 = rng.integers(0, SIZE - 10, 2)
        img[y0:y0 + h, x0:x0 + w] = rng.uniform(0, 255, 3)
    return np.clip(img, 0, 255).astype(np.uint8), pts.astype(np.float32)


def _refuse_a_set_in(out: Path, files: list[Path], folders: list[Path]) -> None:
    """A DataError naming ``out`` when any of ``files`` exists or any of ``folders`` holds a sub-folder (an identity
    of a folder set) or, for a folder other than ``out``, anything: the new set would mix with what is there."""
    held = [f for f in files if f.exists()]
    for folder in folders:
        if folder.is_dir():
            held += [p for p in sorted(folder.iterdir()) if folder != out or p.is_dir()]
    if held:
        raise DataError(f"already holds a data set ({held[0]} and {len(held) - 1} more): the new images would mix "
                        "with its images or replace them; write into a new or empty folder", path=out)


def check_seed(seed: int, first_identity: int = 0) -> None:
    """Seeds and identity numbers feed ``np.random.default_rng``, which takes no negative entry: a VisrecError
    before anything is written (numpy's ValueError would come after the output folder was made)."""
    for name, value in (("seed", seed), ("first_identity", first_identity)):
        if int(value) < 0:
            raise VisrecError(f"{name} must be >= 0, got {value}")


def iter_faces(num_identities: int, images_per_identity: int, *, seed: int = 0, difficulty: float = 0.3,
               first_identity: int = 0) -> Iterator[tuple[np.ndarray, int, np.ndarray]]:
    """Yield (image, label, landmarks) identity by identity; label k renders identity first_identity + k, so
    sets with disjoint identity ranges share no identity. Deterministic in (seed, identity)."""
    check_seed(seed, first_identity)
    for label in range(num_identities):
        rng = np.random.default_rng([seed, first_identity + label, 104729])
        for _ in range(images_per_identity):
            img, pts = render_face(first_identity + label, rng, difficulty, seed)
            yield img, label, pts


@names_its_output
def write_face_dataset(out_dir: str | Path, num_identities: int, images_per_identity: int, *,
                       format: str = "recordio", seed: int = 0, difficulty: float = 0.3,
                       first_identity: int = 0, progress: Callable[[], None] | None = None) -> Path:
    """Render a training set and write it with the real writers: ``format="recordio"`` -> InsightFace
    ``train.rec/.idx/property`` in ``out_dir`` + ``landmarks106.npy``; ``format="folder"`` -> one folder per
    identity + the ``<out_dir>-landmarks`` sidecar tree (module docstring). ``progress`` is called once per
    image. Returns ``out_dir``."""
    if format not in ("recordio", "folder"):
        raise ValueError(f"format must be 'recordio' or 'folder', got {format!r}")
    check_seed(seed, first_identity)
    out = Path(out_dir)
    sidecar = out.parent / f"{out.name}-landmarks"
    # identity folders or a RecordIO set already there would mix with the new ones (a folder set keeps every
    # identity folder of an earlier, larger run) or be replaced: refused, nothing there is touched
    _refuse_a_set_in(out, [out / n for n in ("train.rec", "train.idx", "property", "landmarks106.npy")],
                     [out, sidecar])
    faces = iter_faces(num_identities, images_per_identity, seed=seed, difficulty=difficulty,
                       first_identity=first_identity)
    if format == "recordio":
        out.mkdir(parents=True, exist_ok=True)
        # landmarks go to the .npy as they come, as the images go to the writer's spill: memory stays flat
        with replacing(out / "landmarks106.npy", suffix=".npy") as tmp, RecordIOWriter(out) as writer:
            points = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                               shape=(num_identities * images_per_identity, 106, 2))
            for n, (img, label, pts) in enumerate(faces):
                writer.add(img, label)
                points[n] = pts
                if progress:
                    progress()
            points.flush()
            del points
        return out

    counts: dict[int, int] = {}

    def items():
        for img, label, pts in faces:
            n = counts.get(label, 0)
            counts[label] = n + 1
            # the same names write_image_folder gives the image: <label:06d>/<n:05d>.jpg
            write_landmark_txt(sidecar / f"{label:06d}" / f"{n:05d}.txt", pts)
            if progress:
                progress()
            yield img, label

    write_image_folder(out, items())
    return out


@names_its_output
def write_verification_pairs(path: str | Path, num_identities: int, num_pairs: int, *, seed: int = 0,
                             difficulty: float = 0.3, first_identity: int = 100_000,
                             progress: Callable[[], None] | None = None) -> Path:
    """A verification ``.bin`` over identities first_identity .. first_identity+num_identities-1 (held out
    from training sets that start at 0): pairs alternate genuine (even index) / impostor (odd), every image
    a fresh rendering. Written with ``visrec.data.verification.write_verification_bin``; ``progress`` is
    called once per pair."""
    if num_identities < 2:
        raise ValueError("impostor pairs need at least 2 identities")
    check_seed(seed, first_identity)

    rng = np.random.default_rng([seed, first_identity, 31337])
    images, issame = [], []
    for k in range(num_pairs):
        same = k % 2 == 0
        a = int(rng.integers(num_identities))
        b = a if same else int((a + rng.integers(1, num_identities)) % num_identities)
        for ident in (a, b):
            img, _ = render_face(first_identity + ident, rng, difficulty, seed)
            images.append(encode_jpeg(img))  # the bytes the .bin holds (what its writer would encode): 1/7 the memory
        issame.append(same)
        if progress:
            progress()
    return write_verification_bin(path, images, issame)


# Synthetic products live in their own module; re-exported so every synthetic writer is reachable here.
from visrec.data.synth_products import render_catalogue, render_query, write_product_dataset  # noqa: E402,F401


# The renderer's yaw is a unitless turn in [-1, 1] (a 2-D approximation: inner points shift by their
# depth, the far cheek foreshortens by 1 - 0.25 |yaw|). Degrees = unit * acos(0.75): the full turn, whose
# far cheek is foreshortened to 0.75 = cos(41.4 deg), reads as 41.4 degrees. Nominal, but monotonic and
# sign-correct (yaw > 0 moves the nose towards image right).
SYNTH_YAW_DEGREES = math.degrees(math.acos(0.75))


class _PoseRecorder:
    """Wraps the ``np.random.Generator`` that ``render_face`` draws from and keeps its pose draws:
    yaw is ``0.8 * uniform(-d, d)`` (unitless) and the in-plane angle ``uniform(-1, 1) * (4 + 22 d)``
    degrees (``cv2.getRotationMatrix2D``'s sign: counter-clockwise as displayed = roll). The draws pass
    through unchanged, so the rendered images are those of ``iter_faces``."""

    def __init__(self, rng: np.random.Generator, difficulty: float):
        self.rng, self.d = rng, float(np.clip(difficulty, 0, 1))
        self.yaw_unit = self.roll_deg = None

    def uniform(self, low=0.0, high=1.0, size=None):
        v = self.rng.uniform(low, high, size)
        if size is None and self.yaw_unit is None and (low, high) == (-self.d, self.d):
            self.yaw_unit = 0.8 * float(v)
        elif size is None and self.roll_deg is None and (low, high) == (-1, 1):
            self.roll_deg = float(v) * (4 + 22 * self.d)
        return v

    def __getattr__(self, name):  # integers, standard_normal, ...: plain pass-through
        return getattr(self.rng, name)


@names_its_output
def write_synthetic_jd(out_dir: str | Path, n_faces: int, *, seed: int = 0, difficulty: float = 0.3) -> Path:
    """Render synthetic faces  into the JD-landmark layout, with their exact head pose
    in ``pose/<name>.txt`` (``yaw 0 roll`` degrees: the renderer has no pitch; ``visrec.data.landmarks`` documents
    the pose files).
    The images are those of ``iter_faces(n_faces, 1, seed=seed, difficulty=difficulty)``."""
    check_seed(seed)
    out = Path(out_dir)
    _refuse_a_set_in(out, [], [out / n for n in ("picture", "landmark", "pose", "rect")])
    for k in range(n_faces):
        # the generator iter_faces gives face k (identity k, one image each)
        rec = _PoseRecorder(np.random.default_rng([seed, k, 104729]), difficulty)
        img, pts = render_face(k, rec, difficulty, seed)
        if rec.yaw_unit is None or rec.roll_deg is None:
            raise RuntimeError("render_face no longer draws pose as _PoseRecorder expects")
        name = f"{k:06d}.jpg"
        (out / "picture").mkdir(parents=True, exist_ok=True)
        (out / "picture" / name).write_bytes(encode_jpeg(img))
        write_landmark_txt(out / "landmark" / f"{name}.txt", pts)
        write_pose_txt(out / "pose" / f"{name}.txt", (rec.yaw_unit * SYNTH_YAW_DEGREES, 0.0, rec.roll_deg))
        x1, y1 = pts.min(0)
        x2, y2 = pts.max(0)
        (out / "rect").mkdir(exist_ok=True)
        (out / "rect" / f"{name}.rect").write_text(f"{x1:.0f} {y1:.0f} {x2:.0f} {y2:.0f}\n")
    return out
