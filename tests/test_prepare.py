"""visrec.faces.prepare and visrec.data.prepare on synthetic photos with known geometry: faces from visrec.data.synth pasted onto larger
canvases at known places and scales, found by a fake detector that returns the true boxes and 5 points (so
nothing depends on a real detector's quality). Checks alignment at pixel level, the report's headings, the
policies, resume (detector calls on a re-run), RecordIO/CSV, refusals, parallel workers, products, landmarks."""

import json

import cv2
import numpy as np
import pytest

from visrec.faces.align import ARCFACE_112, five_points, similarity_transform
from visrec.faces.detectors import Detection
from visrec.data.images import not_an_image_reason, read_image
from visrec.data.prepare import JOURNAL, REPORT, prepare_products
from visrec.faces.prepare import choose_face, prepare_faces, prepare_landmarks
from visrec.data.synth import render_face
from visrec.errors import DataError, VisrecError

# identities whose rendered eyes the similarity fit puts within 2 px of the ArcFace template eyes
ALICE, BOB, CAROL = 6, 7, 5


def face(identity: int, scale: float = 1.0):
    """A clean synthetic face resized by ``scale``: (RGB tile, (106, 2) JD points in tile pixels)."""
    img, pts = render_face(identity, np.random.default_rng([identity, 5]), difficulty=0.0)
    size = round(112 * scale)
    tile = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
    return tile, ((pts + 0.5) * (size / 112) - 0.5).astype(np.float32)  # pixel centres scale about -0.5


def scene(width: int, height: int, faces=()):
    """A canvas (its size identifies it to FakeDetector) with faces ``(identity, scale, x, y)`` pasted at
    (x, y): (image, [(box, 106 points) per face])."""
    canvas = np.full((height, width, 3), 100, np.uint8)
    canvas[:, :, 1] = np.linspace(60, 160, width, dtype=np.uint8)[None, :]
    truth = []
    for ident, scale, x, y in faces:
        tile, pts = face(ident, scale)
        s = tile.shape[0]
        canvas[y:y + s, x:x + s] = tile
        truth.append((np.array([x, y, x + s, y + s], np.float32), pts + (x, y)))
    return canvas, truth


# name -> (canvas width, height, faces); every size is distinct
SCENES = {
    "alice/a1.png": (320, 240, [(ALICE, 1.0, 100, 50)]),
    "alice/a2.png": (330, 250, [(ALICE, 1.5, 20, 60)]),
    "bob/b1.png": (340, 260, [(BOB, 1.2, 150, 40)]),
    # bob is the larger face, carol the central one
    "bob/two.png": (400, 300, [(BOB, 1.5, 5, 20), (CAROL, 0.8, 155, 105)]),
    "bob/empty.png": (310, 230, []),
}
TRUTH = {}  # (height, width) -> [(box, points)]


class FakeDetector:
    """Looks an image up by its size and returns the true faces (box, 5 points), best score first.
    ``points=False`` drops the points (a Haar-like detector); ``fail_after`` raises after that many calls."""

    def __init__(self, points: bool = True, fail_after: int | None = None):
        self.points, self.fail_after, self.calls = points, fail_after, 0
        self.truth = dict(TRUTH)  # carried along when pickled to a worker process

    def __call__(self, image):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated crash")
        found = self.truth[image.shape[:2]]
        dets = [Detection(box.copy(), 0.9 - 0.1 * k, five_points(pts, "jd106") if self.points else None)
                for k, (box, pts) in enumerate(found)]
        return dets


class TrueLandmarker:
    """The 106 true points of the face whose box is ``box`` (a picklable landmarker)."""

    def __init__(self):
        self.truth = dict(TRUTH)

    def __call__(self, image, box):
        for b, pts in self.truth[image.shape[:2]]:
            if np.allclose(b, box):
                return pts
        raise AssertionError("no such face")


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for name, (w, h, faces) in SCENES.items():
        img, truth = scene(w, h, faces)
        TRUTH[(h, w)] = truth
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / name), img[:, :, ::-1])  # PNG: lossless, the detector sees these exact pixels
    (root / "bob" / "broken.jpg").write_bytes(b"\xff\xd8 this is no JPEG")
    (root / "bob" / "zero.jpg").write_bytes(b"")
    (root / "bob" / "notes.txt").write_text("not a photo\n")
    return root


def expected_crop(name: str, which: int = 0):
    """The aligned crop of face ``which`` of a scene and where its pupils (the eye centres) must land."""
    w, h, _ = SCENES[name]
    img, truth = scene(w, h, SCENES[name][2])
    pts = truth[which][1]
    m = similarity_transform(five_points(pts, "jd106"), ARCFACE_112)
    crop = cv2.warpAffine(img, m, (112, 112), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    return crop, pts[[104, 105]] @ m[:2, :2].T + m[:, 2]


def pupils(crop):
    """Centroids of the dark pupils near the template's eyes (darkness below 60 grey levels as weight)."""
    gray = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY).astype(np.float64)
    out = []
    for ex, ey in ARCFACE_112[:2]:
        x0, y0 = int(round(ex)) - 5, int(round(ey)) - 4
        ys, xs = np.mgrid[y0:y0 + 9, x0:x0 + 11]
        w = np.clip(60 - gray[y0:y0 + 9, x0:x0 + 11], 0, None)
        out.append(((xs * w).sum() / w.sum(), (ys * w).sum() / w.sum()))
    return np.array(out)


