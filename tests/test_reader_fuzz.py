"""Fuzz every reader of ``visrec.data`` with seeded mutations of valid files: only visrec errors may come out.

Each reader gets a valid file written by ``visrec.data.synth`` (or the format's own writer, as synth does),
then a few hundred seeded mutations of it: byte flips, truncations, inserted and deleted bytes, duplicated
spans or lines, non-UTF-8 bytes, huge/negative/NaN numbers in text and in the binary size and label fields.
The reader is called and what it returns is used (images decoded, records iterated). Any exception that is
not a ``VisrecError`` (IndexError, ValueError, UnicodeDecodeError, MemoryError, struct.error, cv2.error ...)
fails the test, listed with the mutation that caused it. One call may not raise the process's peak memory
by more than ``MAX_GROWTH`` (a reader that allocates from an unchecked size shows here even when the
allocation succeeds) nor run for more than ``CASE_SECONDS``.

Readers (``grep -n "def read_\\|def open_\\|Reader" src/visrec/data``): RecordIOReader / open_face_dataset
(``train.rec``, ``train.idx``, ``property``), read_verification_bin, read_image_folder, read_csv_list,
read_jd_dir + read_jd_poses (``landmark/*.txt``, ``rect/*.rect``, ``pose/*.txt``, pictures),
read_landmark_txt, read_pts, read_wflw, read_pose_txt, read_video_list + read_frames + read_frame_scores
(frame folders and .avi files), tracking.iter_frames, read_ground_truth, read_submission,
read_product_labels, scan_catalogue / load_catalogue_images.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import re
import resource
import shutil
import signal
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from visrec.errors import VisrecError

# VISREC_FUZZ_SCALE=20 VISREC_FUZZ_SEED=7 pytest tests/test_reader_fuzz.py: a longer run with other mutations
SEED = int(os.environ.get("VISREC_FUZZ_SEED", 20240611))
SCALE = float(os.environ.get("VISREC_FUZZ_SCALE", 2))
CASE_SECONDS = 10
MAX_GROWTH = 256 << 20  # bytes of peak RSS one call may add

HUGE_TEXT = [b"99999999999999999999", b"-1", b"-7.5", b"1e309", b"-1e309", b"nan", b"inf", b"0", b"2.5",
             b"4294967296", b"18446744073709551616", b"1" * 5000, b"0x10", b"", b" ", b",", b"\t"]
BAD_UTF8 = [b"\xff", b"\x80", b"\xc3", b"\xe9", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\x00"]
U32 = [0xFFFFFFFF, 0x1FFFFFFF, 0x80000000, 0x7FFFFFFF, 0, 1, 2, 3, 0xCED7230A, 1 << 24, 0x3FFFFFFF]
F32 = [1e30, -1.0, float("nan"), float("inf"), 2.5, float(1 << 24), 3e9, -0.0, 1e-30]


# ------------------------------------------------------------------------------------------------ mutations

def _number_spans(data: bytes) -> list[tuple[int, int]]:
    return [m.span() for m in re.finditer(rb"-?\d+(\.\d+)?([eE][-+]?\d+)?", data)]


def mutate(data: bytes, rng: np.random.Generator, *, text: bool, fields: list[tuple[int, str]] = (),
           hot: list[int] = ()) -> tuple[str, bytes]:
    """One seeded mutation of ``data``: (what was done, the mutated bytes). ``fields``: (offset, 'u32'|'f32')
    of binary size/label fields; ``hot``: offsets worth hitting more often (e.g. pickle opcodes)."""
    n = len(data)

    def pos(allow_end: bool = False) -> int:
        if len(hot) and rng.random() < 0.5:
            return int(hot[rng.integers(len(hot))])
        return int(rng.integers(0, n + (1 if allow_end else 0))) if n else 0

    kinds = ["flip", "truncate", "insert", "delete", "duplicate", "non_utf8", "empty"]
    if text:
        kinds += ["number", "number", "dup_line", "drop_line", "swap_lines"]
    if len(fields):
        kinds += ["field", "field", "field"]
    kind = kinds[int(rng.integers(len(kinds)))]
    b = bytearray(data)
    if kind == "flip" and n:
        for _ in range(int(rng.integers(1, 5))):
            i = pos()
            b[i % n] ^= int(rng.integers(1, 256))
        return kind, bytes(b)
    if kind == "truncate":
        i = pos()
        return f"truncate at {i}", bytes(b[:i])
    if kind == "insert":
        i = pos(True)
        return f"insert at {i}", bytes(b[:i] + rng.bytes(int(rng.integers(1, 17))) + b[i:])
    if kind == "delete" and n:
        i = pos()
        j = min(n, i + int(rng.integers(1, 65)))
        return f"delete {i}:{j}", bytes(b[:i] + b[j:])
    if kind == "duplicate" and n:
        i = pos()
        j = min(n, i + int(rng.integers(1, 257)))
        return f"duplicate {i}:{j}", bytes(b[:j] + b[i:j] + b[j:])
    if kind == "non_utf8":
        i = pos(True)
        bad = BAD_UTF8[int(rng.integers(len(BAD_UTF8)))]
        return f"non-UTF-8 {bad!r} at {i}", bytes(b[:i] + bad + b[i:])
    if kind == "number":
        spans = _number_spans(data)
        if spans:
            s, e = spans[int(rng.integers(len(spans)))]
            new = HUGE_TEXT[int(rng.integers(len(HUGE_TEXT)))]
            return f"number {data[s:e][:20]!r} -> {new[:20]!r}", bytes(b[:s] + new + b[e:])
    if kind in ("dup_line", "drop_line", "swap_lines"):
        lines = data.split(b"\n")
        if len(lines) > 1:
            i, j = (int(v) for v in rng.integers(0, len(lines), 2))
            if kind == "dup_line":
                lines.insert(i, lines[i])
            elif kind == "drop_line":
                del lines[i]
            else:
                lines[i], lines[j] = lines[j], lines[i]
            return f"{kind} {i}", b"\n".join(lines)
    if kind == "field" and len(fields):
        off, fmt = fields[int(rng.integers(len(fields)))]
        if off + 4 <= n:
            if fmt == "u32":
                v = U32[int(rng.integers(len(U32)))]
                struct.pack_into("<I", b, off, v)
            else:
                v = F32[int(rng.integers(len(F32)))]
                struct.pack_into("<f", b, off, v)
            return f"field @{off} = {v!r}", bytes(b)
    if kind == "empty":
        return "empty file", b""
    i = pos()  # fallback for a mutation that did not apply: one flipped byte
    if n:
        b[i % n] ^= 0xFF
    return f"flip {i}", bytes(b)


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def fuzz(files: list[tuple[Path, int, dict]], call, *, seed: int) -> tuple[int, list[str]]:
    """Run ``count`` mutations of each file (the others left valid) through ``call()``; returns (cases run,
    failures). ``files``: (path, count, mutate options). ``call()`` must first succeed on the valid files
    (which also loads whatever the reader imports, so the memory check sees the reader, not an import)."""
    call()
    rng = np.random.default_rng(seed)
    failures, cases = [], 0
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for path, count, opts in files:
            original = path.read_bytes()
            try:
                for k in range(int(count * SCALE)):
                    what, data = mutate(original, rng, **opts)
                    path.write_bytes(data)
                    cases += 1
                    before = peak_rss()
                    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
                    try:
                        call()
                        OUTCOMES["read"] += 1
                    except VisrecError:
                        OUTCOMES["refused"] += 1
                    except _Timeout:
                        failures.append(f"{path.name} #{k} ({what}): no answer within {CASE_SECONDS} s")
                    except Exception as exc:  # noqa: BLE001 - what the test is looking for (MemoryError too)
                        failures.append(f"{path.name} #{k} ({what}): {type(exc).__name__}: {str(exc)[:200]}")
                    finally:
                        signal.setitimer(signal.ITIMER_REAL, 0)
                    grown = peak_rss() - before
                    if grown > MAX_GROWTH:
                        failures.append(f"{path.name} #{k} ({what}): peak memory grew by {grown >> 20} MiB")
            finally:
                path.write_bytes(original)
    finally:
        signal.signal(signal.SIGALRM, old)
    return cases, failures


OUTCOMES = {"read": 0, "refused": 0}


def check(name: str, cases: int, failures: list[str], started: float) -> None:
    print(f"{name}: {cases} mutations in {time.perf_counter() - started:.2f} s "
          f"({OUTCOMES['read']} read cleanly, {OUTCOMES['refused']} refused with a visrec error)")
    OUTCOMES.update(read=0, refused=0)
    assert not failures, f"{len(failures)} of {cases} mutations of {name} escaped as non-visrec errors:\n" + \
        "\n".join(failures[:25])


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def copy_of(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------------ readers

@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Valid files of every format, written once by the synthetic writers."""
    from visrec.data import synth
    from visrec.data.landmarks import WflwRecord, write_pts, write_wflw
    from visrec.data.synth import write_synthetic_jd
    from visrec.data.folders import write_csv_list
    from visrec.data.products import write_submission
    from visrec.data.video import write_video_dataset

    root = tmp_path_factory.mktemp("fuzz-src")
    out = {"root": root}
    out["rec"] = synth.write_face_dataset(root / "rec", 3, 2, format="recordio", seed=1)
    out["bin"] = synth.write_verification_pairs(root / "v.bin", 2, 2, seed=2)
    out["folder"] = synth.write_face_dataset(root / "folder" / "train", 2, 2, format="folder", seed=3)
    imgs = sorted(out["folder"].rglob("*.jpg"))
    out["csv"] = write_csv_list(out["folder"].parent / "list.csv", [(p.relative_to(out["folder"].parent), i % 2)
                                                                    for i, p in enumerate(imgs)])
    out["jd"] = write_synthetic_jd(root / "jd", 2, seed=4)
    pts = next(synth.iter_faces(1, 1, seed=5))[2]
    out["pts"] = write_pts(root / "face.pts", pts)
    rec = WflwRecord(np.asarray(pts[:98]), np.array([1, 2, 100, 110], np.float32), np.array([0, 1, 0, 0, 1, 0]),
                     "a/b.jpg")
    out["wflw"] = write_wflw(root / "wflw.txt", [rec, rec])
    out["video"] = write_video_dataset(root / "video", 1, 1, 4, seed=6)
    out["avi"] = write_video_dataset(root / "avi", 1, 1, 4, seed=7, video_format="avi")
    prod = root / "products"
    synth.write_product_dataset(prod, families=1, products_per_family=2, variants=1, queries_per_product=1,
                                size=96, seed=8)
    out["products"] = prod
    queries = sorted(p.stem for p in (prod / "query").glob("*.jpg"))
    cats = sorted(p.stem for p in (prod / "catalogue").glob("*.jpg"))
    ids = (cats * 7)[:7] if len(cats) >= 7 else [f"c{i}" for i in range(7)]
    write_submission(prod / "submission.csv", {q: list(dict.fromkeys(ids))[:7] or ids for q in queries})
    return out


