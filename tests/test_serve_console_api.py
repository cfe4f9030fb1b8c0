"""The API the web console stands on, in-process: paged and searched identity lists, rename, thumbnails kept
and erased with the person, face detection with boxes, enrolling a picked face, verify with aligned crops,
landmarks with the crop and point scheme, catalogue images served from the index's own catalogue only, the
status route, and the console's own files. The same flows in a real browser: tests/test_serve_browser.py."""

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the service needs visrec[serve]")
from fastapi.testclient import TestClient  # noqa: E402

from conftest import save_tiny_landmark_model  # noqa: E402

from visrec.data.images import encode_jpeg  # noqa: E402
from visrec.data.synth import render_face  # noqa: E402
from visrec.serve.app import create_app  # noqa: E402
from visrec.serve.config import ServeConfig  # noqa: E402


def face_jpeg(identity: int, k: int = 0) -> bytes:
    img, _ = render_face(identity, np.random.default_rng([identity, k]), difficulty=0.1)
    return encode_jpeg(img)


@pytest.fixture
def client(tiny_face_model, tmp_path):
    cfg = ServeConfig(faces={"model": str(tiny_face_model), "aligned": True, "galleries": {
        "default": {"backend": "faiss", "path": str(tmp_path / "g.sqlite"), "thumbnails": str(tmp_path / "thumbs")},
        "plain": {"backend": "faiss"}}})
    with TestClient(create_app(cfg)) as c:
        yield c, tmp_path / "thumbs"


def test_identity_pages_search_and_totals(client):
    c, _ = client
    for i in range(7):
        assert c.post("/v1/faces/enroll", data={"identity": f"person {i}"}, files={"image": face_jpeg(i)}).status_code == 200
    assert c.post("/v1/faces/enroll", data={"identity": "Ada"}, files={"image": face_jpeg(20)}).status_code == 200
    page = c.get("/v1/faces", params={"limit": 3, "offset": 0}).json()
    assert page["total"] == 8 and [r["identity"] for r in page["identities"]] == ["Ada", "person 0", "person 1"]
    page = c.get("/v1/faces", params={"limit": 3, "offset": 6}).json()
    assert [r["identity"] for r in page["identities"]] == ["person 5", "person 6"] and page["offset"] == 6
    found = c.get("/v1/galleries/default/faces", params={"q": "ADA", "limit": 10}).json()
    assert found["total"] == 1 and found["identities"][0]["identity"] == "Ada"
    assert len(c.get("/v1/faces").json()["identities"]) == 8  # no paging parameters: every identity, as before
    for bad in ({"limit": 0}, {"limit": 1001}, {"offset": -1}, {"limit": "x"}, {"q": "x" * 201}):
        r = c.get("/v1/faces", params=bad)
        assert r.status_code == 400 and "error" in r.json(), (bad, r.text)
    rows = c.get("/v1/galleries").json()["galleries"]
    assert {g["name"]: (g["identities"], g["thumbnails"]) for g in rows} == {"default": (8, True), "plain": (0, False)}


def test_thumbnails_are_kept_renamed_and_erased_with_the_identity(client):
    c, thumbs = client
    r = c.post("/v1/faces/enroll", data={"identity": "alice"}, files=[("image", face_jpeg(1, 0)), ("image", face_jpeg(1, 1))])
    assert r.status_code == 200 and r.json()["faces_found"] == [1, 1]
    assert c.get("/v1/faces", params={"limit": 5}).json()["identities"][0]["thumbnail"] is True
    got = c.get("/v1/faces/thumbnail", params={"identity": "alice"})
    assert got.status_code == 200 and got.headers["content-type"] == "image/jpeg" and got.content[:2] == b"\xff\xd8"
    assert len(list(thumbs.rglob("*.jpg"))) == 2
    assert not any("alice" in p.name for p in thumbs.rglob("*"))  # folders are named by key, never by the name

    r = c.post("/v1/faces/rename", json={"identity": "alice", "to": "Alice Liddell"})
    assert r.status_code == 200 and r.json() == {"identity": "Alice Liddell", "renamed_from": "alice", "templates": 2}
    assert c.get("/v1/faces/thumbnail", params={"identity": "Alice Liddell"}).status_code == 200
    assert c.get("/v1/faces/thumbnail", params={"identity": "alice"}).status_code == 404
    best = c.post("/v1/faces/identify", files={"image": face_jpeg(1, 0)}).json()["faces"][0]["matches"][0]
    assert best["identity"] == "Alice Liddell" and best["score"] == pytest.approx(1.0, abs=1e-4)
    c.post("/v1/faces/enroll", data={"identity": "bob"}, files={"image": face_jpeg(2)})
    taken = c.post("/v1/faces/rename", json={"identity": "bob", "to": "Alice Liddell"})
    assert taken.status_code == 409 and "already enrolled" in taken.json()["error"]
    assert c.post("/v1/faces/rename", json={"identity": "nobody", "to": "x"}).status_code == 404
    assert c.post("/v1/faces/rename", json={"identity": "bob"}).status_code == 400  # no new name
    same = c.post("/v1/faces/rename", json={"identity": "bob", "to": "bob"})
    assert same.status_code == 400 and "already has that name" in same.json()["error"]

    assert c.delete("/v1/faces", params={"identity": "Alice Liddell"}).json()["removed"] == 2
    assert len(list(thumbs.rglob("*.jpg"))) == 1  # bob's only: Alice's faces are gone from disk
    assert c.get("/v1/faces/thumbnail", params={"identity": "Alice Liddell"}).status_code == 404
    r = c.get("/v1/galleries/plain/faces/thumbnail", params={"identity": "bob"})
    assert r.status_code == 404 and "keeps no thumbnails" in r.json()["error"]


