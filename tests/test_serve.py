"""The HTTP service in-process (FastAPI TestClient): flows, every kind of bad input -> 4xx, auth, metrics."""

import base64
import re
import struct
import zlib

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the service needs visrec[serve]")
from fastapi.testclient import TestClient  # noqa: E402

from visrec.data.images import encode_jpeg  # noqa: E402
from visrec.data.synth import render_face  # noqa: E402
from visrec.errors import ConfigError, VisrecError  # noqa: E402
from visrec.serve.app import create_app  # noqa: E402
from visrec.serve.config import ServeConfig  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tiny_face_model):
    return tiny_face_model


def face_jpeg(identity: int, k: int = 0) -> bytes:
    img, _ = render_face(identity, np.random.default_rng([identity, k]), difficulty=0.1)
    return encode_jpeg(img)


def make_client(model_dir, **kw):
    faces = {"model": str(model_dir), "aligned": True, "gallery": {"backend": "faiss"}}
    faces.update(kw.pop("faces", {}))
    return TestClient(create_app(ServeConfig(faces=faces, **kw)))


def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height, with a tiny (wrong) IDAT: only the header matters."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def test_enroll_identify_verify_list_delete(model_dir):
    c = make_client(model_dir)
    assert c.get("/healthz").json()["serves"] == ["faces"]
    a0, a1, b0 = face_jpeg(1, 0), face_jpeg(1, 1), face_jpeg(2, 0)
    r = c.post("/v1/faces/enroll", data={"identity": "alice"}, files=[("image", a0), ("image", a1)])
    assert r.status_code == 200 and r.json()["templates"] == 2, r.text
    r = c.post("/v1/faces/enroll", json={"identity": "bob", "images": [base64.b64encode(b0).decode()]})
    assert r.status_code == 200, r.text
    again = c.post("/v1/faces/enroll", data={"identity": "alice"}, files=[("image", a0)])
    assert again.json()["templates"] == 2  # same image again: idempotent
    r = c.post("/v1/faces/identify", files={"image": a1})
    best = r.json()["faces"][0]["matches"][0]
    assert best["identity"] == "alice" and best["score"] == pytest.approx(1.0, abs=1e-4)
    r = c.post("/v1/faces/verify", files={"image_a": a0, "image_b": a0})
    assert r.json()["score"] == pytest.approx(1.0, abs=1e-4)
    names = {row["identity"]: row["templates"] for row in c.get("/v1/faces").json()["identities"]}
    assert names == {"alice": 2, "bob": 1}
    assert c.delete("/v1/faces/alice").json()["removed"] == 2
    assert c.delete("/v1/faces/alice").status_code == 404
    assert c.get("/docs").status_code == 200 and "openapi" in c.get("/openapi.json").text
    m = c.get("/metrics").text
    assert 'visrec_requests_total{route="/v1/faces/enroll",status="200"} 3' in m
    assert "visrec_request_seconds_bucket" in m and "visrec_gallery_templates 1" in m
    assert "<h1>visrec</h1>" in c.get("/").text