def _rec_fields(rec_dir: Path) -> list[tuple[int, str]]:
    fields = []
    for line in (rec_dir / "train.idx").read_text().splitlines():
        off = int(line.split("\t")[1])
        fields += [(off + 4, "u32"), (off + 8, "u32"), (off + 12, "f32"), (off + 32, "f32"), (off + 36, "f32")]
    return fields


def test_fuzz_recordio(made, tmp_path):
    from visrec.data.datasets import open_face_dataset

    d = copy_of(made["rec"], tmp_path / "rec")

    def call():
        ds = open_face_dataset(d)
        assert len(ds.labels) == len(ds) and (len(ds) == 0 or ds.num_classes > int(ds.labels.max()))
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (3, 112, 112) and 0 <= y < ds.num_classes

    started = time.perf_counter()
    cases, failures = fuzz([(d / "train.rec", 500, dict(text=False, fields=_rec_fields(d))),
                            (d / "train.idx", 150, dict(text=True)),
                            (d / "property", 60, dict(text=True))], call, seed=SEED)
    check("RecordIO", cases, failures, started)


def _pickle_hot(data: bytes) -> list[int]:
    """Offsets of the pickle's opcodes and their arguments' first bytes (where a flip changes the program)."""
    hot = []
    for op, arg, p in pickletools.genops(data):
        hot += [p, p + 1, p + 2]
    return [h for h in hot if h < len(data)]