def check_crop(path, name, which=0):
    got = read_image(path)
    want, eyes = expected_crop(name, which)
    assert got.shape == (112, 112, 3)
    assert np.abs(got.astype(float) - want).mean() < 3  # the right face, aligned the same way (JPEG aside)
    found = pupils(got)
    assert np.abs(found - eyes).max() < 1.0           # the rendered pupils sit where the points say
    assert np.abs(found - ARCFACE_112[:2]).max() < 2.5  # ... i.e. on the ArcFace template eyes


def test_hidden_entries_loose_files_and_other_image_formats_are_listed_not_passed_over(src, tmp_path):
    """A hidden identity folder (``.carol/``) and a README beside the identities were left out without a row in
    the report; a ``.gif`` photo was "not an image file" with no word of the formats that are read."""
    import shutil

    photos = tmp_path / "photos"
    shutil.copytree(src, photos)
    (photos / ".carol").mkdir()
    shutil.copy(photos / "alice" / "a1.png", photos / ".carol" / "c1.png")
    shutil.copy(photos / "alice" / "a1.png", photos / "alice" / ".a1-copy.png")
    (photos / "README.md").write_text("who is who\n")
    (photos / "alice" / "wave.gif").write_bytes(b"GIF89a")
    report = prepare_faces(photos, tmp_path / "out", detector=FakeDetector())
    reasons = {row["path"]: row["reason"] for row in report.skipped}
    assert reasons[".carol"] == reasons["alice/.a1-copy.png"] == "hidden (its name starts with '.'): not read"
    assert reasons["README.md"] == "a file directly in the image folder that is not an image: not read"
    assert reasons["alice/wave.gif"].startswith("not an image file visrec reads (suffix .gif; it reads .bmp, ")
    assert report.written == 4  # the rest as before


def test_choose_face_policies():
    small = Detection(np.array([140, 90, 160, 110], np.float32), 0.9)   # central
    large = Detection(np.array([0, 0, 100, 100], np.float32), 0.8)
    for dets, policy, want, action in [([large, small], "largest", large, "kept largest"),
                                       ([small, large], "central", small, "kept central"),
                                       ([large, small], "skip", None, "skipped"),
                                       ([small], "skip", small, "only"), ([], "largest", None, "none")]:
        got, what = choose_face(dets, policy, (200, 300))
        assert got is want and what == action
    with pytest.raises(VisrecError, match="policy"):
        choose_face([small], "first", (200, 300))


def test_faces_folder_report_and_alignment(src, tmp_path):
    out = tmp_path / "faces"
    det, ticks = FakeDetector(), []
    report = prepare_faces(src, out, detector=det, progress=lambda done, total: ticks.append((done, total)))
    assert ticks[-1] == (7, 7) and len(ticks) == 7  # 7 photo files; notes.txt is no photo
    assert det.calls == 5                           # unreadable files never reach the detector
    assert report.written == 4 and report.total == 7 and report.resumed == 0
    assert report.no_face == ["bob/empty.png"]
    assert report.multiple_faces == [{"path": "bob/two.png", "faces": 2, "action": "kept largest"}]
    bad = {u["path"]: u["error"] for u in report.unreadable}
    assert set(bad) == {"bob/broken.jpg", "bob/zero.jpg"}
    assert "not a decodable image (0 bytes)" in bad["bob/zero.jpg"]
    assert "not a decodable image" in bad["bob/broken.jpg"]
    assert report.skipped == [{"path": "bob/notes.txt", "reason": "not an image file visrec reads (suffix .txt; it "
                                                           "reads .bmp, .jpeg, .jpg, .png, .tif, .tiff, .webp, any case)"}]
    assert json.loads((out / REPORT).read_text()) == report.to_dict()

    for name in ("alice/a1.png", "alice/a2.png", "bob/b1.png", "bob/two.png"):
        check_crop(out / name.replace(".png", ".jpg"), name)
    from visrec.data.datasets import open_face_dataset  # here: worker processes need not import torch

    ds = open_face_dataset(out)  # visrec's own reader: identity folders, journal/report files ignored
    assert ds.source.class_names == ["alice", "bob"] and len(ds) == 4
    assert ds.labels.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("policy, action, written", [("central", "kept central", 4), ("skip", "skipped", 3)])
def test_faces_policies(src, tmp_path, policy, action, written):
    report = prepare_faces(src, tmp_path / policy, detector=FakeDetector(), policy=policy)
    assert report.multiple_faces == [{"path": "bob/two.png", "faces": 2, "action": action}]
    assert report.written == written
    two = tmp_path / policy / "bob" / "two.jpg"
    if policy == "central":
        check_crop(two, "bob/two.png", which=1)  # carol, the smaller but central face
    else:
        assert not two.exists()


def test_faces_eyes_alignment_puts_the_pupils_on_the_template(src, tmp_path):
    """align="eyes": the rendered pupils (the JD-106 eye points) land on the template's eyes within a
    pixel in the written crops (JPEG and rendering aside), closer than the least-squares crops put them;
    the option is part of the journal's settings, so a resume cannot mix the two."""
    out = tmp_path / "eyes"
    report = prepare_faces(src, out, detector=FakeDetector(), align="eyes")
    assert report.written == 4
    err_eyes = [np.abs(pupils(read_image(f)) - ARCFACE_112[:2]).max() for f in sorted(out.rglob("*.jpg"))]
    ls = tmp_path / "lstsq"
    prepare_faces(src, ls, detector=FakeDetector())
    err_ls = [np.abs(pupils(read_image(f)) - ARCFACE_112[:2]).max() for f in sorted(ls.rglob("*.jpg"))]
    print(f"\npupil error eyes {np.round(err_eyes, 2)} lstsq {np.round(err_ls, 2)}")
    assert max(err_eyes) < 1.0 and np.mean(err_eyes) < np.mean(err_ls)
    with pytest.raises(VisrecError, match="other settings"):
        prepare_faces(src, out, detector=FakeDetector())
    with pytest.raises(VisrecError, match="align must be one of"):
        prepare_faces(src, tmp_path / "x", detector=FakeDetector(), align="eye")