def test_every_kind_of_bad_input_is_a_4xx_with_a_message(model_dir):
    c = make_client(model_dir, limits={"max_body_mb": 0.2, "max_pixels": 4_000_000})
    good = face_jpeg(3)
    cases = {
        "not an image": (dict(files={"image": b"hello, this is text"}), 422, "not a decodable image"),
        "truncated jpeg": (dict(files={"image": good[: len(good) // 2]}), 422, "truncated"),
        "zero size": (dict(files={"image": png_header(0, 0)}), 422, ""),
        "bomb": (dict(files={"image": png_header(30000, 30000)}), 413, "pixels"),
        "empty": (dict(files={"image": b""}), 400, "empty"),
        "wrong content type": (dict(content=good, headers={"content-type": "image/jpeg"}), 415, "content type"),
        "too large": (dict(files={"image": b"\xff" * 300_000}), 413, "limit"),
        "bad base64": (dict(json={"image": "###"}), 400, "base64"),
        "bad json": (dict(content=b"{nope", headers={"content-type": "application/json"}), 400, "JSON"),
        "no image field": (dict(data={"x": "1"}, files={"other": good}), 400, "unexpected file field"),
        "two images": (dict(files=[("image", good), ("image", good)]), 400, "one image"),
    }
    for name, (kw, status, words) in cases.items():
        r = c.post("/v1/faces/identify", **kw)
        assert r.status_code == status, (name, r.status_code, r.text)
        assert words.lower() in r.json()["error"].lower(), (name, r.json())
    r = c.post("/v1/faces/enroll", files={"image": good})
    assert r.status_code == 400 and "identity" in r.json()["error"]
    assert c.post("/v1/landmarks", files={"image": good}).status_code == 404  # not configured here


def test_no_face_found_with_the_haar_detector(model_dir):
    c = make_client(model_dir, faces={"aligned": False})
    blank = encode_jpeg(np.full((200, 200, 3), 128, np.uint8))
    r = c.post("/v1/faces/identify", files={"image": blank})
    assert r.status_code == 422 and "no face found" in r.json()["error"]


def test_api_key_required_off_loopback_and_checked(model_dir, monkeypatch):
    faces = {"model": str(model_dir), "aligned": True, "gallery": {"backend": "faiss"}}
    monkeypatch.delenv("VISREC_API_KEYS", raising=False)
    with pytest.raises(ConfigError, match="API key"):
        ServeConfig(host="0.0.0.0", faces=faces).check()
    monkeypatch.setenv("VISREC_API_KEYS", "s3cret,other")
    c = TestClient(create_app(ServeConfig(host="0.0.0.0", faces=faces)))
    assert c.get("/v1/faces").status_code == 401
    assert c.get("/v1/faces", headers={"X-API-Key": "wrong"}).status_code == 401
    assert c.get("/v1/faces", headers={"X-API-Key": "s3cret"}).status_code == 200
    assert c.get("/healthz").status_code == 200  # health stays open for probes


def test_a_checkpoint_is_served_through_its_onnx_export_when_one_is_beside_it(tmp_path, tiny_face_model):
    """runtime auto (the default): a landmark checkpoint with the `visrec export` of itself beside it runs in
    ONNX Runtime with the same points; an export of another checkpoint is not used (auto: PyTorch, onnx:
    refused naming why); runtime torch keeps PyTorch. A face model without an export stays on PyTorch."""
    import shutil

    import torch

    from visrec.export import export_checkpoint
    from visrec.faces.images import decode_upload
    from visrec.models.landmark_nets import predict_points
    from visrec.models import build_backbone
    from visrec.models.contract import contract_from_config
    from visrec.train.checkpoint import atomic_save

    def save(seed, where):
        torch.manual_seed(seed)
        net = build_backbone("pfld", num_points=106, width_mult=0.25).eval()
        config = {"name": "pfld", "num_points": 106, "width_mult": 0.25}
        atomic_save({"model_config": config, "backbone": net.state_dict(),
                     "contract": contract_from_config(config).to_dict()}, where / "model.pt")
        return net

    lm = save(0, tmp_path / "lm")
    export_checkpoint(tmp_path / "lm", tmp_path / "lm" / "model.onnx")
    img, box = face_jpeg(4), "10,10,100,100"
    ref = predict_points(lm, decode_upload(img), (10, 10, 100, 100))

    def serve(runtime=None, faces=False):
        section = {"model": str(tmp_path / "lm"), **({} if runtime is None else {"runtime": runtime})}
        extra = {"faces": {"model": str(tiny_face_model), "aligned": True, "gallery": {"backend": "faiss"}}} if faces else {}
        return TestClient(create_app(ServeConfig(landmarks=section, **extra)))

    c = serve(faces=True)
    assert c.get("/healthz").json()["runtimes"] == {"faces": "torch", "landmarks": "onnxruntime"}
    r = c.post("/v1/landmarks", files={"image": img}, data={"box": box})
    np.testing.assert_allclose(np.array(r.json()["points"]), ref, atol=0.02)
    assert serve("torch").get("/healthz").json()["runtimes"] == {"landmarks": "torch"}

    save(1, tmp_path / "lm")  # the checkpoint changed after the export: the export no longer stands in for it
    assert serve().get("/healthz").json()["runtimes"] == {"landmarks": "torch"}
    with pytest.raises(VisrecError, match="runtime onnx: .*model.onnx is not the export of this checkpoint"):
        serve("onnx")
    shutil.copy(tmp_path / "lm" / "model.pt", tmp_path / "other.pt")
    with pytest.raises(VisrecError, match="no model.onnx beside it"):
        from visrec.models import load_model

        load_model(tmp_path / "other.pt", runtime="onnx")


def test_landmarks_and_products_endpoints(tmp_path):
    from conftest import save_tiny_landmark_model
    from visrec.data.synth_products import write_product_dataset
    from visrec.index.catalogue import IndexOptions, build_catalogue_index
    from visrec.models import build_backbone

    lm = save_tiny_landmark_model(tmp_path / "lm")
    write_product_dataset(tmp_path / "p", families=2, products_per_family=2, variants=2, queries_per_product=1, size=64)
    desc = build_backbone("product", backbone="resnet18", dim=16)
    build_catalogue_index(tmp_path / "p" / "catalogue", tmp_path / "idx", desc,
                          {"name": "product", "backbone": "resnet18", "dim": 16}, IndexOptions(size=64))
    c = TestClient(create_app(ServeConfig(landmarks={"model": str(tmp_path / "lm")},
                                          products={"index": str(tmp_path / "idx"), "top_k": 3})))
    img = face_jpeg(4)
    r = c.post("/v1/landmarks", files={"image": img}, data={"box": "10,10,100,100"})
    pts = np.array(r.json()["points"])
    assert r.status_code == 200 and pts.shape == (106, 2)
    from visrec.models.landmark_nets import predict_points
    from visrec.faces.images import decode_upload

    ref = predict_points(lm, decode_upload(img), (10, 10, 100, 100))  # what visrec landmarks IMAGE prints
    np.testing.assert_allclose(pts, ref, atol=0.01)
    assert (pts >= 10 - 0.15 * 90 - 1).all() and (pts <= 100 + 0.15 * 90 + 1).all()  # inside the crop
    assert c.post("/v1/landmarks", files={"image": img}, data={"box": "5,5,1"}).status_code == 400
    q = sorted((tmp_path / "p" / "query").glob("*.jpg"))[0].read_bytes()
    res = c.post("/v1/products/search", files={"image": q}).json()["results"]
    assert len(res) == 3 and res[0]["score"] >= res[1]["score"]
    assert c.post("/v1/faces/identify", files={"image": img}).status_code == 404


def test_gallery_cli_calibrate_list_export_import(model_dir, tmp_path):
    """visrec gallery calibrate stores the threshold the exact engine picks; the server then uses it."""
    pytest.importorskip("pymilvus", reason="the Milvus gallery needs visrec[serve]")
    from typer.testing import CliRunner

    from visrec.cli import app
    from visrec.data.datasets import open_face_dataset
    from visrec.data.synth import write_face_dataset
    from visrec.evaluate.verification import tpr_at_fpr
    from visrec.serve.config import load_serve_config
    from visrec.faces.pipeline import Embedder

    data = write_face_dataset(tmp_path / "cal", 12, 4, format="folder", seed=3)
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"faces:\n  model: {model_dir}\n  aligned: true\n"
                   f"  gallery: {{backend: milvus, uri: {tmp_path / 'g.db'}}}\n")
    runner = CliRunner()
    res = runner.invoke(app, ["gallery", "calibrate", "--config", str(cfg), "--data", str(data), "--target-fpr", "1e-2"])
    assert res.exit_code == 0, res.output
    ds = open_face_dataset(data)
    emb = Embedder(model_dir)(np.stack([ds.source.image(i) for i in range(len(ds))]))
    expected = tpr_at_fpr(emb, ds.labels, targets=(1e-2,), device="cpu")[1e-2].threshold
    # --photos: the same folder as photos through the configured pipeline (aligned: true -> the crops as they
    # are), so the same threshold; it is stored again
    res = runner.invoke(app, ["gallery", "calibrate", "--config", str(cfg), "--data", str(data), "--photos",
                              "--target-fpr", "1e-2"])
    assert res.exit_code == 0 and "photos without a face (left out)" in res.output, res.output
    # the printed value (6 digits) within an ULP and its rounding: the gallery scores rows it normalised again in
    # float32, which can move a score by an ULP and, near a rounding midpoint, the sixth digit with it
    printed = re.search(r"threshold\s+│\s+(\S+)", res.output)
    assert printed and float(printed[1]) == pytest.approx(expected, abs=1e-6), res.output
    c = TestClient(create_app(load_serve_config(cfg)))
    assert c.post("/v1/faces/identify", files={"image": face_jpeg(1)}).status_code == 200
    assert c.get("/v1/faces").json() == {"identities": [], "total": 0, "offset": 0}
    r = c.post("/v1/faces/enroll", data={"identity": "carol", "metadata": '{"desk": 4}'}, files={"image": face_jpeg(5)})
    assert r.status_code == 200, r.text
    r = c.post("/v1/faces/identify", files={"image": face_jpeg(5)}).json()
    assert r["threshold"] == pytest.approx(expected, abs=1e-6) and r["faces"][0]["matches"][0]["accepted"]
    assert c.post("/v1/faces/identify", files={"image": face_jpeg(5)}, data={"top_k": "x"}).status_code == 400
    assert c.post("/v1/faces/identify", files={"image": face_jpeg(5)}, data={"all_faces": "maybe"}).status_code == 400
    assert c.post("/v1/faces/identify", json={"image": base64.b64encode(face_jpeg(5)).decode(),
                                              "all_faces": False, "top_k": 1}).status_code == 200
    del c
    import gc

    gc.collect()
    res = runner.invoke(app, ["gallery", "list", "--config", str(cfg)])
    assert res.exit_code == 0 and "carol" in res.output and "desk" in res.output, res.output
    res = runner.invoke(app, ["gallery", "export", "--config", str(cfg), "--out", str(tmp_path / "g.npz")])
    assert res.exit_code == 0 and "1 templates" in res.output, res.output
    cfg2 = tmp_path / "serve2.yaml"
    cfg2.write_text(cfg.read_text().replace("g.db", "g2.db"))
    res = runner.invoke(app, ["gallery", "import", "--config", str(cfg2), str(tmp_path / "g.npz")])
    assert res.exit_code == 0 and "imported 1 new" in res.output, res.output
    assert res.output.index("importing templates") < res.output.index("imported 1 new"), res.output  # bar first


def test_detector_points_drive_the_alignment(model_dir):
    """With a detector that gives 5 points (SCRFD / YuNet), the crop is the ArcFace-template alignment of
    those points; several faces come largest first; without points the widened box is used."""
    from visrec.faces.align import align_face, five_points
    from visrec.faces.detectors import Detection
    from visrec.faces.pipeline import FacePipeline

    img, pts = render_face(7, np.random.default_rng(0), difficulty=0.1)
    canvas = np.full((300, 400, 3), 90, np.uint8)
    canvas[50:162, 200:312] = img
    five = five_points(pts + (200, 50), 106).astype(np.float32)
    small = Detection(np.array([10, 10, 40, 40], np.float32), 0.99, None)
    big = Detection(np.array([200, 50, 312, 162], np.float32), 0.9, five)
    pipe = FacePipeline(model_dir, detector=lambda image: [small, big])
    faces = pipe.faces(canvas)
    assert [f.box for f in faces] == [(200, 50, 312, 162), (10, 10, 40, 40)]
    np.testing.assert_array_equal(faces[0].crop, align_face(canvas, five)[0])
    assert faces[1].points is None and faces[1].crop.shape == (112, 112, 3)
    emb, found = pipe.embed_upload(encode_jpeg(canvas))
    assert emb.shape == (1, 64) and found[0].box == (200, 50, 312, 162)
    eyes = FacePipeline(model_dir, detector=lambda image: [big], align="eyes").faces(canvas)[0]
    np.testing.assert_array_equal(eyes.crop, align_face(canvas, five, method="eyes")[0])
    assert np.abs(eyes.crop.astype(int) - faces[0].crop).max() > 0


def test_the_example_serve_config_validates_and_align_is_checked(tmp_path):
    from pathlib import Path

    from visrec.serve.config import load_serve_config

    cfg = load_serve_config(Path(__file__).resolve().parents[1] / "configs" / "serve" / "example.yaml")
    assert cfg.faces.align == "lstsq" and (cfg.faces.gallery.backend, cfg.faces.runtime) == ("faiss", "auto")
    bad = tmp_path / "bad.yaml"
    bad.write_text("faces: {model: m.onnx, align: eye}\n")
    with pytest.raises(ConfigError, match="align"):
        load_serve_config(bad)


def test_every_post_route_declares_its_request_body_and_a_client_built_from_it_works(model_dir):
    """/openapi.json declares each POST route's body (multipart with a binary field per image, and base64
    JSON): a client that knows only the schema fills it in and gets answers (named-gallery routes included,
    their path parameter filled with the gallery's name)."""
    c = make_client(model_dir)
    spec = c.get("/openapi.json").json()
    posts = {path: ops["post"] for path, ops in spec["paths"].items() if "post" in ops}
    assert set(posts) == {"/v1/faces/enroll", "/v1/faces/identify", "/v1/faces/verify", "/v1/faces/detect",
                          "/v1/faces/rename", "/v1/landmarks", "/v1/products/search",
                          "/v1/galleries/{name}/faces/enroll", "/v1/galleries/{name}/faces/identify",
                          "/v1/galleries/{name}/faces/verify", "/v1/galleries/{name}/faces/rename"}
    renames = {p: posts.pop(p) for p in list(posts) if p.endswith("/rename")}  # no image: after the enrollments
    for path, op in posts.items():
        content = op["requestBody"]["content"]
        assert set(content) == {"multipart/form-data", "application/json"}, path
        form = content["multipart/form-data"]["schema"]
        binary = [n for n, p in form["properties"].items()
                  if p.get("format") == "binary" or p.get("items", {}).get("format") == "binary"]
        assert binary and set(binary) <= set(form["required"]), path
        files = [(n, (f"{n}.jpg", face_jpeg(i), "image/jpeg")) for i, n in enumerate(binary)]
        data = {n: "schema-client" for n in form["required"] if n not in binary}
        params = [p["name"] for p in op.get("parameters", []) if p["in"] == "path"]
        assert params == (["name"] if "{name}" in path else []), (path, params)
        r = c.post(path.replace("{name}", "default"), files=files, data=data)
        expected = 404 if path in ("/v1/landmarks", "/v1/products/search") else 200  # not configured here
        assert r.status_code == expected, (path, r.status_code, r.text)
    assert "schema-client" in {i["identity"] for i in c.get("/v1/faces").json()["identities"]}
    for n, (path, op) in enumerate(sorted(renames.items())):  # a body of two names, in either form
        content = op["requestBody"]["content"]
        assert set(content) == {"multipart/form-data", "application/json"}, path
        assert set(content["application/json"]["schema"]["required"]) == {"identity", "to"}, path
        old, new = ("schema-client", "renamed") if n == 0 else ("renamed", "schema-client")
        r = c.post(path.replace("{name}", "default"), data={"identity": old, "to": new})
        assert r.status_code == 200 and r.json()["identity"] == new, (path, r.text)


def test_enroll_answers_one_entry_per_image_and_refuses_the_same_photo_twice(model_dir, tmp_path):
    """Each image part is one template: the answer lists one entry per image, in order, each stored (here: one
    thumbnail per entry); a request holding the same photo twice is a 400 naming both parts (multipart and
    JSON alike) and stores nothing. The same photo in a later request adds nothing and answers its entry."""
    c = make_client(model_dir, faces={"gallery": {"backend": "faiss", "thumbnails": str(tmp_path / "thumbs")}})
    p, q = face_jpeg(1), face_jpeg(2)

    def stored():
        return sorted(f.stem for f in (tmp_path / "thumbs").rglob("*.jpg"))

    r = c.post("/v1/faces/enroll", data={"identity": "alice"}, files=[("image", p), ("image", q)])
    assert r.status_code == 200, r.text
    first = r.json()
    assert first["enrolled"] == len(first["entries"]) == len(set(first["entries"])) == first["templates"] == 2
    assert first["faces_found"] == [1, 1] and stored() == sorted(first["entries"])
    b64 = base64.b64encode(p).decode()
    for kw, twice in ((dict(data={"identity": "bob"}, files=[("image", q), ("image", p), ("image", p)]), (3, 2)),
                      (dict(json={"identity": "bob", "images": [b64, b64]}), (2, 1)),
                      (dict(json={"identity": "bob", "images": [base64.b64encode(q).decode()], "image": b64}), None)):
        r = c.post("/v1/faces/enroll", **kw)
        if twice is None:  # q and p: two photos, fine
            assert r.status_code == 200 and r.json()["enrolled"] == 2 and r.json()["templates"] == 2, r.text
            c.delete("/v1/faces/bob")
            continue
        assert r.status_code == 400, r.text
        assert f"image {twice[0]} is the same photo as image {twice[1]}" in r.json()["error"], r.text
    r = c.post("/v1/faces/enroll", json={"identity": "bob", "images": [b64], "image": b64})
    assert r.status_code == 400 and "same photo" in r.json()["error"], r.text  # both keys, one photo
    assert [row["identity"] for row in c.get("/v1/faces").json()["identities"]] == ["alice"]
    assert len(stored()) == 2
    again = c.post("/v1/faces/enroll", data={"identity": "alice"}, files=[("image", q)]).json()
    assert again["entries"] == first["entries"][1:] and again["enrolled"] == 1 and again["templates"] == 2
    assert stored() == sorted(first["entries"])


def test_metrics_label_every_route_and_unmatched_only_what_no_route_matches(model_dir, monkeypatch):
    """/openapi.json (a Starlette route), the docs' assets (a mount) and the rest are counted under their own
    route template; ``unmatched`` counts only requests no route of the app matches (a 404 of the router)."""
    from prometheus_client.parser import text_string_to_metric_families
    from starlette.routing import Mount

    def leaf_routes(routes):  # FastAPI keeps an included router as one entry
        for r in routes:
            yield from leaf_routes(r.original_router.routes) if hasattr(r, "original_router") else (r,)

    def counts(client):
        families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
        return {(s.labels["route"], s.labels["status"]): s.value for s in families["visrec_requests"].samples
                if s.name == "visrec_requests_total"}

    c = make_client(model_dir)
    sent = {"/openapi.json": (200, "/openapi.json"), "/docs": (200, "/docs"), "/redoc": (200, "/redoc"),
            "/_docs-assets/swagger-ui.css": (200, "/_docs-assets/{path}"),
            "/_docs-assets/nothing.js": (404, "/_docs-assets/{path}"),
            "/_console/console.js": (200, "/_console/{asset}"), "/_console/nothing.js": (404, "/_console/{asset}"),
            "/docs/oauth2-redirect": (404, "unmatched"),  # not served: the docs use no OAuth2
            "/nothing": (404, "unmatched"), "/v1/faces/thumbnail": (400, "/v1/faces/thumbnail")}
    for path, (status, _) in sent.items():
        assert c.get(path).status_code == status, path
    assert c.post("/openapi.json").status_code == 405
    got = counts(c)
    for path, (status, route) in sent.items():
        assert got.get((route, str(status)), 0) >= 1, (path, route, got)
    assert got[("/openapi.json", "405")] == 1
    assert sum(v for (route, _), v in got.items() if route == "unmatched") == 2, got
    # every GET route of the app without path parameters, asked once more: none of them counts as unmatched
    before = sum(v for (route, _), v in counts(c).items() if route == "unmatched")
    plain = [r for r in leaf_routes(c.app.routes) if not isinstance(r, Mount) and "{" not in r.path
             and "GET" in (getattr(r, "methods", None) or ())]
    assert {"/openapi.json", "/docs", "/redoc", "/", "/healthz", "/metrics", "/v1/faces"} <= {r.path for r in plain}
    for r in plain:
        c.get(r.path)
    after = counts(c)
    assert sum(v for (route, _), v in after.items() if route == "unmatched") == before
    for path in ("/openapi.json", "/docs", "/redoc", "/", "/healthz", "/v1/faces", "/v1/status"):
        assert after[(path, "200")] >= 1, (path, after)
    # a request the Guard refuses before any route runs is still counted under the route it asked for
    monkeypatch.setenv("VISREC_API_KEYS", "k")
    keyed = make_client(model_dir, host="0.0.0.0")
    assert keyed.get("/v1/faces").status_code == 401 and keyed.get("/v1/nowhere").status_code == 401
    got = counts(keyed)
    assert got[("/v1/faces", "401")] == 1 and got[("unmatched", "401")] == 1, got