def test_status_reports_contracts_galleries_and_limits(client):
    c, _ = client
    s = c.get("/v1/status").json()
    assert s["status"] == "ok" and s["serves"] == ["faces"]
    contract = s["faces"]["contract"]
    assert contract["task"] == "face-embedding" and contract["embedding_dim"] == 64 and contract["metric"] == "cosine"
    assert contract["input_size"] == [112, 112] and s["faces"]["aligned"] is True
    assert [g["name"] for g in s["galleries"]] == ["default", "plain"]
    assert s["galleries"][0]["threshold"] is None and "not calibrated" in s["galleries"][0]["threshold_origin"]
    assert s["limits"]["max_pixels"] == 40_000_000 and s["limits"]["max_images"] == 16


def test_status_lists_only_the_galleries_a_restricted_key_may_use(tiny_face_model):
    cfg = ServeConfig(api_keys=["admin", {"key": "kiosk", "galleries": ["plain"]}],
                      faces={"model": str(tiny_face_model), "aligned": True,
                             "galleries": {"default": {"backend": "faiss"}, "plain": {"backend": "faiss"}}})
    c = TestClient(create_app(cfg))
    assert c.get("/v1/status").status_code == 401
    assert [g["name"] for g in c.get("/v1/status", headers={"X-API-Key": "kiosk"}).json()["galleries"]] == ["plain"]
    assert len(c.get("/v1/status", headers={"X-API-Key": "admin"}).json()["galleries"]) == 2


def test_the_console_is_served_from_the_package_with_no_outside_address(client):
    c, _ = client
    page = c.get("/")
    assert page.status_code == 200 and "/_console/console.js" in page.text and "/_console/console.css" in page.text
    for name, kind in (("console.js", "javascript"), ("console.css", "css")):
        r = c.get("/_console/" + name)
        assert r.status_code == 200 and kind in r.headers["content-type"]
        assert "http://" not in r.text.replace("http://www.w3.org/2000/svg", "") and "https://" not in r.text
    assert "https://" not in page.text and "http://" not in page.text
    assert c.get("/_console/../app.py").status_code == 404
    assert c.get("/_console/index.html").status_code == 404  # only the two named assets


@pytest.fixture(scope="module")
def products_service(tmp_path_factory):
    import torch

    from visrec.data.synth_products import write_product_dataset
    from visrec.index.catalogue import IndexOptions, build_catalogue_index
    from visrec.models import build_backbone

    d = tmp_path_factory.mktemp("console-products")
    write_product_dataset(d / "p", families=2, products_per_family=2, variants=2, queries_per_product=1, size=64)
    torch.manual_seed(0)
    desc = build_backbone("product", backbone="resnet18", dim=16)
    build_catalogue_index(d / "p" / "catalogue", d / "idx", desc, {"name": "product", "backbone": "resnet18", "dim": 16},
                          IndexOptions(size=64))
    return d