def test_fuzz_verification_bin(made, tmp_path):
    from visrec.data.verification import read_verification_bin

    src = made["bin"].read_bytes()
    bins, issame = pickle.loads(src)
    py2 = bytearray(b"\x80\x02(")  # as InsightFace's Python 2 files: BINSTRING opcodes, no globals
    for b in bins:
        py2 += b"T" + struct.pack("<i", len(b)) + b
    py2 += b"l(" + b"".join(b"\x88" if x else b"\x89" for x in issame) + b"l\x86."
    variants = {"v.bin": src, "py2.bin": bytes(py2),
                "np2.bin": pickle.dumps((bins, np.array(issame)), protocol=2),
                "np5.bin": pickle.dumps(([np.frombuffer(b, np.uint8) for b in bins], np.array(issame)), protocol=5),
                "scalars4.bin": pickle.dumps((bins, [np.bool_(x) for x in issame]), protocol=4)}
    files = []
    for name, data in variants.items():
        (tmp_path / name).write_bytes(data)
        files.append((tmp_path / name, 300 if name == "v.bin" else 150, dict(text=False, hot=_pickle_hot(data))))
    current = {}

    def call():
        images, flags = read_verification_bin(current["path"])
        assert len(images) == 2 * len(flags) and all(im.ndim == 3 for im in images)

    started = time.perf_counter()
    cases, failures = 0, []
    for k, (path, count, opts) in enumerate(files):
        current["path"] = path
        c, f = fuzz([(path, count, opts)], call, seed=SEED + k)
        cases, failures = cases + c, failures + f
    check("verification .bin", cases, failures, started)