def test_faces_resume_after_a_crash(src, tmp_path):
    clean = tmp_path / "clean"
    prepare_faces(src, clean, detector=FakeDetector())
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_faces(src, out, detector=FakeDetector(fail_after=2))
    done = [json.loads(line) for line in (out / JOURNAL).read_text().splitlines()[1:]]
    assert sum(r["status"] != "unreadable" for r in done) == 2  # what the detector finished is kept
    with open(out / JOURNAL, "a") as fh:
        fh.write('{"key": "bob/b1.p')  # a line torn by the crash: ignored, that input is redone

    det = FakeDetector()
    report = prepare_faces(src, out, detector=det)
    assert det.calls == 5 - 2                   # only the photos not done before
    assert report.resumed == len(done) and report.total == 7
    again = FakeDetector()
    final = prepare_faces(src, out, detector=again)
    assert again.calls == 0 and final.resumed == 7
    want = json.loads((clean / REPORT).read_text())
    got = json.loads((out / REPORT).read_text())
    for key in ("written", "no_face", "multiple_faces", "skipped", "box_crops"):
        assert got[key] == want[key]
    assert sorted(u["path"] for u in got["unreadable"]) == sorted(u["path"] for u in want["unreadable"])
    for f in clean.rglob("*.jpg"):
        assert (out / f.relative_to(clean)).read_bytes() == f.read_bytes()
    with pytest.raises(VisrecError, match="other settings"):
        prepare_faces(src, out, detector=FakeDetector(), policy="skip")


def test_faces_csv_to_recordio(src, tmp_path):
    rows = ["path,label", "alice/a1.png,ann", f"{src / 'bob/b1.png'},ben", "bob/two.png,ben",
            "bob/zero.jpg,ben", "missing.png,ann"]
    (src / "list.csv").write_text("\n".join(rows) + "\n")
    try:
        out = tmp_path / "rec"
        report = prepare_faces(src / "list.csv", out, detector=FakeDetector(), format="recordio")
    finally:
        (src / "list.csv").unlink()
    assert report.written == 3 and report.output == str(out / "train.rec")
    assert {u["path"] for u in report.unreadable} == {"bob/zero.jpg", "missing.png"}
    assert "No such file" in next(u["error"] for u in report.unreadable if u["path"] == "missing.png")
    from visrec.data.datasets import open_face_dataset

    ds = open_face_dataset(out)
    assert type(ds.source).__name__ == "RecordIOReader" and len(ds) == 3 and ds.num_classes == 2
    assert (out / "identities.txt").read_text() == "ann\nben\n"
    assert ds.labels.tolist() == [0, 1, 1]
    staged = sorted((out / "crops").rglob("*.jpg"))
    for i, f in enumerate(staged):  # the RecordIO holds the staged JPEGs unchanged
        assert ds.source.image_bytes(i) == f.read_bytes()
    assert np.abs(ds.source.image(0).astype(float) - expected_crop("alice/a1.png")[0]).mean() < 3


def test_faces_without_points(src, tmp_path, monkeypatch):
    import visrec.faces.prepare as prepare

    with monkeypatch.context() as m:  # without visrec[dlib] a detector without points is refused up front
        m.setattr(prepare, "_dlib_landmarks_available", lambda: False)
        with pytest.raises(VisrecError, match="5 points.*HaarDetector.*visrec.dlib"):
            prepare_faces(src, tmp_path / "haar", detector="haar")
    for workers in (1, 2):  # unknown detector: refused at its first face (also from a worker process)
        with pytest.raises(VisrecError, match="5 points"):
            prepare_faces(src, tmp_path / f"nopts{workers}", detector=FakeDetector(points=False), workers=workers)
    # a run that stopped before writing anything binds no settings: the same folder takes other ones
    with pytest.raises(VisrecError, match="5 points"):
        prepare_faces(src, tmp_path / "retry", detector=FakeDetector(points=False))
    report = prepare_faces(src, tmp_path / "retry", detector=FakeDetector(points=False), box_margin=0.1)
    assert report.written == 4
    # a landmarker's 106 points are reduced to 5 (JD scheme, from the count) and give the same crops
    report = prepare_faces(src, tmp_path / "lm", detector=FakeDetector(points=False), landmarker=TrueLandmarker())
    assert report.written == 4 and report.box_crops == []
    check_crop(tmp_path / "lm" / "alice" / "a2.jpg", "alice/a2.png")
    # or, asked for, unaligned box crops, listed as such
    report = prepare_faces(src, tmp_path / "box", detector=FakeDetector(points=False), box_margin=0.1)
    assert sorted(report.box_crops) == ["alice/a1.png", "alice/a2.png", "bob/b1.png", "bob/two.png"]
    crop = read_image(tmp_path / "box" / "alice" / "a1.jpg")
    tile, _ = face(ALICE)  # box = the 112 px tile, side 1.2 x 112 -> the tile fills the middle 1/1.2
    inner = cv2.resize(crop[9:103, 9:103], (112, 112), interpolation=cv2.INTER_LINEAR)
    assert np.abs(inner.astype(float) - tile).mean() < 12