def test_catalogue_images_come_from_the_index_catalogue_only(products_service):
    d = products_service
    (d / "p" / "catalogue" / "extra.jpg").write_bytes((d / "p" / "catalogue").glob("*.jpg").__next__().read_bytes())
    secret = d / "secret.jpg"
    secret.write_bytes(b"\xff\xd8 not for the web")
    (d / "p" / "catalogue" / "linked.jpg").symlink_to(secret)
    c = TestClient(create_app(ServeConfig(products={"index": str(d / "idx"), "top_k": 3})))
    q = sorted((d / "p" / "query").glob("*.jpg"))[0].read_bytes()
    results = c.post("/v1/products/search", files={"image": q}).json()["results"]
    assert len(results) == 3
    for res in results:
        r = c.get(res["image"])
        wanted = (d / "p" / "catalogue" / f"{res['id']}.jpg").read_bytes()
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg" and r.content == wanted
    for bad in ("extra", "linked", "..%2Fsecret", "%2E%2E", "nope"):  # not in the index, or outside the catalogue
        r = c.get("/v1/products/images/" + bad)
        assert r.status_code == 404 and "error" in r.json(), bad


def test_landmarks_answer_the_crop_box_and_point_scheme(tmp_path):
    save_tiny_landmark_model(tmp_path / "lm")
    c = TestClient(create_app(ServeConfig(landmarks={"model": str(tmp_path / "lm")})))
    r = c.post("/v1/landmarks", files={"image": face_jpeg(3)}, data={"box": "10,20,60,90"}).json()
    assert r["box"] == [10, 20, 60, 90] and r["box_source"] == "given" and r["scheme"] == "jd106"
    side = 70 * (1 + 2 * 0.15)  # the longer side, widened by the contract's crop margin on each side
    assert r["crop_box"] == pytest.approx([35 - side / 2, 55 - side / 2, 35 + side / 2, 55 + side / 2], abs=0.01)
    assert r["image"] == {"width": 112, "height": 112} and len(r["points"]) == 106
    whole = c.post("/v1/landmarks", files={"image": face_jpeg(3)}).json()
    assert whole["box_source"] == "whole image" and whole["box"] == [0, 0, 112, 112]
    r = c.post("/v1/landmarks", files={"image": face_jpeg(3)}, data={"detect": "true"})
    assert r.status_code == 400 and "no face detector" in r.json()["error"]


@pytest.fixture(scope="module")
def real_client(faces_dir):
    """The service on the real photos: dlib's HOG detector, 68 points and ResNet (the console's set-up)."""
    cfg = ServeConfig(faces={"model": "dlib-resnet", "detector": "dlib-hog", "landmarks": "dlib-68",
                             "gallery": {"backend": "faiss"}}, landmarks={"model": "dlib-68"})
    with TestClient(create_app(cfg)) as c:
        yield c, faces_dir


@pytest.mark.real_faces
def test_detect_boxes_every_face_and_enroll_takes_the_one_picked(real_client):
    c, faces = real_client
    group = (faces.parent / "dlib-examples" / "2008_002506.jpg").read_bytes()
    found = c.post("/v1/faces/detect", files={"image": group}, data={"crops": "true"}).json()
    assert len(found["faces"]) >= 2, found
    w, h = found["image"]["width"], found["image"]["height"]
    for face in found["faces"]:
        x1, y1, x2, y2 = face["box"]
        assert 0 <= x1 < x2 <= w + 1 and 0 <= y1 < y2 <= h + 1 and len(face["points"]) == 68
        assert face["crop"].startswith("data:image/jpeg;base64,")
    areas = [(f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1]) for f in found["faces"]]
    assert areas == sorted(areas, reverse=True)  # largest first
    second = found["faces"][1]["box"]
    r = c.post("/v1/faces/enroll", data={"identity": "second", "box": ",".join(map(str, second))}, files={"image": group})
    assert r.status_code == 200 and r.json()["faces_found"] == [len(found["faces"])], r.text
    # the face enrolled is the one picked: searching with each face, the picked one scores 0 (same embedding)
    ident = c.post("/v1/faces/identify", files={"image": group}, data={"all_faces": "true"}).json()
    scores = [f["matches"][0]["score"] for f in ident["faces"]]
    assert ident["image"] == found["image"] and scores[1] == pytest.approx(0.0, abs=1e-4) and scores[0] < -0.1
    # another face of the same photo under the same name is another template (a template is keyed by its crop)
    first = found["faces"][0]["box"]
    r = c.post("/v1/faces/enroll", data={"identity": "second", "box": ",".join(map(str, first))}, files={"image": group})
    assert r.status_code == 200 and r.json()["templates"] == 2, r.text
    nowhere = c.post("/v1/faces/enroll", data={"identity": "x", "box": "0,0,5,5"}, files={"image": group})
    assert nowhere.status_code == 422 and "overlaps" in nowhere.json()["error"]
    two = c.post("/v1/faces/enroll", data={"identity": "x", "box": "0,0,5,5"}, files=[("image", group), ("image", group)])
    assert two.status_code == 400 and "one image" in two.json()["error"]


