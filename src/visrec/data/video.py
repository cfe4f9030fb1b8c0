"""Video face sets: a list of videos, each a video file or a folder of aligned frames, with a label.

List file (``videos.csv``): one video per line, ``video_id,path,label``; ``path`` is relative to the list's
folder (or absolute); blank lines and lines starting with ``#`` are ignored. A video id or a path listed twice
is a ``DataError`` naming both lines (one video under two ids would be scored as a genuine pair of itself).
``path`` is a folder of frame images (``*.jpg``/``*.png``, read in name order) or any video file OpenCV decodes
(``.mp4``, ``.avi``...). Frames are aligned 112x112 face crops (``visrec.faces.align``; raw footage goes through
detection and alignment first).

Per-frame detector scores, when the detector gave them: ``scores.txt`` inside a frame folder, or
``<video file>.scores.txt`` beside a video file: one float per line, one line per frame, in frame order; each a
finite number in [0, ``MAX_SCORE``] (1e6; a negative weight would flip the fused feature, and float32 sums of
larger ones overflow).

Bounds on untrusted video (each a ``DataError`` naming the video): ``read_frames`` holds at most ``MAX_FRAMES``
(10,000) aligned frames of a video (112x112 RGB: 376 MB), refused from the declared count before decoding, and
from the count read while decoding; raw video (``visrec.faces.tracking.iter_frames``) is decoded one frame at a
time, each at most ``MAX_FRAME_PIXELS`` (8K UHD, 7680x4320) pixels, refused from the declared size before
decoding and per frame while decoding.

LFR video track: the organisers' ``video_filelist.txt`` lists video ids, one per line; a submission is
the feature binary of ``visrec.evaluate.lfr`` with one fused feature per video in that order.

Synthetic videos (``write_video_dataset``): one identity per video, the pose (yaw, roll, scale, shift)
moving smoothly along random low-frequency trajectories, and a controllable share of degraded frames,
each one of: strong blur, a large occluder, extreme yaw, low light. A degraded frame's detector score is
drawn lower (uniform 0.3-0.8) than a clean frame's (0.75-1.0), overlapping as real detector scores do.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from visrec._files import NOT_REGULAR, names_its_output
from visrec.data import synth as S
from visrec.data.images import MAX_IMAGE_FILE_BYTES, decode_image, write_image
from visrec.data.text import listed_place, read_bytes, read_lines
from visrec.errors import ConfigError, DataError

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
EXACT_COUNT_SUFFIXES = (".avi", ".mp4", ".m4v", ".mov")  # containers whose frame count is an index, not an estimate
MIN_BYTES_PER_FRAME = 16  # read_frames: a video file gives at most one frame per this many bytes
MAX_FRAMES = 10_000  # read_frames: frames of one video held at once (112x112x3 bytes each: 376 MB)
MAX_FRAME_PIXELS = 7680 * 4320  # raw video frames (tracking.iter_frames): 8K UHD, 100 MB as RGB
MAX_SCORE = 1e6  # a detector score in a scores file (as visrec.evaluate.ijb): float32 sums of them stay finite
DEGRADATIONS = ("blur", "occlusion", "pose", "dark")


@dataclass(frozen=True)
class VideoItem:
    video_id: str
    path: Path
    label: str


def _kind(path: Path, record=None) -> str | None:
    """"dir", "file" or None (missing) for a path named by a list file; a name the system refuses (too long,
    a NUL byte, no permission), a pipe or a device is a DataError naming it."""
    try:
        if path.is_dir():
            return "dir"
        if path.is_file():
            return "file"
        if path.exists():  # OpenCV would wait on a pipe for ever
            raise DataError(NOT_REGULAR, path=path, record=record)
        return None
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot open: {getattr(exc, 'strerror', None) or exc}", path=path, record=record) from None


def read_video_list(path: str | Path) -> list[VideoItem]:
    path = Path(path)
    if not path.exists():
        raise DataError("video list not found", path=path)
    items, seen, places = [], {}, {}
    for lineno, line in enumerate(read_lines(path), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 3 or not all(fields) or "\x00" in fields[1]:
            raise DataError(f"expected 'video_id,path,label', got {line[:200]!r}", path=path,
                            record=f"line {lineno}")
        vid, rel, label = fields
        if vid in seen:
            raise DataError(f"video id {vid!r} repeats line {seen[vid]}", path=path, record=f"line {lineno}")
        seen[vid] = lineno
        p = Path(rel) if Path(rel).is_absolute() else path.parent / rel
        where = listed_place(p)  # videos/a, ./videos/a and its absolute path are one video
        if where in places:
            raise DataError(f"video {rel[:200]!r} is listed on line {places[where]} already, under another id",
                            path=path, record=f"line {lineno}")
        places[where] = lineno
        items.append(VideoItem(vid, p, label))
    if not items:
        raise DataError("no videos listed", path=path)
    return items


def video_list_rows(path: str | Path, items: list[VideoItem]) -> str:
    """The ``video_id,path,label`` lines of ``items`` for a list file at ``path`` (paths relative to its folder
    where they lie under it)."""
    lines = []
    for it in items:
        p = Path(it.path)
        try:
            p = p.relative_to(Path(path).parent)
        except ValueError:
            pass
        lines.append(f"{it.video_id},{p.as_posix()},{it.label}\n")
    return "".join(lines)


def write_video_list(path: str | Path, items: list[VideoItem]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(video_list_rows(path, items), encoding="utf-8")
    return path


def read_frames(path: str | Path, video_id: str | None = None, max_frames: int | None = None) -> list[np.ndarray]:
    """RGB uint8 112x112 frames of a frame folder or a video file (errors name the video and file).

    Each frame is checked as it is read (a frame of another size stops the read at once), and a video file
    may hold at most one frame per ``MIN_BYTES_PER_FRAME`` bytes of its length and at most ``MAX_FRAMES``
    frames in all (more is a ``DataError``, before decoding when the container declares more; ``max_frames``
    up to ``MAX_FRAMES`` reads the first ones): what it decodes to stays bounded, whatever its header or
    stream claims.

    A video file whose frames end before the frame count its container declares (a truncated or corrupt file:
    OpenCV's read simply fails at the first frame it cannot decode) is a ``DataError`` naming the file and both
    counts, unless ``max_frames`` asked for no more than were read. Why an error and not a warning: for the
    containers listed in ``EXACT_COUNT_SUFFIXES`` (AVI, MP4/MOV, what visrec writes and the LFR sets use) the
    count OpenCV reports is the container's own index (AVI's header/idx1, MP4's sample table), so fewer frames
    means frames are missing, and a video evaluated on a third of its frames would give a silently different
    feature. A shortfall of at most 2 frames or 1% (an MP4 edit list can hide a frame or two its sample table
    counts) is a ``UserWarning`` only. For other containers (MKV, WebM, raw streams) FFmpeg may only estimate the
    count from the duration and frame rate, which can exceed the real count: there a shortfall is a
    ``UserWarning`` with both counts."""
    path = Path(path)
    record = f"video {video_id}" if video_id else None
    frames: list[np.ndarray] = []

    def keep(frame: np.ndarray, where: Path) -> None:
        if frame.shape[:2] != (112, 112):
            raise DataError(f"frames must be aligned 112x112 face crops, got {frame.shape[1]}x{frame.shape[0]}",
                            path=where, record=record)
        frames.append(frame)

    cap_frames = MAX_FRAMES if max_frames is None else min(max_frames, MAX_FRAMES)
    too_many = (f"more than {MAX_FRAMES} frames, the most visrec holds of one video (pass max_frames to read "
                f"the first ones)")
    kind = _kind(path, record)
    if kind == "dir":
        try:
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        except OSError as exc:
            raise DataError(f"cannot list frames: {exc.strerror}", path=path, record=record) from None
        if len(files) > cap_frames and (max_frames is None or max_frames > MAX_FRAMES):
            raise DataError(too_many, path=path, record=record)
        files = files[:cap_frames]
        for f in files:
            keep(decode_image(read_bytes(f, MAX_IMAGE_FILE_BYTES), source=f, record=record), f)
    elif kind == "file":
        limit = min(max(1, path.stat().st_size // MIN_BYTES_PER_FRAME), cap_frames)
        cap = cv2.VideoCapture(str(path))
        try:
            w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
            if w > 0 and h > 0 and (w, h) != (112, 112):  # refused before a frame is decoded at that size
                raise DataError(f"frames must be aligned 112x112 face crops, the video declares {w}x{h}",
                                path=path, record=record)
            declared = cap.get(cv2.CAP_PROP_FRAME_COUNT)
            if math.isfinite(declared) and declared > MAX_FRAMES and (max_frames is None or max_frames > MAX_FRAMES):
                raise DataError(f"the video declares {int(declared)} frames: {too_many}", path=path, record=record)
            while len(frames) < limit:
                try:
                    ok, img = cap.read()
                except cv2.error:
                    ok = False
                if not ok or img is None or img.ndim != 3 or img.shape[2] != 3:
                    break
                keep(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), path)
            if len(frames) == limit and (max_frames is None or limit < max_frames):
                try:
                    more = cap.read()[0]
                except cv2.error:
                    more = False
                if more and limit == MAX_FRAMES:
                    raise DataError(too_many, path=path, record=record)
                if more:
                    raise DataError(f"more than {limit} frames in {path.stat().st_size} bytes (at most one per "
                                    f"{MIN_BYTES_PER_FRAME} bytes)", path=path, record=record)
            if frames:  # none at all: the error below
                _check_count(path, record, len(frames), declared, max_frames)
        finally:
            cap.release()
    else:
        raise DataError("video file or frame folder not found", path=path, record=record)
    if not frames:
        raise DataError("no frames could be read", path=path, record=record)
    return frames


def _check_count(path: Path, record, read: int, declared: float, max_frames: int | None) -> None:
    """``read_frames``'s check of a video file's frames against its declared count (its docstring says why)."""
    if not (math.isfinite(declared) and declared > 0):
        return  # no count declared: nothing to compare
    expected = int(round(declared)) if max_frames is None else min(int(round(declared)), max_frames)
    if read >= expected:
        return
    message = (f"only {read} of the {int(round(declared))} frames the video declares could be decoded "
               f"(truncated or corrupt file)")
    # an MP4 with an edit list can show a frame or two fewer than its sample table counts: that is no damage
    slack = max(2, expected // 100)
    if path.suffix.lower() in EXACT_COUNT_SUFFIXES and read < expected - slack:
        raise DataError(message, path=path, record=record)
    warnings.warn(f"{path}{f' ({record})' if record else ''}: {message}; the container's count may be off or an "
                  f"estimate ({path.suffix or 'no suffix'}), so the {read} frames are used", stacklevel=3)


def scores_path(path: str | Path) -> Path:
    path = Path(path)
    return path / "scores.txt" if path.is_dir() else path.with_name(path.name + ".scores.txt")


def read_frame_scores(path: str | Path, num_frames: int, *, first: bool = False) -> np.ndarray | None:
    """Detector scores of a video's frames, or None when the video has none. Each score is a finite number in
    [0, ``MAX_SCORE``] (a DataError naming the file and line otherwise). Score fusion weighs each frame by its
    score, so a file where no score is above 0 is a ``DataError`` naming it (the fused feature would be zero).

    The file must hold one score per frame: ``num_frames`` of them; with ``first`` (``read_frames`` stopped at
    its ``max_frames``: the frames read are the video's first ``num_frames``) one per frame of the whole video
    (its frame files, or the count a video file declares, with ``read_frames``' slack), and the first
    ``num_frames`` are returned."""
    sp = scores_path(path)
    if _kind(sp) is None:
        return None
    values = []
    for lineno, line in enumerate(read_lines(sp), start=1):
        if line.strip():
            try:
                values.append(float(line))
            except ValueError:
                values.append(math.nan)
            if not math.isfinite(values[-1]):
                raise DataError(f"not a number: {line[:80]!r}", path=sp, record=f"line {lineno}")
            if not 0 <= values[-1] <= MAX_SCORE:  # 1e39 is a finite Python float but inf in float32
                raise DataError(f"detector score {values[-1]:g} is outside [0, {MAX_SCORE:g}]", path=sp,
                                record=f"line {lineno}")
    if first and len(values) >= num_frames:
        total = _frame_total(Path(path))
        if total is not None and not total[0] <= len(values) <= total[1]:
            span = str(total[1]) if total[0] == total[1] else f"{total[0]} to {total[1]}"
            raise DataError(f"{len(values)} scores for a video of {span} frames", path=sp)
        values = values[:num_frames]
    if len(values) != num_frames:
        raise DataError(f"{len(values)} scores for {num_frames} frames", path=sp)
    if max(values, default=0.0) <= 0:
        raise DataError(f"no frame of video {Path(path).name!r} has a detector score above 0: weighted by them, "
                        f"its feature would be zero", path=sp)
    return np.asarray(values, np.float32)


def _frame_total(path: Path) -> tuple[int, int] | None:
    """The range of frame counts a whole video may have: its frame files, or a video file's declared count less
    ``_check_count``'s slack (an estimate, for containers outside ``EXACT_COUNT_SUFFIXES``: any count up to it);
    None when the file declares none."""
    if path.is_dir():
        n = sum(1 for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        return n, n
    cap = cv2.VideoCapture(str(path))
    try:
        declared = cap.get(cv2.CAP_PROP_FRAME_COUNT)
    finally:
        cap.release()
    if not (math.isfinite(declared) and declared > 0):
        return None
    n = int(round(declared))
    return (n - max(2, n // 100) if path.suffix.lower() in EXACT_COUNT_SUFFIXES else 1), n


# --- synthetic videos --------------------------------------------------------------------------------

def render_video(identity: int, num_frames: int, rng: np.random.Generator, *, seed: int = 0,
                 degraded_share: float = 0.3, difficulty: float = 0.2) -> tuple[list[np.ndarray], list[str], np.ndarray]:
    """One track of ``identity``: (frames RGB uint8 112x112, kind per frame ("clean" or a DEGRADATIONS name),
    detector scores). Exactly round(degraded_share * num_frames) frames are degraded."""
    p, shape = S._identity_params(seed, identity), S._identity_shape(seed, identity)
    t = np.arange(num_frames) / max(1, num_frames - 1)

    def wave(amplitude):  # a smooth random trajectory over the track
        f, phase = rng.uniform(0.3, 1.0), rng.uniform(0, 2 * math.pi)
        return amplitude * np.sin(2 * math.pi * f * t + phase)

    yaw, roll = wave(0.5 * difficulty + 0.1), wave(4 + 15 * difficulty)
    scale, sx, sy = 1 + wave(0.06), wave(2 + 4 * difficulty), wave(2 + 4 * difficulty)
    n_bad = int(round(np.clip(degraded_share, 0, 1) * num_frames))
    kinds = ["clean"] * num_frames
    for i in rng.choice(num_frames, n_bad, replace=False):
        kinds[i] = DEGRADATIONS[int(rng.integers(len(DEGRADATIONS)))]
    bg_seed = int(rng.integers(2**31))  # the same background colour in every frame of the track
    frames, scores = [], []
    for i, kind in enumerate(kinds):
        y = float(np.clip(yaw[i] * 2.2, -1, 1)) if kind != "pose" else float(rng.choice([-1, 1]))
        pts = S._face_points(p, shape, smile=0.2 * difficulty, mouth_open=0.1, eye_open=1.0, yaw=y)
        canvas = S._draw(shape, pts, np.random.default_rng(bg_seed))
        m = cv2.getRotationMatrix2D((S._CX, S._CY), float(roll[i]), float(scale[i]))
        m[:, 2] += (sx[i], sy[i])
        img = cv2.warpAffine(canvas, m, (S.SIZE, S.SIZE), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REFLECT).astype(np.float32)
        if kind == "blur":
            img = cv2.GaussianBlur(img, (0, 0), rng.uniform(3.0, 5.0))
        elif kind == "dark":
            img *= rng.uniform(0.12, 0.25)
        elif kind == "occlusion":
            w, h = rng.integers(55, 80, 2)
            x0, y0 = rng.integers(0, S.SIZE - 40, 2)
            img[y0:y0 + h, x0:x0 + w] = rng.uniform(0, 255, 3)
        img += rng.standard_normal(img.shape).astype(np.float32) * 3
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
        scores.append(rng.uniform(0.75, 1.0) if kind == "clean" else rng.uniform(0.3, 0.8))
    return frames, kinds, np.asarray(scores, np.float32)


@names_its_output
def write_video_dataset(root: str | Path, num_identities: int, videos_per_identity: int, frames_per_video: int, *,
                        seed: int = 0, degraded_share: float = 0.3, difficulty: float = 0.2,
                        first_identity: int = 0, video_format: str = "folder",
                        progress: Callable[[], None] | None = None) -> Path:
    """Render ``root/videos/<video_id>/`` frame folders (``video_format="folder"``, with ``scores.txt``) or
    ``root/videos/<video_id>.avi`` (MJPG, with ``.avi.scores.txt``), ``root/videos.csv`` (the list format)
    and ``root/video_filelist.txt`` (LFR order). Label k is identity first_identity + k. Returns the list. A
    ``root`` that already holds a video set (``videos.csv``, ``video_filelist.txt`` or anything in ``videos/``) is
    a DataError: its lists would be overwritten and its frames mix with the new ones; nothing there is deleted."""
    if video_format not in ("folder", "avi"):
        raise ValueError(f"video_format must be 'folder' or 'avi', got {video_format!r}")
    if isinstance(frames_per_video, bool) or not isinstance(frames_per_video, int) \
            or not 1 <= frames_per_video <= MAX_FRAMES:  # more would be a video set read_frames refuses
        raise ConfigError(f"frames per video {frames_per_video!r}: a whole number from 1 to {MAX_FRAMES:,} (the most "
                          "visrec reads of one video)")
    S.check_seed(seed, first_identity)
    root = Path(root)
    held = [root / n for n in ("videos.csv", "video_filelist.txt") if (root / n).exists()]
    held += sorted((root / "videos").iterdir()) if (root / "videos").is_dir() else []
    if held:
        raise DataError(f"already holds a video set ({held[0].relative_to(root)} and {len(held) - 1} more): the new "
                        "videos would mix with its videos; write into a new or empty folder", path=root)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    items = []
    for label in range(num_identities):
        ident = first_identity + label
        for v in range(videos_per_identity):
            rng = np.random.default_rng([seed, ident, v, 7727])
            frames, _, scores = render_video(ident, frames_per_video, rng, seed=seed, degraded_share=degraded_share,
                                             difficulty=difficulty)
            vid = f"{ident:06d}_{v:02d}"
            if video_format == "folder":
                path = root / "videos" / vid
                path.mkdir(exist_ok=True)
                for i, f in enumerate(frames):
                    write_image(path / f"{i:04d}.png", f)
            else:
                path = root / "videos" / f"{vid}.avi"
                writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (112, 112))
                if not writer.isOpened():
                    raise DataError("cannot write this video (OpenCV's MJPG writer did not open it)", path=path)
                for f in frames:
                    writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
                writer.release()
            scores_path(path).write_text("".join(f"{s:.4f}\n" for s in scores))
            items.append(VideoItem(vid, path, str(label)))
            if progress:
                progress()
    (root / "video_filelist.txt").write_text("".join(f"{it.video_id}\n" for it in items))
    return write_video_list(root / "videos.csv", items)