def test_faces_parallel_workers_match_serial(src, tmp_path, monkeypatch):
    monkeypatch.setattr("visrec.data.prepare.usable_cores", lambda: 2)  # two workers on a one-core machine too
    serial = tmp_path / "serial"
    prepare_faces(src, serial, detector=FakeDetector(), landmarker=TrueLandmarker())
    # picklable detector and landmarker: worker processes (spawned); a lambda: a thread pool
    truth = TrueLandmarker()
    for name, lm in (("procs", truth), ("threads", lambda im, box: truth(im, box))):
        det = FakeDetector(points=False)
        report = prepare_faces(src, tmp_path / name, detector=det, landmarker=lm, workers=2)
        assert report.written == 4 and len(report.unreadable) == 2
        assert det.calls == (0 if name == "procs" else 5)  # processes call their own copies
        for f in serial.rglob("*.jpg"):
            assert (tmp_path / name / f.relative_to(serial)).read_bytes() == f.read_bytes()


# ------------------------------------------------------------------------------------------------ products

def test_products_padding_report_and_resume(tmp_path, monkeypatch):
    from visrec.data import products as P

    src = tmp_path / "shop"
    (src / "p1").mkdir(parents=True)
    wide = np.zeros((100, 200, 3), np.uint8)
    wide[:] = (200, 30, 30)
    tall = np.zeros((160, 80, 3), np.uint8)
    tall[:] = (30, 30, 200)
    cv2.imwrite(str(src / "wide.png"), wide[:, :, ::-1])
    cv2.imwrite(str(src / "p1" / "front.png"), tall[:, :, ::-1])
    cv2.imwrite(str(src / "p1" / "back.png"), wide[:, :, ::-1])
    (src / "broken.jpg").write_bytes(b"garbage")
    (src / "readme.md").write_text("hi")
    out = tmp_path / "cat"
    report = prepare_products(src, out, size=128)
    assert report.written == 3 and report.total == 4
    assert [u["path"] for u in report.unreadable] == ["broken.jpg"]
    assert report.skipped == [{"path": "readme.md", "reason": not_an_image_reason("readme.md")}]
    items = dict(P.list_images(out / "catalogue"))  # the Perfect-500K reader
    assert sorted(items) == ["p1_back", "p1_front", "wide"]
    sq = read_image(items["wide"])
    assert sq.shape == (128, 128, 3)
    # 200x100 -> 200x200 with 50 white rows above and below -> 128: rows 0-30 white, the middle red
    assert (sq[:28] > 240).all() and (sq[100:] > 240).all()
    assert np.abs(sq[40:88].astype(int) - (200, 30, 30)).max() < 12
    front = read_image(items["p1_front"])
    assert (front[:, :28] > 240).all() and np.abs(front[:, 40:88].astype(int) - (30, 30, 200)).max() < 12
    assert P.read_product_labels(out / P.PRODUCT_LABELS) == {"p1_back": "p1", "p1_front": "p1", "wide": "wide"}

    def boom(*_):
        raise AssertionError("a finished photo was read again")

    from visrec.data import prepare as data_prepare

    monkeypatch.setattr(data_prepare, "read_image_checked", boom)  # where prepare_products looks it up
    again = prepare_products(src, out, size=128)
    assert again.resumed == 4 and again.written == 3


def test_a_rerun_never_replaces_a_file_someone_put_at_a_new_inputs_name(tmp_path):
    """A file put into --out after a run was replaced, unannounced, when a new input mapped to its name; the
    output of a killed run's last input (written, not yet journaled) is still simply written again."""
    src, out = tmp_path / "shop", tmp_path / "cat"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), np.full((40, 60, 3), 90, np.uint8))
    prepare_products(src, out, size=32)
    cv2.imwrite(str(src / "b.png"), np.full((50, 30, 3), 30, np.uint8))
    (out / "catalogue" / "b.jpg").write_bytes(b"the user's own file")
    with pytest.raises(DataError, match="an earlier prepare did not write") as err:
        prepare_products(src, out, size=32)
    assert "b.jpg" in str(err.value) and (out / "catalogue" / "b.jpg").read_bytes() == b"the user's own file"
    (out / "catalogue" / "b.jpg").unlink()
    assert prepare_products(src, out, size=32).written == 2
    # a kill after b.jpg was written and before its journal line: the rerun writes the same bytes again
    journal = out / JOURNAL
    lines = journal.read_text().splitlines(keepends=True)
    assert '"b.png"' in lines[-1]
    journal.write_text("".join(lines[:-1]))
    before = (out / "catalogue" / "b.jpg").read_bytes()
    again = prepare_products(src, out, size=32)
    assert again.resumed == 1 and again.written == 2 and (out / "catalogue" / "b.jpg").read_bytes() == before


def test_a_photo_of_an_extreme_aspect_ratio_is_listed_not_padded_into_terabytes(tmp_path):
    """A 2.7 KB PNG of 1 x 900,000 pixels passes the per-image pixel limits; padded to a square it asked numpy for
    2.2 TiB and ended the run in a MemoryError traceback."""
    from PIL import Image

    src = tmp_path / "shop"
    src.mkdir()
    Image.fromarray(np.zeros((1, 900_000, 3), np.uint8)).save(src / "strip.png")
    cv2.imwrite(str(src / "ok.png"), np.full((40, 60, 3), 90, np.uint8))
    report = prepare_products(src, tmp_path / "cat", size=32)
    assert report.written == 1
    assert [u["path"] for u in report.unreadable] == ["strip.png"]
    assert "pads to a 900000x900000 square" in str(report.unreadable[0])