@pytest.mark.real_faces
def test_verify_answers_both_aligned_crops_and_landmarks_find_the_face(real_client):
    c, faces = real_client
    obama, biden = (faces / "obama.jpg").read_bytes(), (faces / "biden.jpg").read_bytes()
    r = c.post("/v1/faces/verify", files={"image_a": obama, "image_b": biden}, data={"crops": "true"}).json()
    assert r["same"] is False and len(r["faces"]) == 2 and all(f["crop"].startswith("data:image/jpeg") for f in r["faces"])
    assert "author" in r["threshold_origin"] or "contract" in r["threshold_origin"]
    plain = c.post("/v1/faces/verify", files={"image_a": obama, "image_b": biden}).json()
    assert "faces" not in plain and plain["score"] == r["score"]
    lm = c.post("/v1/landmarks", files={"image": obama}, data={"detect": "true"}).json()
    assert lm["box_source"] == "detected" and lm["scheme"] == "300w68" and len(lm["points"]) == 68
    x1, y1, x2, y2 = lm["box"]
    pts = np.array(lm["points"])
    inside = (pts[:, 0] > x1 - 0.2 * (x2 - x1)) & (pts[:, 0] < x2 + 0.2 * (x2 - x1)) & (pts[:, 1] > y1 - 0.3 * (y2 - y1))
    assert inside.all()  # the points lie on the detected face, not spread over the whole photo


def test_the_cli_erase_also_deletes_the_thumbnails_the_service_kept(tiny_face_model, tmp_path):
    from typer.testing import CliRunner

    from visrec.cli import app as cli
    from visrec.serve.config import load_serve_config

    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"faces:\n  model: {tiny_face_model}\n  aligned: true\n  gallery:\n    backend: faiss\n"
                   f"    path: {tmp_path / 'g.sqlite'}\n    thumbnails: {tmp_path / 'thumbs'}\n")
    with TestClient(create_app(load_serve_config(cfg))) as c:
        for who, k in (("alice", 1), ("bob", 2)):
            assert c.post("/v1/faces/enroll", data={"identity": who}, files={"image": face_jpeg(k)}).status_code == 200
    assert len(list((tmp_path / "thumbs").rglob("*.jpg"))) == 2
    res = CliRunner().invoke(cli, ["gallery", "delete", "alice", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "thumbs").rglob("*.jpg"))) == 1  # bob's
    with TestClient(create_app(load_serve_config(cfg))) as c:
        assert c.get("/v1/faces/thumbnail", params={"identity": "alice"}).status_code == 404
        assert c.get("/v1/faces/thumbnail", params={"identity": "bob"}).status_code == 200


