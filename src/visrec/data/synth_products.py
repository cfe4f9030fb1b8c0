"""Synthetic beauty products (bottles, jars, tubes, boxes, pump bottles), deterministic from a seed,
written in the Perfect-500K layout of ``visrec.data.products``.

A product (``ProductParams``) is a shape kind, proportions, body/cap/label colours, a label pattern
(stripes, dots or bands with their parameters) and label text (a brand line and a product line, drawn
with ``cv2.putText``). Products come in families: a family fixes the shape, proportions (up to a few
per cent), pattern, font and brand text; its products differ in colours and product text, so the other
products of a family are near-duplicate hard negatives.

Catalogue images (``render_catalogue``): the product centred on plain white, as in a shop catalogue;
variant 0 is the straight hero shot, other variants add a slight scale/rotation/shift and lighting change.
Query images (``render_query``): the same product in the wild — cluttered background, perspective warp,
rotation, off-centre placement or a hand-held crop partly outside the frame, lighting gradient and colour
cast, a skin-coloured hand over part of it, blur and noise; ``difficulty`` in [0, 1] scales all of these.
Images are HxWx3 RGB uint8, ``size`` x ``size`` pixels.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np

from visrec._files import names_its_output
from visrec.data import products as P
from visrec.data.images import encode_jpeg
from visrec.errors import ConfigError, DataError

SHAPES = ("bottle", "jar", "tube", "box", "pump")
MIN_SIDE, MAX_SIDE = 32, 4096  # pixels of an image's side (the model contract's bound on an input side)
PATTERNS = ("stripes", "dots", "bands")
_FONTS = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_TRIPLEX, cv2.FONT_HERSHEY_COMPLEX)
_SKIN = ((224, 172, 140), (198, 134, 100), (241, 194, 160), (141, 85, 60), (255, 205, 178))
_LETTERS = "ABCDEFGHIJKLMNOPRSTUVWXYZ"


@dataclass(frozen=True)
class ProductParams:
    """One product. Lengths are fractions of the image side; colours RGB 0..255."""
    product_id: str
    family: int
    shape: str
    body_w: float
    body_h: float
    cap_h: float
    cap_w: float          # fraction of body_w
    neck_w: float         # fraction of body_w
    body: tuple[int, int, int]
    cap: tuple[int, int, int]
    label: tuple[int, int, int]
    ink: tuple[int, int, int]        # pattern colour
    text_colour: tuple[int, int, int]
    pattern: str
    # stripes: (count, angle deg, width); dots: (spacing, radius, offset); bands: band centre y's
    pattern_params: tuple[float, ...]
    label_top: float      # label rectangle on the body, fractions of the body height
    label_h: float
    font: int
    brand: str
    text: str


def _colour(rng) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _word(rng, lo: int, hi: int) -> str:
    return "".join(rng.choice(list(_LETTERS), int(rng.integers(lo, hi + 1))))


def make_product(seed: int, family: int, index: int, products_per_family: int = 4) -> ProductParams:
    """Product ``index`` of ``family``; depends only on (seed, family, index)."""
    f = np.random.default_rng([seed, 7, family])
    shape = SHAPES[int(f.integers(len(SHAPES)))]
    bw, bh = {"bottle": (0.36, 0.5), "jar": (0.62, 0.34), "tube": (0.34, 0.6), "box": (0.42, 0.56),
              "pump": (0.38, 0.46)}[shape]
    bw, bh = bw * f.uniform(0.8, 1.2), bh * f.uniform(0.85, 1.15)
    cap_h, cap_w, neck_w = f.uniform(0.06, 0.14), f.uniform(0.35, 0.7), f.uniform(0.25, 0.45)
    if shape == "jar":
        cap_w = f.uniform(1.0, 1.08)
    pattern = PATTERNS[int(f.integers(len(PATTERNS)))]
    if pattern == "stripes":
        pp = (float(f.integers(3, 9)), float(f.uniform(-50, 50)), float(f.uniform(0.15, 0.45)))
    elif pattern == "dots":
        pp = (float(f.uniform(0.12, 0.3)), float(f.uniform(0.15, 0.35)), float(f.uniform(0, 1)))
    else:
        pp = tuple(sorted(float(x) for x in f.uniform(0.05, 0.95, int(f.integers(2, 5)))))
    label_top, label_h = f.uniform(0.15, 0.35), f.uniform(0.35, 0.6)
    font, brand = _FONTS[int(f.integers(len(_FONTS)))], _word(f, 3, 6)
    shared_cap = _colour(f)
    r = np.random.default_rng([seed, 11, family, index])
    j = lambda: r.uniform(0.95, 1.05)  # noqa: E731 - within-family size jitter
    return ProductParams(
        product_id=f"p{family * products_per_family + index:04d}", family=family, shape=shape,
        body_w=bw * j(), body_h=bh * j(), cap_h=cap_h, cap_w=cap_w, neck_w=neck_w,
        body=_colour(r), cap=shared_cap if r.random() < 0.5 else _colour(r), label=_colour(r), ink=_colour(r),
        text_colour=_colour(r), pattern=pattern, pattern_params=pp, label_top=label_top, label_h=label_h,
        font=font, brand=brand, text=_word(r, 3, 7))


def _draw_label(roi: np.ndarray, p: ProductParams) -> None:
    """Pattern and text into a label view (in place)."""
    h, w = roi.shape[:2]
    roi[:] = p.label
    if p.pattern == "stripes":
        n, ang, width = p.pattern_params
        d = np.array([np.cos(np.radians(ang)), np.sin(np.radians(ang))])
        nrm = np.array([-d[1], d[0]])
        step = (w + h) / n
        t = max(1, int(step * width))
        for i in range(-int(n), 2 * int(n)):
            c = np.array([w / 2, h / 2]) + nrm * (i - n / 2) * step
            a, b = c - d * (w + h), c + d * (w + h)
            cv2.line(roi, (int(a[0]), int(a[1])), (int(b[0]), int(b[1])), p.ink, t)
    elif p.pattern == "dots":
        sp, rad, off = p.pattern_params
        s = max(3.0, sp * h)
        rr = max(1, int(s * rad))
        for y in np.arange(off * s % s, h + s, s):
            for x in np.arange((off * s * 1.7) % s, w + s, s):
                cv2.circle(roi, (int(x), int(y)), rr, p.ink, -1)
    else:
        bh = max(1, int(0.08 * h))
        for y in p.pattern_params:
            cv2.rectangle(roi, (0, int(y * h) - bh), (w, int(y * h) + bh), p.ink, -1)
    for k, (txt, frac) in enumerate(((p.brand, 0.3), (p.text, 0.2))):
        (tw, th), _ = cv2.getTextSize(txt, p.font, 1.0, 1)
        scale = min(0.85 * w / tw, frac * h / th)
        if scale * th < 3:
            continue
        thick = max(1, int(round(scale * 1.6)))
        (tw, th), _ = cv2.getTextSize(txt, p.font, scale, thick)
        y = int(h * (0.45 if k == 0 else 0.8))
        cv2.putText(roi, txt, ((w - tw) // 2, y), p.font, scale, p.text_colour, thick, cv2.LINE_AA)


@functools.lru_cache(maxsize=512)
def _sprite(p: ProductParams, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The product centred on white, canonical pose: (RGB uint8, mask uint8 0/255). Read-only (cached)."""
    S = size
    img = np.full((S, S, 3), 255, np.uint8)
    mask = np.zeros((S, S), np.uint8)
    bw, bh = int(p.body_w * S), int(p.body_h * S)
    ch, cw = max(2, int(p.cap_h * S)), max(2, int(p.cap_w * bw))
    nw = max(2, int(p.neck_w * bw))
    total = bh + ch + (int(0.05 * S) if p.shape in ("bottle", "pump") else 0)
    total += int(0.08 * S) if p.shape == "pump" else 0
    cx, bottom = S // 2, (S + total) // 2
    x0, x1, top = cx - bw // 2, cx + bw // 2, bottom - bh

    def fill(pts, colour, shade=1.0):
        pts = np.asarray(pts, np.int32)
        cv2.fillPoly(img, [pts], tuple(int(min(255, c * shade)) for c in colour))
        cv2.fillPoly(mask, [pts], 255)

    def rect(a, b, c, d, colour, shade=1.0):
        fill([(a, b), (c, b), (c, d), (a, d)], colour, shade)

    lab = None
    if p.shape == "tube":        # stands on its cap; crimped flat end at the top
        bot_w = int(bw * 0.62)
        rect(cx - cw // 2, bottom - ch, cx + cw // 2, bottom, p.cap)
        fill([(x0, top), (x1, top), (cx + bot_w // 2, bottom - ch), (cx - bot_w // 2, bottom - ch)], p.body)
        rect(x0 - 1, top - max(2, S // 40), x1 + 1, top, p.body, 0.8)
        lab = (cx - int(bot_w * 0.42), top + int(p.label_top * bh), cx + int(bot_w * 0.42),
               top + int((p.label_top + p.label_h) * bh * 0.9))
    elif p.shape == "box":
        d = int(0.14 * bw)
        rect(x0, top, x1, bottom, p.body)
        fill([(x1, top), (x1 + d, top - d), (x1 + d, bottom - d), (x1, bottom)], p.body, 0.7)
        fill([(x0, top), (x0 + d, top - d), (x1 + d, top - d), (x1, top)], p.body, 0.88)
        lab = (x0 + bw // 10, top + int(p.label_top * bh), x1 - bw // 10, top + int((p.label_top + p.label_h) * bh))
    elif p.shape == "jar":
        cv2.ellipse(img, (cx, bottom - bw // 12), (bw // 2, bw // 12), 0, 0, 180, p.body, -1)
        cv2.ellipse(mask, (cx, bottom - bw // 12), (bw // 2, bw // 12), 0, 0, 180, 255, -1)
        rect(x0, top, x1, bottom - bw // 12, p.body)
        rect(cx - cw // 2, top - ch, cx + cw // 2, top + 1, p.cap)
        lab = (x0 + bw // 12, top + int(0.2 * bh), x1 - bw // 12, bottom - int(0.2 * bh))
    else:                         # bottle / pump: body, shoulder, neck, cap or pump head
        r = max(2, bw // 8)
        rect(x0, top + r, x1, bottom, p.body)
        cv2.ellipse(img, (cx, top + r), (bw // 2, r), 0, 180, 360, p.body, -1)
        cv2.ellipse(mask, (cx, top + r), (bw // 2, r), 0, 180, 360, 255, -1)
        neck_top = top - int(0.05 * S)
        rect(cx - nw // 2, neck_top, cx + nw // 2, top + r, p.body, 0.9)
        if p.shape == "bottle":
            rect(cx - cw // 2, neck_top - ch, cx + cw // 2, neck_top, p.cap)
        else:
            rect(cx - nw // 2 - 2, neck_top - ch // 2, cx + nw // 2 + 2, neck_top, p.cap)
            stem_top = neck_top - ch // 2 - int(0.05 * S)
            rect(cx - max(1, nw // 6), stem_top, cx + max(1, nw // 6), neck_top - ch // 2, p.cap, 0.8)
            hh = max(3, int(0.035 * S))
            rect(cx - nw // 2, stem_top - hh, cx + nw // 2, stem_top, p.cap)
            rect(cx + nw // 2, stem_top - hh, cx + nw // 2 + int(0.08 * S), stem_top - hh // 2, p.cap)
        lab = (x0 + bw // 10, top + r + int(p.label_top * bh * 0.6), x1 - bw // 10,
               top + r + int((p.label_top * 0.6 + p.label_h) * bh))
    lx0, ly0, lx1, ly1 = lab
    if lx1 - lx0 > 4 and ly1 - ly0 > 4:
        _draw_label(img[ly0:ly1, lx0:lx1], p)
    if p.shape != "box":          # cylindrical shading across the body, with a highlight
        x = (np.arange(S, dtype=np.float32) - cx) / max(1.0, bw / 2)
        prof = 1.0 - 0.28 * np.clip(x, -1.2, 1.2) ** 2 + 0.25 * np.exp(-((x + 0.45) / 0.12) ** 2)
        m = (mask > 0)[..., None]
        img = np.where(m, np.clip(img * prof[None, :, None], 0, 255), img).astype(np.uint8)
    img.setflags(write=False)
    mask.setflags(write=False)
    return img, mask


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    return xx, yy


@functools.lru_cache(maxsize=8)
def _noise_bank(size: int) -> np.ndarray:
    return np.random.default_rng(20190621).standard_normal((size + 64, size + 64, 3), dtype=np.float32)


def render_catalogue(product_params: ProductParams, variant: int, rng: np.random.Generator,
                     size: int = 224) -> np.ndarray:
    """Catalogue photo: the product centred on white. Variant 0 is the canonical shot; other variants
    jitter scale (±6 %), rotation (±4°), position (±4 % of the side) and product brightness (±8 %)."""
    img, mask = _sprite(product_params, size)
    if variant == 0:
        return img.copy()
    c = size / 2
    M = cv2.getRotationMatrix2D((c, c), rng.uniform(-4, 4), rng.uniform(0.94, 1.06))
    M[:, 2] += rng.uniform(-0.04, 0.04, 2) * size
    out = cv2.warpAffine(img, M, (size, size), flags=cv2.INTER_LINEAR, borderValue=(255, 255, 255))
    m = cv2.warpAffine(mask, M, (size, size), flags=cv2.INTER_LINEAR).astype(np.float32) * (1 / 255)
    gain = rng.uniform(0.92, 1.08)
    return np.clip(out * (1 + (gain - 1) * m)[..., None], 0, 255).astype(np.uint8)


def _background(rng, size: int) -> np.ndarray:
    xx, yy = _grid(size)
    a, b = rng.integers(0, 256, 3).astype(np.float32), rng.integers(0, 256, 3).astype(np.float32)
    t = np.clip(0.5 + np.cos(rng.uniform(0, 6.3)) * xx + np.sin(rng.uniform(0, 6.3)) * yy, 0, 1)[..., None]
    bg = (a + (b - a) * t).astype(np.uint8)
    for _ in range(int(rng.integers(4, 12))):
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        x, y = (int(v) for v in rng.integers(0, size, 2))
        if rng.random() < 0.5:
            w, h = (int(v) for v in rng.integers(size // 10, size // 2, 2))
            cv2.rectangle(bg, (x - w // 2, y - h // 2), (x + w // 2, y + h // 2), col, -1)
        else:
            ax = tuple(int(v) for v in rng.integers(size // 20, size // 4, 2))
            cv2.ellipse(bg, (x, y), ax, float(rng.uniform(0, 180)), 0, 360, col, -1)
    return bg


def _hand(out: np.ndarray, rng, centre, size: int) -> None:
    """A skin-coloured palm and fingers over ``centre`` (in place)."""
    skin = np.array(_SKIN[int(rng.integers(len(_SKIN)))], np.float32) * rng.uniform(0.85, 1.1)
    col = tuple(int(v) for v in np.clip(skin, 0, 255))
    ang = rng.uniform(0, 2 * np.pi)
    d = np.array([np.cos(ang), np.sin(ang)])
    s = size * rng.uniform(0.12, 0.2)
    palm = np.asarray(centre, np.float32) - d * s * 1.2
    cv2.ellipse(out, (int(palm[0]), int(palm[1])), (int(s), int(s * 0.8)), float(np.degrees(ang)), 0, 360, col, -1)
    nrm = np.array([-d[1], d[0]])
    for k in range(4):
        base = palm + nrm * (k - 1.5) * s * 0.45
        tip = base + d * s * rng.uniform(1.3, 1.8)
        fc = tuple(int(min(255, v * rng.uniform(0.92, 1.05))) for v in col)
        cv2.line(out, (int(base[0]), int(base[1])), (int(tip[0]), int(tip[1])), fc, max(2, int(s * 0.36)))


def render_query(product_params: ProductParams, rng: np.random.Generator, size: int = 224,
                 difficulty: float = 0.5) -> np.ndarray:
    """The product in the wild (see module docstring); ``difficulty`` in [0, 1] scales every nuisance."""
    d = float(np.clip(difficulty, 0.0, 1.0))
    img, mask = _sprite(product_params, size)
    bg = _background(rng, size)
    c = size / 2
    if rng.random() < 0.1 + 0.3 * d:        # hand-held close-up, partly outside the frame
        s, shift = rng.uniform(1.25, 1.25 + 0.5 * d), rng.uniform(-0.3, 0.3, 2) * size
    else:
        s, shift = rng.uniform(0.95 - 0.35 * d, 1.05), rng.uniform(-0.25, 0.25, 2) * size * (0.3 + d)
    th = np.radians(rng.uniform(-1, 1) * (5 + 40 * d))
    R = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    src = np.float32([[0, 0], [size, 0], [size, size], [0, size]])
    dst = (src - c) @ R.T * s + c + shift + rng.uniform(-1, 1, (4, 2)) * size * s * (0.02 + 0.12 * d)
    H = cv2.getPerspectiveTransform(src, dst.astype(np.float32))
    prod = cv2.warpPerspective(img, H, (size, size), flags=cv2.INTER_LINEAR, borderValue=(255, 255, 255))
    m = cv2.warpPerspective(mask, H, (size, size), flags=cv2.INTER_LINEAR)
    m = m.astype(np.float32)[..., None] * (1 / 255)
    out = bg.astype(np.float32)
    out += (prod.astype(np.float32) - out) * m
    if rng.random() < 0.3 + 0.5 * d:
        ys, xs = np.nonzero(m[..., 0] > 0.5)
        if len(xs):
            k = int(rng.integers(len(xs)))
            _hand(out, rng, (xs[k], ys[k]), size)
    xx, yy = _grid(size)
    g = rng.uniform(-1, 1, 2) * (0.2 + 0.8 * d)
    light = 1 + g[0] * xx + g[1] * yy
    cast = rng.uniform(1 - 0.2 * d, 1 + 0.2 * d, 3).astype(np.float32) * rng.uniform(1 - 0.35 * d, 1 + 0.2 * d)
    out *= light[..., None] * cast
    sigma = rng.uniform(0, 0.3 + 1.8 * d)
    if sigma > 0.4:
        out = cv2.GaussianBlur(out, (0, 0), sigma)
    oy, ox = (int(v) for v in rng.integers(0, 64, 2))
    out += _noise_bank(size)[oy:oy + size, ox:ox + size] * (1.5 + 8 * d * rng.random())
    return np.clip(out, 0, 255).astype(np.uint8)


def _image_id(kind: str, pid: str, n: int, seed: int, opaque: bool) -> str:
    name = f"{pid}{'v' if kind == 'catalogue' else 'q'}{n}"
    return hashlib.sha1(f"{seed}:{name}".encode()).hexdigest()[:12] if opaque else name


def iter_product_images(families: int = 10, products_per_family: int = 4, variants: int = 3,
                        queries_per_product: int = 2, seed: int = 0, size: int = 224, difficulty: float = 0.5,
                        opaque_ids: bool = False) -> Iterator[tuple[str, str, str, np.ndarray]]:
    """Yield ``(kind, image_id, product_id, RGB image)``, kind "catalogue" or "query", product by product.
    Image ids: ``p0003v1`` (catalogue variant 1 of product 3), ``p0003q0`` (query 0), or with
    ``opaque_ids`` a 12-hex-digit hash of those (deterministic). Every image depends only on
    (seed, product, variant/query index, size, difficulty)."""
    for fam in range(families):
        for j in range(products_per_family):
            p = make_product(seed, fam, j, products_per_family)
            pn = fam * products_per_family + j
            for v in range(variants):
                img = render_catalogue(p, v, np.random.default_rng([seed, 1, pn, v]), size)
                yield "catalogue", _image_id("catalogue", p.product_id, v, seed, opaque_ids), p.product_id, img
            for q in range(queries_per_product):
                img = render_query(p, np.random.default_rng([seed, 2, pn, q]), size, difficulty)
                yield "query", _image_id("query", p.product_id, q, seed, opaque_ids), p.product_id, img


@names_its_output
def write_product_dataset(root: str | Path, families: int = 10, products_per_family: int = 4, variants: int = 3,
                          queries_per_product: int = 2, seed: int = 0, size: int = 224, difficulty: float = 0.5,
                          progress: Callable[[int, int], None] | None = None, opaque_ids: bool = False,
                          jpeg_quality: int = 92) -> dict:
    """Write a synthetic Perfect-500K-style data set under ``root``: ``catalogue/<id>.jpg``,
    ``query/<qid>.jpg``, ``val.csv`` (each query's ground truth = every catalogue variant of its product)
    and ``catalogue_products.csv`` (``catalogue_id,product_id``, no header). ``progress(done, total)`` is
    called after each image. Returns a summary dict of paths and counts. A ``root`` that already holds a data
    set (an image in ``catalogue/`` or ``query/``, ``val.csv`` or ``catalogue_products.csv``) is a DataError:
    its images would mix with the new ones (and a stale val.csv outlive them); nothing there is deleted."""
    if variants < 1 or families < 0 or products_per_family < 0 or queries_per_product < 0:
        raise ValueError("need variants >= 1 and non-negative counts")
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIDE <= size <= MAX_SIDE:
        # checked before the first image: a side of 20,000 px went to numpy as a 1.2 GB canvas per image
        raise ConfigError(f"size {size!r}: a whole number of pixels from {MIN_SIDE} to {MAX_SIDE}")
    root = Path(root)
    cat_dir, q_dir = root / P.CATALOGUE_DIR, root / P.QUERY_DIR
    held = [root / n for n in (P.GROUND_TRUTH, P.PRODUCT_LABELS) if (root / n).exists()]
    held += [p for d in (cat_dir, q_dir) if d.is_dir() for p in d.iterdir() if p.suffix.lower() in P.PRODUCT_SUFFIXES]
    if held:
        raise DataError(f"already holds a data set ({held[0].relative_to(root)} and {len(held) - 1} more): the new "
                        "images would mix with its images; write into a new or empty folder", path=root)
    cat_dir.mkdir(parents=True, exist_ok=True)
    q_dir.mkdir(parents=True, exist_ok=True)
    total = families * products_per_family * (variants + queries_per_product)
    by_product: dict[str, list[str]] = {}
    labels: dict[str, str] = {}
    query_product: dict[str, str] = {}
    for done, (kind, iid, pid, img) in enumerate(iter_product_images(
            families, products_per_family, variants, queries_per_product, seed, size, difficulty, opaque_ids), 1):
        folder = cat_dir if kind == "catalogue" else q_dir
        (folder / f"{iid}.jpg").write_bytes(encode_jpeg(img, jpeg_quality))
        if kind == "catalogue":
            by_product.setdefault(pid, []).append(iid)
            labels[iid] = pid
        else:
            query_product[iid] = pid
        if progress is not None:
            progress(done, total)
    gt = {q: by_product[pid] for q, pid in query_product.items()}
    if gt:
        P.write_ground_truth(root / P.GROUND_TRUTH, gt)
    P.write_product_labels(root / P.PRODUCT_LABELS, labels)
    return {"root": str(root), "catalogue_dir": str(cat_dir), "query_dir": str(q_dir),
            "ground_truth": str(root / P.GROUND_TRUTH), "product_labels": str(root / P.PRODUCT_LABELS),
            "families": families, "products": families * products_per_family, "catalogue_images": len(labels),
            "queries": len(gt), "seed": seed, "size": size, "difficulty": difficulty}