# ------------------------------------------------------------------------------------------------ landmarks

def test_a_degenerate_or_far_away_annotation_is_listed_and_the_run_goes_on(tmp_path):
    """A sidecar of 0 points ended the run in a ValueError traceback, one of 1 point (or a 1-point box) in an
    error naming no file, on every rerun; points a million pixels off the photo gave an all-black crop listed
    as ok. Each is a bad annotation naming its file, and the good photo is written."""
    from visrec.data.landmarks import write_landmark_txt

    photos = tmp_path / "annotated"
    photos.mkdir()
    img = np.full((112, 112, 3), 120, np.uint8)
    for name in ("good", "zero", "one", "far"):
        cv2.imwrite(str(photos / f"{name}.png"), img)
    rng = np.random.default_rng(0)
    write_landmark_txt(photos / "good.txt", rng.uniform(30, 80, (106, 2)))
    (photos / "zero.txt").write_text("0\n")
    (photos / "one.txt").write_text("1\n5 5\n")
    write_landmark_txt(photos / "far.txt", rng.uniform(30, 80, (106, 2)) * 1e6)
    report = prepare_landmarks(photos, tmp_path / "jd", size=64)
    assert report.written == 1
    bad = {b["path"]: b["error"] for b in report.bad_annotation}
    assert set(bad) == {"zero.png", "one.png", "far.png"}, bad
    assert "0 point(s)" in bad["zero.png"] and "1 point(s)" in bad["one.png"] and "not on the 112x112 image" in bad["far.png"]