def test_fuzz_image_folder_and_csv_list(made, tmp_path):
    from visrec.data.folders import read_csv_list, read_image_folder

    base = copy_of(made["folder"].parent, tmp_path / "folder")
    root, csv_path = base / "train", base / "list.csv"
    image = sorted(root.rglob("*.jpg"))[1]

    def call_folder():
        lst = read_image_folder(root, verify=False)
        for i in range(len(lst.paths)):
            lst.image(i)

    def call_csv():
        lst = read_csv_list(csv_path)
        assert lst.num_classes > int(lst.labels.max())
        for i in range(len(lst.paths)):
            lst.image(i)

    started = time.perf_counter()
    c1, f1 = fuzz([(image, 120, dict(text=False, hot=list(range(0, 700))))], call_folder, seed=SEED)
    c2, f2 = fuzz([(csv_path, 200, dict(text=True))], call_csv, seed=SEED + 1)
    check("image folder + CSV list", c1 + c2, f1 + f2, started)


def test_fuzz_jd_landmark_dir(made, tmp_path):
    from visrec.data.landmarks import read_jd_dir, read_jd_poses

    root = copy_of(made["jd"], tmp_path / "jd")
    name = sorted((root / "picture").glob("*.jpg"))[0].name

    def call():
        pics, pts, boxes = read_jd_dir(root)
        poses = read_jd_poses(root, pics)
        assert pts.shape[0] == boxes.shape[0] == len(pics) and np.isfinite(pts).all() and np.isfinite(boxes).all()
        assert poses is None or np.isfinite(poses).all()

    started = time.perf_counter()
    cases, failures = fuzz([(root / "landmark" / f"{name}.txt", 200, dict(text=True)),
                            (root / "rect" / f"{name}.rect", 100, dict(text=True)),
                            (root / "pose" / f"{name}.txt", 100, dict(text=True)),
                            (root / "picture" / name, 60, dict(text=False, hot=list(range(0, 700))))],
                           call, seed=SEED)
    check("JD-landmark", cases, failures, started)