def test_the_cli_enroll_runs_the_service_pipeline_and_keeps_thumbnails(tiny_face_model, tmp_path):
    """`visrec gallery enroll` builds the pipeline the service builds from the same config (detection size
    included) and keeps thumbnails where the gallery names a folder, so the console shows CLI enrollments too."""
    from typer.testing import CliRunner

    from visrec.cli import app as cli
    from visrec.serve.config import load_serve_config
    from visrec.serve.pipeline import configured_pipeline

    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"faces:\n  model: {tiny_face_model}\n  detect_size: 320\n  gallery:\n    backend: faiss\n"
                   f"    path: {tmp_path / 'g.sqlite'}\n    thumbnails: {tmp_path / 'thumbs'}\n")
    assert configured_pipeline(load_serve_config(cfg)).detector.detect_size == 320
    cfg.write_text(cfg.read_text().replace("detect_size: 320", "aligned: true"))
    for who, k in (("alice", 1), ("bob", 2)):
        (tmp_path / "people" / who).mkdir(parents=True)
        (tmp_path / "people" / who / "a.jpg").write_bytes(face_jpeg(k))
    res = CliRunner().invoke(cli, ["gallery", "enroll", str(tmp_path / "people"), "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "thumbs").rglob("*.jpg"))) == 2
    with TestClient(create_app(load_serve_config(cfg))) as c:
        rows = c.get("/v1/faces", params={"limit": 10}).json()["identities"]
        assert [(r["identity"], r["thumbnail"]) for r in rows] == [("alice", True), ("bob", True)]
        # the same photo over HTTP is the same template: both paths key a template by its aligned crop
        again = c.post("/v1/faces/enroll", data={"identity": "alice"}, files={"image": face_jpeg(1)}).json()
        assert again["enrolled"] == 1 and again["templates"] == 1


def test_thumbnails_a_crash_left_behind_are_swept_when_the_service_starts(tiny_face_model, tmp_path):
    """A rename or erase interrupted between the gallery and its thumbnail folder leaves a folder of a name no
    longer enrolled (or a half-written file): the next start removes it, so no face outlives its person."""
    from visrec.index.gallery import identity_key

    cfg = ServeConfig(faces={"model": str(tiny_face_model), "aligned": True, "gallery": {
        "backend": "faiss", "path": str(tmp_path / "g.sqlite"), "thumbnails": str(tmp_path / "thumbs")}})
    with TestClient(create_app(cfg)) as c:
        c.post("/v1/faces/enroll", data={"identity": "alice"}, files={"image": face_jpeg(1)})
    stale = tmp_path / "thumbs" / identity_key("renamed away")
    stale.mkdir()
    (stale / "t.jpg").write_bytes(b"a face")
    half = tmp_path / "thumbs" / identity_key("alice") / ".x.123.tmp"
    half.write_bytes(b"half")
    with TestClient(create_app(cfg)) as c:
        assert not stale.exists() and not half.exists()
        assert c.get("/v1/faces/thumbnail", params={"identity": "alice"}).status_code == 200


def test_a_thumbnail_that_cannot_be_written_undoes_the_enrollment(tiny_face_model, tmp_path):
    import shutil

    from visrec.index.gallery import identity_key

    cfg = ServeConfig(faces={"model": str(tiny_face_model), "aligned": True, "gallery": {
        "backend": "faiss", "path": str(tmp_path / "g.sqlite"), "thumbnails": str(tmp_path / "thumbs")}})
    with TestClient(create_app(cfg), raise_server_exceptions=False) as c:
        assert c.post("/v1/faces/enroll", data={"identity": "alice"}, files={"image": face_jpeg(1)}).status_code == 200
        (tmp_path / "thumbs" / identity_key("carol")).write_bytes(b"")  # blocks moving alice's folder there
        r = c.post("/v1/faces/rename", data={"identity": "alice", "to": "carol"})
        assert r.status_code == 200 and r.json()["identity"] == "carol", r.text  # done: said so, pictures lost
        shutil.rmtree(tmp_path / "thumbs")  # the disk goes away under the service
        r = c.post("/v1/faces/enroll", data={"identity": "bob"}, files={"image": face_jpeg(2)})
        assert r.status_code >= 500, r.text
        assert [row["identity"] for row in c.get("/v1/faces").json()["identities"]] == ["carol"]
    with TestClient(create_app(cfg)) as c:  # after a restart too
        assert [row["identity"] for row in c.get("/v1/faces").json()["identities"]] == ["carol"]


def test_the_thumbnail_folder_is_the_gallerys_own(tiny_face_model, tmp_path):
    """A folder holding files visrec did not write (or the gallery's own file) is refused, the files intact; a
    folder of an earlier version (identity folders only) is adopted; the sweep touches only identity folders."""
    from visrec.errors import ConfigError
    from visrec.index.gallery import identity_key
    from visrec.serve.thumbnails import MARKER

    def config(thumbs, gallery_file):
        return ServeConfig(faces={"model": str(tiny_face_model), "aligned": True, "gallery": {
            "backend": "faiss", "path": str(gallery_file), "thumbnails": str(thumbs)}})

    runs = tmp_path / "runs"
    (runs / "r50").mkdir(parents=True)
    (runs / "r50" / "model.pt").write_bytes(b"weights")
    with pytest.raises(ConfigError, match=r"runs holds 'r50', which visrec did not write"):
        create_app(config(runs, tmp_path / "g.sqlite"))
    assert (runs / "r50" / "model.pt").read_bytes() == b"weights"
    with pytest.raises(ConfigError, match="which holds the file of gallery 'default'"):
        create_app(config(tmp_path / "x", tmp_path / "x" / "gallery.sqlite"))

    old = tmp_path / "old-thumbs"  # written by an earlier version: identity folders, no marker
    (old / identity_key("gone")).mkdir(parents=True)
    with TestClient(create_app(config(old, tmp_path / "g.sqlite"))) as c:
        assert (old / MARKER).is_file() and not (old / identity_key("gone")).exists()
        c.post("/v1/faces/enroll", data={"identity": "alice"}, files={"image": face_jpeg(1)})
    (old / "notes.txt").write_text("mine")  # put there later by hand: left alone
    with TestClient(create_app(config(old, tmp_path / "g.sqlite"))) as c:
        assert (old / "notes.txt").read_text() == "mine"
        assert c.get("/v1/faces/thumbnail", params={"identity": "alice"}).status_code == 200