def test_landmarks_to_jd_layout(src, tmp_path):
    from visrec.data.landmarks import read_jd_dir, write_landmark_txt, write_pts, write_wflw, WflwRecord

    photos = tmp_path / "annotated"
    photos.mkdir()
    truth = {}
    for k, name in enumerate(["alice/a1.png", "bob/b1.png", "bob/two.png"]):
        w, h, faces = SCENES[name]
        img, t = scene(w, h, faces)
        stem = f"f{k}"
        cv2.imwrite(str(photos / f"{stem}.png"), img[:, :, ::-1])
        truth[stem] = t
    write_landmark_txt(photos / "f0.png.txt", truth["f0"][0][1])   # JD text, <name>.txt
    write_landmark_txt(photos / "f1.txt", truth["f1"][0][1])       # JD text, <stem>.txt
    write_landmark_txt(photos / "f2.txt", truth["f2"][1][1])       # carol, the smaller face of two
    cv2.imwrite(str(photos / "f3.png"), np.zeros((50, 60, 3), np.uint8))
    write_pts(photos / "f3.pts", np.random.default_rng(0).uniform(10, 40, (68, 2)))  # 300W, but not 106
    (photos / "f4.png").write_bytes(b"")
    (photos / "f5.png").write_bytes((photos / "f3.png").read_bytes())  # no annotation at all

    out = tmp_path / "jd"
    report = prepare_landmarks(photos, out, points=106, size=128, margin=0.3)
    assert report.written == 3
    assert [u["path"] for u in report.unreadable] == ["f4.png"]
    bad = {b["path"]: b["error"] for b in report.bad_annotation}
    assert set(bad) == {"f3.png", "f5.png"} and "68 points, expected 106" in bad["f3.png"]
    pics, pts, boxes = read_jd_dir(out, 106)  # visrec's JD reader
    assert [p.name for p in pics] == ["f0.jpg", "f1.jpg", "f2.jpg"]
    for p, got, box in zip(pics, pts, boxes):
        true = truth[p.stem][0 if p.stem != "f2" else 1][1]
        lo, hi = true.min(0), true.max(0)  # no detector: the box is the points' extent
        side = (hi - lo).max() * 1.6
        want = (true - (lo + hi) / 2) * (128 / side) + 64
        assert np.abs(got - want).max() < 0.01
        assert np.abs(box - np.concatenate([(lo - (lo + hi) / 2) * (128 / side) + 64,
                                            (hi - (lo + hi) / 2) * (128 / side) + 64])).max() < 0.1
        crop = read_image(p)  # a pupil is dark where its point landed
        x, y = np.round(got[104]).astype(int)
        assert crop[y - 1:y + 2, x - 1:x + 2].min() < 60

    # a detector supplies the box: the detection holding the points (carol's, not bob's, in f2)
    out2 = tmp_path / "jd_det"
    report = prepare_landmarks(photos, out2, points=106, detector=FakeDetector(), size=128)
    assert report.written == 3 and report.no_face == []
    _, pts2, boxes2 = read_jd_dir(out2, 106)
    for box in boxes2:  # every tile box is square and fills 1 / 1.6 of the crop
        assert np.allclose(box, [24, 24, 104, 104], atol=0.1)

    def in_tile_crop(stem, which=0):  # crop pixels of the true points when the crop is the tile's
        tile_box, true = truth[stem][which]
        centre, side = (tile_box[:2] + tile_box[2:]) / 2, (tile_box[2] - tile_box[0]) * 1.6
        return (true - centre) * (128 / side) + 64

    assert np.abs(pts2[0] - in_tile_crop("f0")).max() < 0.01
    assert np.abs(pts2[2] - in_tile_crop("f2", 1)).max() < 0.01

    # WFLW list: 98 points and the box come from one file
    wflw = tmp_path / "wflw"
    wflw.mkdir()
    (wflw / "x.png").write_bytes((photos / "f0.png").read_bytes())
    box = truth["f0"][0][0]
    write_wflw(wflw / "list.txt", [WflwRecord(truth["f0"][0][1][:98], box, np.zeros(6, int), "x.png")])
    report = prepare_landmarks(wflw, tmp_path / "jd_wflw", annotations=wflw / "list.txt", points=98, size=128)
    assert report.written == 1 and not report.bad_annotation
    _, pts3, boxes3 = read_jd_dir(tmp_path / "jd_wflw", 98)
    assert np.allclose(boxes3[0], [24, 24, 104, 104], atol=0.1)
    assert np.abs(pts3[0] - in_tile_crop("f0")[:98]).max() < 0.01

    # WFLW lists one line per face: an image on two lines gives a crop of each face (the last line used to
    # replace the first without a word), and a second run resumes both; a line whose image is not there is
    # reported (it was ignored)
    (wflw / "two.png").write_bytes((photos / "f2.png").read_bytes())
    write_wflw(wflw / "list.txt", [WflwRecord(truth["f0"][0][1][:98], truth["f0"][0][0], np.zeros(6, int), "x.png")]
               + [WflwRecord(truth["f2"][i][1][:98], truth["f2"][i][0], np.zeros(6, int), "two.png") for i in (0, 1)]
               + [WflwRecord(truth["f0"][0][1][:98], truth["f0"][0][0], np.zeros(6, int), "elsewhere/y.png")])
    for _ in range(2):
        report = prepare_landmarks(wflw, tmp_path / "jd_faces", annotations=wflw / "list.txt", points=98, size=128)
        assert report.total == 3 and not report.bad_annotation
        assert [r["path"] for r in report.skipped] == ["elsewhere/y.png"]  # a line whose image is not there
        assert "listed in list.txt (1 face), not found under" in report.skipped[0]["reason"]
    pics4, pts4, _ = read_jd_dir(tmp_path / "jd_faces", 98)
    assert [p.name for p in pics4] == ["two__face1.jpg", "two__face2.jpg", "x.jpg"]
    assert np.abs(pts4[0] - in_tile_crop("f2", 0)[:98]).max() < 0.01
    assert np.abs(pts4[1] - in_tile_crop("f2", 1)[:98]).max() < 0.01

    # two photos falling back to one sidecar (f1.png and f1.jpg both take f1.txt): each is a bad annotation naming
    # both (whose points are they?), and the other photos are prepared as before
    before = prepare_landmarks(photos, tmp_path / "jd_once", points=106, size=128)
    cv2.imwrite(str(photos / "f1.jpg"), cv2.imread(str(photos / "f1.png")))
    report = prepare_landmarks(photos, tmp_path / "jd_twice", points=106, size=128)
    shared = {r["path"]: r["error"] for r in report.bad_annotation if r["path"].startswith("f1.")}
    assert sorted(shared) == ["f1.jpg", "f1.png"]
    assert all("photos f1.jpg and f1.png all take f1.txt" in e for e in shared.values())
    assert report.written == before.written - 1 and len(report.bad_annotation) == len(before.bad_annotation) + 2
    # given its own file, a second run retrying the problems takes both
    (photos / "f1.jpg.txt").write_text((photos / "f1.txt").read_text())
    report = prepare_landmarks(photos, tmp_path / "jd_twice", points=106, size=128, retry_problems=True)
    assert report.written == before.written + 1 and len(report.bad_annotation) == len(before.bad_annotation)


@pytest.mark.real_faces
def test_real_photos_align_with_a_detector_that_gives_no_points(tmp_path):
    """dlib's HOG detector and OpenCV's Haar cascade give boxes only: with visrec[dlib] the photos are aligned
    on dlib's 68 points (reduced to the ArcFace five), not refused, and not cut as unaligned box crops."""
    import shutil

    from visrec.data.fixtures import require_real_fixtures
    from visrec.faces.prepare import _dlib_landmarks_available

    try:
        faces = require_real_fixtures() / "faces"
    except VisrecError as exc:
        pytest.skip(str(exc))
    if not _dlib_landmarks_available():
        pytest.skip("visrec[dlib] (dlib-bin, face-recognition-models) is not installed")
    photos = tmp_path / "photos" / "obama"
    photos.mkdir(parents=True)
    for name in ("obama.jpg", "obama2.jpg", "obama3.jpg"):
        shutil.copy(faces / name, photos / name)
    for detector in ("dlib-hog", "haar"):
        report = prepare_faces(tmp_path / "photos", tmp_path / detector, detector=detector)
        assert report.written == 3 and report.box_crops == [], (detector, report)
        crop = read_image(tmp_path / detector / "obama" / "obama.jpg")
        assert crop.shape == (112, 112, 3)


# ------------------------------------------------------------------------------------------------ outputs

def _shop(tmp_path):
    src = tmp_path / "shop"
    (src / "p1" / "deeper").mkdir(parents=True)
    img = np.full((40, 60, 3), 90, np.uint8)
    cv2.imwrite(str(src / "loose.png"), img)
    cv2.imwrite(str(src / "p1" / "front.png"), img)
    cv2.imwrite(str(src / "p1" / "deeper" / "side.png"), img)
    return src