def test_fuzz_pts_and_wflw(made, tmp_path):
    from visrec.data.landmarks import read_pts, read_wflw

    pts = tmp_path / "face.pts"
    shutil.copy(made["pts"], pts)
    wflw = tmp_path / "wflw.txt"
    shutil.copy(made["wflw"], wflw)

    def call_pts():
        p = read_pts(pts, image_size=(112, 112))
        assert p.ndim == 2 and p.shape[1] == 2 and np.isfinite(p).all()

    def call_wflw():
        for r in read_wflw(wflw):
            assert r.points.shape == (98, 2) and np.isfinite(r.box).all() and set(r.attributes.tolist()) <= {0, 1}

    started = time.perf_counter()
    c1, f1 = fuzz([(pts, 250, dict(text=True))], call_pts, seed=SEED)
    c2, f2 = fuzz([(wflw, 250, dict(text=True))], call_wflw, seed=SEED + 1)
    check("300W .pts + WFLW", c1 + c2, f1 + f2, started)


def test_fuzz_video_sets(made, tmp_path):
    from visrec.faces.tracking import iter_frames
    from visrec.data.video import read_frame_scores, read_frames, read_video_list

    folder = copy_of(made["video"].parent, tmp_path / "video")
    avi = copy_of(made["avi"].parent, tmp_path / "avi")

    def call(root):
        def read():
            for item in read_video_list(root / "videos.csv"):
                frames = read_frames(item.path, item.video_id)
                assert all(f.shape == (112, 112, 3) for f in frames)
                scores = read_frame_scores(item.path, len(frames))
                assert scores is None or np.isfinite(scores).all()
        return read

    vid = read_video_list(folder / "videos.csv")[0].path
    avi_file = read_video_list(avi / "videos.csv")[0].path

    def call_avi():
        call(avi)()
        for _ in iter_frames(avi_file):
            pass

    started = time.perf_counter()
    c1, f1 = fuzz([(folder / "videos.csv", 150, dict(text=True)),
                   (vid / "scores.txt", 100, dict(text=True)),
                   (sorted(vid.glob("*.png"))[0], 60, dict(text=False, hot=list(range(0, 64))))],
                  call(folder), seed=SEED)
    c2, f2 = fuzz([(avi_file, 60, dict(text=False, hot=list(range(0, 512))))], call_avi, seed=SEED + 1)
    check("video sets", c1 + c2, f1 + f2, started)


def test_fuzz_perfect500k_files(made, tmp_path):
    from visrec.data import products as P

    root = copy_of(made["products"], tmp_path / "products")
    image = sorted((root / "catalogue").glob("*.jpg"))[0]

    def call_catalogue():
        ok, _ = P.scan_catalogue(root / "catalogue", strict=True)
        for _, img in P.load_catalogue_images(ok, strict=True):
            assert img.ndim == 3

    started = time.perf_counter()
    c1, f1 = fuzz([(root / "val.csv", 150, dict(text=True))], lambda: P.read_ground_truth(root / "val.csv"), seed=SEED)
    c2, f2 = fuzz([(root / "submission.csv", 150, dict(text=True))],
                  lambda: P.read_submission(root / "submission.csv"), seed=SEED + 1)
    c3, f3 = fuzz([(root / "catalogue_products.csv", 100, dict(text=True))],
                  lambda: P.read_product_labels(root / "catalogue_products.csv"), seed=SEED + 2)
    c4, f4 = fuzz([(image, 60, dict(text=False, hot=list(range(0, 700))))], call_catalogue, seed=SEED + 3)
    check("Perfect-500K", c1 + c2 + c3 + c4, f1 + f2 + f3 + f4, started)
