"""Face tracks in raw video: detect in every frame, link detections into tracks, write tracks as a video set.

``track_video(frames, detector, embedder)`` -> ``list[Track]``; ``video_to_tracks(...)`` writes each track of
at least ``min_len`` frames as a frame folder of the video-set format (``visrec.data.video``): aligned 112x112
crops ``<out_root>/videos/<video id>_t<track>/<frame:06d>.png``, the detector's scores in ``scores.txt`` (one per
frame, the frame-quality sidecar), a ``videos.csv`` row ``video_id,path,label`` and a ``video_filelist.txt`` line.

Conventions: frames are RGB uint8 (H, W, 3); boxes float pixels ``x1, y1, x2, y2``, origin top-left; frame
indices count from 0. Crops: ArcFace-aligned (``align.align_face``) when the detection has 5 points, else the
box enlarged by ``box_margin`` per side, square, resized to 112x112 (``augment.crop_face``; not aligned).

Association, frame by frame, between the open tracks and the frame's detections:
* without an embedder, a pair may match when the IoU of the track's last box and the detection's box is at least
  ``iou_threshold``; the affinity is that IoU.
* with an embedder (``embedder(crops (N, 112, 112, 3) uint8) -> (N, D)`` float, e.g. ``serve.pipeline.Embedder``)
  appearance decides: a pair may match when the cosine similarity of the track's embedding (a running mean,
  ``momentum``, of its L2-normalised crop embeddings) and the detection's is at least ``sim_threshold``, and the
  affinity is similarity + IoU, so position only ranks the candidates. That is what keeps identities through
  crossings, occlusions and missed detections, where the nearest box is often the other face.
The assignment maximises the total affinity (Hungarian, ``scipy.optimize.linear_sum_assignment``).
Unmatched detections open new tracks; a track missed in more than
``max_age`` consecutive frames is closed.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from visrec._files import NOT_REGULAR, replacing
from visrec.data.augment import crop_face
from visrec.data.images import IMAGE_SUFFIXES, read_image, write_image
from visrec.data.prepare import MAX_NAME_BYTES, utf8_text
from visrec.data.text import FolderClaim, read_text
from visrec.errors import DataError, VisrecError, shown
from visrec.faces.align import align_face, check_method
from visrec.faces.detectors import load_detector

CROP_SIZE = 112


@dataclass
class Track:
    """One face over time: ``frames`` (frame indices, increasing), ``boxes`` float32 (N, 4) x1y1x2y2,
    ``scores`` float32 (N,) detector scores, ``crops``: N aligned 112x112 RGB crops, or their PNG paths when
    ``track_video`` was given a ``crop_dir``."""

    id: int
    frames: list[int] = field(default_factory=list)
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    crops: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.frames)


def iter_frames(source) -> Iterator[np.ndarray]:
    """RGB frames of a video file (anything OpenCV decodes), a folder of frame images (name order) or an
    iterable of RGB arrays.

    A video file or folder that gives no frame is a ``DataError`` naming it; so is a video file whose frames
    end before the count its container declares (``visrec.data.video.read_frames``' check: a truncated file),
    and a frame over ``visrec.data.video.MAX_FRAME_PIXELS`` pixels (refused from the declared size before
    decoding, and per frame)."""
    import cv2

    from visrec.data.video import MAX_FRAME_PIXELS, _check_count

    if not isinstance(source, (str, Path)):
        yield from source
        return
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError("no frame images (.jpg/.png/...) in this frame folder", path=path)
        for f in files:
            yield read_image(f)
        return
    if not path.is_file():  # OpenCV would wait on a pipe for ever
        raise DataError(NOT_REGULAR if path.exists() else "video file or frame folder not found", path=path)
    if not utf8_text(str(path)):  # OpenCV's video reader crashes the process (SIGSEGV) on such a name
        raise DataError("the file's name is not UTF-8 text, which OpenCV cannot open: rename it", path=path)
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise DataError("OpenCV cannot open this video", path=path)

    def check_size(w: int, h: int, what: str) -> None:
        if w * h > MAX_FRAME_PIXELS:
            raise DataError(f"{what} {w}x{h} pixels, more than the {MAX_FRAME_PIXELS} visrec decodes", path=path)

    try:
        check_size(int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                   "the video declares frames of")
        declared = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        n = 0
        while True:
            try:
                ok, frame = cap.read()
            except cv2.error:
                ok = False
            if not ok or frame is None:
                break
            check_size(frame.shape[1], frame.shape[0], f"frame {n} has")
            n += 1
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        if n == 0:
            raise DataError("no frames could be read", path=path)
        _check_count(path, None, n, declared, None)  # a truncated video would give silently fewer tracks
    finally:
        cap.release()


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) IoU of x1y1x2y2 boxes (continuous areas)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def assign(affinity: np.ndarray, allowed: np.ndarray) -> list[tuple[int, int]]:
    """(row, column) pairs among the ``allowed`` ones maximising the summed ``affinity``, each row and column
    used at most once (Hungarian, scipy's ``linear_sum_assignment``)."""
    rows, cols = np.nonzero(allowed)
    if len(rows) == 0:
        return []
    from scipy.optimize import linear_sum_assignment  # a declared dependency: no silent greedy fallback

    # forbidden pairs get a cost no allowed assignment can beat, and are dropped afterwards
    big = 1.0 + 2.0 * float(np.abs(affinity[allowed]).sum())
    cost = np.where(allowed, -affinity, big)
    r, c = linear_sum_assignment(cost)
    return [(int(i), int(j)) for i, j in zip(r, c) if allowed[i, j]]


def _crop(frame: np.ndarray, det, box_margin: float, align: str = "lstsq") -> np.ndarray:
    if det.points is not None:
        return align_face(frame, np.asarray(det.points, np.float32), CROP_SIZE, align)[0]
    return crop_face(frame, np.zeros((1, 2)), det.box, CROP_SIZE, box_margin)[0]


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class _Open:
    """A track being built: its record plus what association needs."""

    def __init__(self, track: Track, box: np.ndarray, emb: np.ndarray | None):
        self.track, self.box, self.emb, self.missed = track, box, emb, 0
        self.boxes, self.scores = [], []


def track_video(frames, detector, embedder: Callable[[np.ndarray], np.ndarray] | None = None, *,
                iou_threshold: float = 0.3, sim_threshold: float = 0.5, max_age: int = 10,
                momentum: float = 0.9, box_margin: float = 0.1, align: str = "lstsq",
                crop_dir: str | Path | None = None, progress: Callable[[int], None] | None = None) -> list[Track]:
    """Tracks of the faces in ``frames`` (``iter_frames`` input), ordered by id (= order of appearance).

    ``detector``: a ``load_detector`` spec or a callable ``rgb_frame -> list[Detection]``. ``embedder`` and the
    thresholds: module docstring. ``align``: ``align.align_face``'s method for detections with 5 points
    (``lstsq`` or ``eyes``, as the model that will read the crops was trained). ``crop_dir``: write each crop to ``crop_dir/<track id:04d>/<frame:06d>.png``
    and keep paths instead of arrays (long videos). ``progress(frames done)`` after each frame."""
    check_method(align)  # before any frame is read, not at the first face
    if isinstance(detector, (str, Path)):
        detector = load_detector(detector)
    crop_dir = None if crop_dir is None else Path(crop_dir)
    live: list[_Open] = []
    done: list[_Open] = []
    next_id = 0
    for f, frame in enumerate(iter_frames(frames)):
        dets = list(detector(frame))
        crops = [_crop(frame, d, box_margin, align) for d in dets]
        boxes = np.array([np.asarray(d.box, np.float32) for d in dets], np.float32).reshape(-1, 4)
        embs = _normalise(embedder(np.stack(crops))) if embedder is not None and dets else None
        if live and dets:
            iou = iou_matrix(np.stack([t.box for t in live]), boxes)
            if embs is None:
                allowed, affinity = iou >= iou_threshold, iou
            else:
                sim = np.stack([t.emb for t in live]) @ embs.T
                allowed, affinity = sim >= sim_threshold, sim + iou
            pairs = assign(affinity, allowed)
        else:
            pairs = []
        matched = {c: live[r] for r, c in pairs}
        for t in live:
            t.missed += 1
        for c in range(len(dets)):
            if c not in matched:  # a new face
                matched[c] = _Open(Track(next_id), boxes[c], None if embs is None else embs[c])
                live.append(matched[c])
                next_id += 1
            elif embs is not None:
                t = matched[c]
                t.emb = _normalise(momentum * t.emb + (1 - momentum) * embs[c])
            t = matched[c]
            t.missed, t.box = 0, boxes[c]
            t.track.frames.append(f)
            t.boxes.append(boxes[c])
            t.scores.append(float(dets[c].score))
            if crop_dir is None:
                t.track.crops.append(crops[c])
            else:
                path = crop_dir / f"{t.track.id:04d}" / f"{f:06d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                write_image(path, crops[c])
                t.track.crops.append(path)
        done += [t for t in live if t.missed > max_age]
        live = [t for t in live if t.missed <= max_age]
        if progress:
            progress(f + 1)
    out = []
    for t in sorted(done + live, key=lambda t: t.track.id):
        t.track.boxes = np.asarray(t.boxes, np.float32).reshape(-1, 4)
        t.track.scores = np.asarray(t.scores, np.float32)
        out.append(t.track)
    return out


def video_to_tracks(source, out_root: str | Path, detector, embedder=None, *, video_id: str | None = None,
                    min_len: int = 5, label: Callable[[Track], str] | None = None,
                    progress: Callable[[int], None] | None = None, resume: bool = False,
                    **track_options) -> list[tuple[str, Path]]:
    """Track the faces of one video and add each track of at least ``min_len`` frames to the video set at
    ``out_root`` (module docstring: layout). Returns ``[(video_id, frame folder)]`` of the tracks written.

    ``source``: a video file or frame folder (``video_id`` defaults to its stem) or an iterable of frames
    (``video_id`` required). Track video ids are ``<video_id>_t<track id:03d>``. ``label(track) -> str`` names
    the identity; by default each track is its own identity, labelled with its video id (tracks are not
    identities: the same person may give several). A video whose tracks are already in ``videos.csv`` is
    refused (remove its rows and folders to redo it); with ``resume`` (``visrec data prepare videos``, re-run
    after a kill) its tracks are returned as they are, and track folders a killed run moved in before writing
    their rows are removed and the video is tracked again. ``track_options`` go to ``track_video``.

    ``video_filelist.txt`` is written (whole, then renamed) before ``videos.csv``: a kill between the two leaves
    tracks listed there but not in ``videos.csv``, which the next run (with ``resume``) writes again."""
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    # one writer at a time: videos.csv is read at the start and written whole at the end
    with FolderClaim(out_root, "run adding videos to this set"):
        return _video_to_tracks(source, out_root, detector, embedder, video_id, min_len, label, progress, resume,
                                track_options)


def default_video_id(source: str | Path) -> str:
    """The id a video gets when none is given: a file's stem, a frame folder's name."""
    return Path(source).stem if Path(source).is_file() else Path(source).name


def check_distinct_video_ids(sources) -> None:
    """Refuse (``DataError``) two videos of one run that would get the same id (``a/clip.mp4``, ``b/clip.mp4``):
    the second was taken for the first, finished, and silently skipped."""
    seen: dict[str, Path] = {}
    for source in sources:
        first = seen.setdefault(default_video_id(source), Path(source))
        if first != Path(source):
            raise DataError(f"this and {first} would both be video {shown(default_video_id(source), 80)} (a file's "
                            f"stem, a folder's name): rename one, or prepare them in two runs with two --out",
                            path=source)


def _video_to_tracks(source, out_root: Path, detector, embedder, video_id, min_len, label, progress, resume,
                     track_options) -> list[tuple[str, Path]]:
    from visrec.data.video import VideoItem, read_video_list, scores_path, video_list_rows

    if video_id is None:
        if not isinstance(source, (str, Path)):
            raise VisrecError("frames given as an iterable need a video_id")
        video_id = default_video_id(source)
    if (not video_id or any(ch in video_id for ch in ",/\\\n") or video_id.startswith((".", "#"))
            or not utf8_text(video_id) or len(video_id.encode("utf-8")) > MAX_NAME_BYTES):
        raise VisrecError(f"video id {shown(video_id, 80)} cannot name a folder and a videos.csv field (UTF-8 text "
                          f"of at most {MAX_NAME_BYTES} bytes without ',', '/', '\\', a line break or a leading '.' "
                          f"or '#'): rename the video")
    list_path = out_root / "videos.csv"
    videos = out_root / "videos"
    if videos.exists() and not videos.is_dir():  # found only after the whole video was tracked (a traceback)
        raise DataError("must be the folder of track folders; this is a file: move it out of the video set",
                        path=videos)
    # read once: the folder claim keeps other writers out until the new rows go after this text
    listed = read_text(list_path) if list_path.exists() else ""
    existing = read_video_list(list_path) if listed.strip() else []
    prefix = f"{video_id}_t"
    ours = re.compile(re.escape(prefix) + r"\d{3,}").fullmatch  # this video's tracks, not those of 'clip_tx'
    done = [it for it in existing if ours(it.video_id)]
    strays = sorted(p for p in videos.iterdir() if ours(p.name)) if videos.is_dir() else []
    if (done or strays) and not resume:
        raise VisrecError(f"{out_root} already holds tracks of video {video_id!r} ({prefix}*): remove them "
                          "(videos.csv rows and folders) or pass another video_id")
    if done:  # finished by an earlier run: its file-list lines too (a kill may have come between the two files)
        _add_to_filelist(out_root, [it.video_id for it in done])
        return [(it.video_id, it.path) for it in done]
    for stray in strays:  # moved in by a run killed before it wrote their rows: redone below
        if not _written_by_a_track_move(stray):  # never a folder (or file) of the user's that happens to match
            raise VisrecError(f"{stray} is named like a track of video {video_id!r} but is not listed in "
                              f"{list_path.name} and holds more than the crops (NNNNNN.png) and scores.txt a "
                              f"track folder holds: move it out of {videos}, then run again")
        shutil.rmtree(stray)
    staging = videos / f".{video_id}.tracking"  # ours alone: a killed run's leftovers are discarded here
    if staging.exists():
        shutil.rmtree(staging)
    try:
        tracks = track_video(source, detector, embedder, crop_dir=staging, progress=progress, **track_options)
        kept = []  # every label checked before any folder moves: a refused one leaves the set as it was
        for t in tracks:
            if len(t) < min_len:
                continue
            vid = f"{prefix}{t.id:03d}"
            name = vid if label is None else str(label(t))
            if not name.strip() or any(ch in name for ch in ",\n"):
                raise VisrecError(f"label {name!r} of track {vid} cannot be a videos.csv field")
            kept.append((t, vid, name.strip()))
        items, written = [], []
        for t, vid, name in kept:
            dest = videos / vid
            os.replace(staging / f"{t.id:04d}", dest)
            scores_path(dest).write_text("".join(f"{s:.4f}\n" for s in t.scores))
            items.append(VideoItem(vid, dest, name))
            written.append((vid, dest))
    finally:  # a failure (a bad frame, a detector error) leaves no staging folder behind
        if staging.exists():
            shutil.rmtree(staging)
    if items:
        _add_to_filelist(out_root, [it.video_id for it in items])
        # the list as the user has it (comment lines, blank lines, their own paths), the new rows after it
        with replacing(list_path) as tmp:
            tmp.write_text(listed + ("\n" if listed and not listed.endswith("\n") else "")
                           + video_list_rows(tmp, items), encoding="utf-8")
    return written


def _written_by_a_track_move(folder: Path) -> bool:
    """Whether ``folder`` holds only what a track folder holds (its crops ``NNNNNN.png`` and ``scores.txt``): a
    folder a killed run moved in, which may be removed and redone."""
    if not folder.is_dir() or folder.is_symlink():
        return False
    return all(f.is_file() and not f.is_symlink() and (re.fullmatch(r"\d{6}\.png", f.name) or f.name == "scores.txt")
               for f in folder.iterdir())


def _add_to_filelist(out_root: Path, ids: list[str]) -> None:
    """Append the ``ids`` not yet listed to ``out_root/video_filelist.txt``, written whole and renamed in."""
    path = out_root / "video_filelist.txt"
    listed = read_text(path).splitlines() if path.exists() else []
    known = set(listed)
    new = [i for i in ids if i not in known]
    if new:
        with replacing(path) as tmp:
            tmp.write_text("".join(f"{line}\n" for line in listed + new), encoding="utf-8")