def test_prepare_refuses_a_non_empty_out_without_a_journal(tmp_path):
    src = _shop(tmp_path)
    out = tmp_path / "users-set"
    (out / "catalogue").mkdir(parents=True)
    (out / "catalogue" / "loose.jpg").write_bytes(b"the user's own picture")
    with pytest.raises(DataError, match=r"users-set: the output folder is not empty \(it holds catalogue\)"):
        prepare_products(src, out, size=32)
    assert (out / "catalogue" / "loose.jpg").read_bytes() == b"the user's own picture"
    assert not (out / JOURNAL).exists()
    fresh = tmp_path / "fresh"
    assert prepare_products(src, fresh, size=32).written == 2
    assert prepare_products(src, fresh, size=32).resumed == 2  # its own journal: resumes as before


def test_products_nested_deeper_than_one_folder_are_listed_as_skipped(tmp_path):
    report = prepare_products(_shop(tmp_path), tmp_path / "out", size=32)
    assert report.total == 2
    assert report.skipped == [{"path": "p1/deeper/side.png",
                               "reason": "nested deeper than one product folder (src/<product>/<photo>)"}]


@pytest.mark.parametrize("call", ["faces box_margin", "landmarks margin", "landmarks size", "products size"])
def test_sizes_and_margins_are_checked_before_any_work(call, tmp_path):
    """--size 1000000 asked cv2 for 3 TB, a --box-margin of -0.5 divided by zero, and NaN wrote grey crops."""
    from visrec.errors import ConfigError

    kind, option = call.split()
    fn = {"faces": prepare_faces, "landmarks": prepare_landmarks, "products": prepare_products}[kind]
    for value in ({"size": 1_000_000, "margin": -0.5, "box_margin": -0.5}[option], float("nan")):
        if option == "size" and value != value:
            value = 0
        with pytest.raises(ConfigError, match=option):
            fn(tmp_path / "no-such-folder", tmp_path / "out", **{option: value})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fn", [prepare_faces, prepare_landmarks, prepare_products])
def test_workers_are_bounded_by_the_cores_before_any_work(fn, tmp_path, monkeypatch):
    """``--workers 500`` spawned 500 processes of ~650 MB each."""
    from visrec.errors import ConfigError

    monkeypatch.setattr("visrec.data.prepare.usable_cores", lambda: 4)
    for workers in (5, 0, -1, True, 2.0):
        with pytest.raises(ConfigError, match=r"workers .*from 1 to 4"):
            fn(tmp_path / "no-such-folder", tmp_path / "out", workers=workers)
    assert not (tmp_path / "out").exists()


SLOW_POOL = """
import sys, time
from visrec.data.prepare import _map

def slow(item):
    time.sleep(0.2)
    return item

if __name__ == "__main__":
    for done in _map(slow, list(range(1000)), 2):
        if done == 3:
            print("working", flush=True)
"""


def test_spawned_workers_exit_when_the_parent_is_killed_outright(tmp_path):
    """After ``kill -9`` of a parallel prepare, its spawned workers slept on forever (each holding its detector):
    they wait on a task queue whose write end they hold themselves."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import _zombie

    script = tmp_path / "slow_pool.py"
    script.write_text(SLOW_POOL)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "working"
        children = [int(c) for c in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()]
        workers = [c for c in children if "spawn_main" in open(f"/proc/{c}/cmdline").read()]
        assert len(workers) == 2, children
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.time() + 20
    alive = workers
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [w for w in workers if os.path.exists(f"/proc/{w}") and not _zombie(w)]
    for w in alive:  # never left behind by the test itself
        os.kill(w, signal.SIGKILL)
    assert not alive, "spawned workers outlived their parent"


def test_a_photo_or_identity_whose_name_is_not_utf8_is_listed_and_the_run_finishes(tmp_path):
    """Such a name went through all the work, then ended the run writing identities.txt or the products' label
    list (UnicodeEncodeError), on every rerun. It is listed as skipped, shown with U+FFFD, and the rest is written."""
    import os

    from visrec.data.synth import write_face_dataset

    shop = tmp_path / "shop"
    (shop / "p1").mkdir(parents=True)
    cv2.imwrite(str(shop / "p1" / "ok.png"), np.full((40, 60, 3), 90, np.uint8))
    with open(os.path.join(os.fsencode(shop), b"bad\xffname.png"), "wb") as fh:  # cv2.imwrite crashes on the name
        fh.write(cv2.imencode(".png", np.full((40, 60, 3), 90, np.uint8))[1].tobytes())
    report = prepare_products(shop, tmp_path / "cat", size=32)
    assert report.written == 1 and [s["path"] for s in report.skipped] == ["bad\ufffdname.png"]
    faces = write_face_dataset(tmp_path / "faces", 2, 2, format="folder", seed=0)
    first = sorted(p for p in faces.iterdir() if p.is_dir())[0]
    os.rename(first, os.fsdecode(os.path.join(os.fsencode(faces), b"id\xfe")))
    report = prepare_faces(faces, tmp_path / "rec", format="recordio", box_margin=0.2, detector=lambda img: [
        Detection((10.0, 10.0, 100.0, 100.0), 0.9)])
    assert report.written == 2 and len(report.skipped) == 2
    assert all("not UTF-8" in s["reason"] and "\ufffd" in s["path"] for s in report.skipped)


def test_a_photo_name_near_the_file_system_limit_is_written_under_a_shorter_one(tmp_path):
    """A legal 238-byte photo name plus the temporary name's suffix passed the 255-byte limit: an OSError
    traceback on every rerun. Long names are cut with a hash of the whole, so two stay two."""
    shop = tmp_path / "shop"
    shop.mkdir()
    for tail in ("a", "b"):
        cv2.imwrite(str(shop / ("\u7167" * 76 + tail + ".png")), np.full((40, 60, 3), 90, np.uint8))  # 230 bytes
    report = prepare_products(shop, tmp_path / "cat", size=32)
    assert report.written == 2
    names = sorted(p.name for p in (tmp_path / "cat" / "catalogue").iterdir())
    assert len(set(names)) == 2 and all(len(n.encode()) <= 160 for n in names)


def test_two_identities_or_products_written_under_one_name_are_refused(tmp_path):
    """'a,b' and 'a_b' (or ' carol' and 'carol') became one identity of four photos, and two product folders
    one product, without a word; both are refused before any work, naming both."""
    from visrec.errors import DataError

    def folders(root, names):
        for name in names:
            (root / name).mkdir(parents=True)
            cv2.imwrite(str(root / name / "x.png"), np.full((40, 60, 3), 90, np.uint8))
        return root

    faces = folders(tmp_path / "faces", ("a,b", "a_b"))
    with pytest.raises(DataError, match="identities 'a,b' and 'a_b' would both be written as 'a_b'"):
        prepare_faces(faces, tmp_path / "out", box_margin=0.2)
    shop = folders(tmp_path / "shop", (" carol", "carol"))
    with pytest.raises(DataError, match="product folders ' carol' and 'carol'"):
        prepare_products(shop, tmp_path / "cat", size=32)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cat").exists()


@pytest.mark.parametrize("line", ["{}", "[1, 2]", "5", "null", '{"key": "p0/000.jpg"}', '{"settings": 3}',
                                  '{"key": "a", "status": "ok", "out": 7}'])
def test_a_journal_line_of_the_wrong_shape_is_named(line, tmp_path):
    """Valid JSON of another shape ended the rerun in a KeyError or TypeError traceback (one after all the work)."""
    from visrec.errors import DataError

    shop = tmp_path / "shop"
    shop.mkdir()
    cv2.imwrite(str(shop / "ok.png"), np.full((40, 60, 3), 90, np.uint8))
    out = tmp_path / "cat"
    prepare_products(shop, out, size=32)
    with open(out / JOURNAL, "a") as fh:
        fh.write(line + "\n")
    with pytest.raises(DataError, match=r"prepare_journal.jsonl, record line 3: not a journal record"):
        prepare_products(shop, out, size=32)


def test_an_image_file_larger_than_any_image_is_refused_from_its_size(tmp_path):
    """A 2 GB file named .jpg (sparse here: no disk used) was read whole into every worker before it was found
    undecodable; it is refused from its size, and listed."""
    from visrec.data.images import MAX_IMAGE_FILE_BYTES

    shop = tmp_path / "shop"
    shop.mkdir()
    with open(shop / "huge.jpg", "wb") as fh:
        fh.truncate(MAX_IMAGE_FILE_BYTES + 1)
    cv2.imwrite(str(shop / "ok.png"), np.full((40, 60, 3), 90, np.uint8))
    report = prepare_products(shop, tmp_path / "cat", size=32)
    assert report.written == 1 and [u["path"] for u in report.unreadable] == ["huge.jpg"]
    assert "more than the" in str(report.unreadable[0])


def test_links_a_listing_does_not_follow_are_listed_as_skipped(tmp_path):
    """A linked product folder of 15 photos, a broken link and a link to /dev/zero named .jpg were left out of
    prepare products (and landmarks) without a word."""
    import os

    photos = tmp_path / "elsewhere"
    photos.mkdir()
    cv2.imwrite(str(photos / "x.png"), np.full((40, 60, 3), 90, np.uint8))
    shop = tmp_path / "shop"
    shop.mkdir()
    cv2.imwrite(str(shop / "ok.png"), np.full((40, 60, 3), 90, np.uint8))
    os.symlink(photos, shop / "linked")
    os.symlink(tmp_path / "gone.jpg", shop / "broken.jpg")
    os.symlink("/dev/zero", shop / "zero.jpg")
    report = prepare_products(shop, tmp_path / "cat", size=32)
    assert report.written == 1
    reasons = {s["path"]: s["reason"] for s in report.skipped}
    assert reasons.keys() == {"linked", "broken.jpg", "zero.jpg"}, reasons
    assert "link to a folder" in reasons["linked"] and "broken" in reasons["broken.jpg"]
    report = prepare_landmarks(shop, tmp_path / "jd", size=32)
    assert {s["path"] for s in report.skipped} >= {"linked", "broken.jpg", "zero.jpg"}


def test_a_photo_listed_twice_in_a_csv_is_refused_naming_both_lines(tmp_path):
    """`img/00000.jpg,alice` then `img/00000.jpg,bob` wrote bob's crop alone: alice vanished without a word."""
    from visrec.errors import DataError

    (tmp_path / "img").mkdir()
    cv2.imwrite(str(tmp_path / "img" / "00000.png"), np.full((40, 60, 3), 90, np.uint8))
    (tmp_path / "list.csv").write_text("img/00000.png,alice\nimg/00000.png,bob\n")
    with pytest.raises(DataError, match="listed twice .first on line 1"):
        prepare_faces(tmp_path / "list.csv", tmp_path / "out", box_margin=0.2)
    assert not (tmp_path / "out").exists()
