"""Several named face galleries in one service: two Milvus collections in one Milvus Lite file keep their
identities, thresholds and model guards apart; API keys restricted to galleries (403 elsewhere, and GET
/v1/galleries shows only theirs); unknown galleries are a 404; the single-gallery config works as before;
config errors name the bad gallery; the CLI's --gallery picks the gallery it acts on."""

import base64
import logging
import sys

import numpy as np
import pytest
from pydantic import ValidationError

pytest.importorskip("fastapi", reason="the service needs visrec[serve]")
pytest.importorskip("pymilvus", reason="the Milvus gallery needs visrec[serve]")
from fastapi.testclient import TestClient  # noqa: E402

from visrec.data.images import encode_jpeg  # noqa: E402
from visrec.data.synth import render_face  # noqa: E402
from visrec.errors import ConfigError  # noqa: E402
from visrec.faces.pipeline import Embedder  # noqa: E402
from visrec.index.gallery import GalleryMismatchError, open_gallery  # noqa: E402
from visrec.serve.app import create_app  # noqa: E402
from visrec.serve.config import ServeConfig, load_serve_config  # noqa: E402

STAFF_KEY, ADMIN_KEY, ENV_KEY = "staff-key-7f3a", "admin-key-91c2", "env-key-55d0"


def face_jpeg(identity: int, k: int = 0) -> bytes:
    img, _ = render_face(identity, np.random.default_rng([identity, k]), difficulty=0.1)
    return encode_jpeg(img)


def two_galleries(model, db, **faces):
    """A faces section with galleries staff and visitors in one Milvus Lite file (two collections)."""
    return {"model": str(model), "aligned": True,
            "galleries": {"staff": {"backend": "milvus", "uri": str(db), "collection": "staff"},
                          "visitors": {"backend": "milvus", "uri": str(db), "collection": "visitors"}}, **faces}


def preset_thresholds(db, staff: float, visitors: float) -> None:
    """Calibrated thresholds stored in each gallery's own info record before the service opens them."""
    for collection, t, fpr in (("staff", staff, 1e-3), ("visitors", visitors, 1e-2)):
        g = open_gallery("milvus", uri=str(db), collection=collection)
        g.set_threshold(t, target_fpr=fpr)
        g.close()


def best(response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()["faces"][0]["matches"][0]


# --- two galleries, one Milvus Lite file ----------------------------------------------------------------------
def test_two_galleries_in_one_milvus_lite_file_keep_identities_thresholds_and_guards_apart(tiny_face_model, tmp_path):
    db = tmp_path / "g.db"
    preset_thresholds(db, staff=0.25, visitors=0.6)
    c = TestClient(create_app(ServeConfig(faces=two_galleries(tiny_face_model, db))))
    a0, a1, b0 = face_jpeg(1, 0), face_jpeg(1, 1), face_jpeg(2, 0)
    r = c.post("/v1/galleries/staff/faces/enroll", data={"identity": "alice"}, files=[("image", a0), ("image", a1)])
    assert r.status_code == 200 and r.json()["templates"] == 2, r.text
    r = c.post("/v1/galleries/visitors/faces/enroll", json={"identity": "bob", "images": [base64.b64encode(b0).decode()]})
    assert r.status_code == 200, r.text

    # identities: each gallery lists and finds only its own
    listed = {name: [i["identity"] for i in c.get(f"/v1/galleries/{name}/faces").json()["identities"]]
              for name in ("staff", "visitors")}
    assert listed == {"staff": ["alice"], "visitors": ["bob"]}
    assert best(c.post("/v1/galleries/staff/faces/identify", files={"image": a1}))["identity"] == "alice"
    assert best(c.post("/v1/galleries/visitors/faces/identify", files={"image": a1}))["identity"] == "bob"

    # thresholds: each gallery answers with its own calibration
    staff = c.post("/v1/galleries/staff/faces/identify", files={"image": a1}).json()
    visitors = c.post("/v1/galleries/visitors/faces/identify", files={"image": a1}).json()
    assert staff["threshold"] == pytest.approx(0.25) and "FPR 0.001" in staff["threshold_origin"]
    assert visitors["threshold"] == pytest.approx(0.6) and "FPR 0.01" in visitors["threshold_origin"]
    for name, t in (("staff", 0.25), ("visitors", 0.6)):
        v = c.post("/v1/faces/verify", files={"image_a": a0, "image_b": b0}, data={"gallery": name}).json()
        assert v["threshold"] == pytest.approx(t) and v["same"] == (v["score"] >= t), v
        assert c.post(f"/v1/galleries/{name}/faces/verify",
                      files={"image_a": a0, "image_b": b0}).json()["threshold"] == pytest.approx(t)
    # several galleries, none the default: /v1/faces names the way out; verify falls back to the model's threshold
    r = c.get("/v1/faces")
    assert r.status_code == 404 and "/v1/galleries/NAME/faces" in r.json()["error"]
    v = c.post("/v1/faces/verify", files={"image_a": a0, "image_b": a0})
    assert v.status_code == 200 and v.json()["threshold"] is None and "no gallery" in v.json()["threshold_origin"]
    r = c.post("/v1/galleries/staff/faces/verify", files={"image_a": a0, "image_b": b0}, data={"gallery": "visitors"})
    assert r.status_code == 400 and "unknown field 'gallery'" in r.json()["error"]  # the path names the gallery

    # GET /v1/galleries: name, backend, size, threshold and origin, the model guard of each
    rows = {g["name"]: g for g in c.get("/v1/galleries").json()["galleries"]}
    name = Embedder(tiny_face_model).name
    assert set(rows) == {"staff", "visitors"}
    assert (rows["staff"]["identities"], rows["staff"]["templates"]) == (1, 2)
    assert (rows["visitors"]["identities"], rows["visitors"]["templates"]) == (1, 1)
    assert rows["staff"]["threshold"] == pytest.approx(0.25) and rows["visitors"]["threshold"] == pytest.approx(0.6)
    assert "calibrated on this gallery" in rows["visitors"]["threshold_origin"]
    for row in rows.values():
        assert row["backend"] == "milvus" and row["default"] is False
        assert row["model"] == {"name": name, "dim": 64, "metric": "cosine"}

    # erasing is per gallery too
    r = c.delete("/v1/galleries/visitors/faces", params={"identity": "alice"})
    assert r.status_code == 404 and "'visitors'" in r.json()["error"]
    assert c.delete("/v1/galleries/staff/faces/alice").json() == {"identity": "alice", "removed": 2}
    assert c.get("/v1/galleries/staff/faces").json() == {"identities": [], "total": 0, "offset": 0}
    assert [i["identity"] for i in c.get("/v1/galleries/visitors/faces").json()["identities"]] == ["bob"]

    # the open endpoints give totals only: no gallery name reaches /metrics or /healthz
    metrics = c.get("/metrics").text
    assert "visrec_gallery_templates 1.0" in metrics and "visitors" not in metrics and "staff" not in metrics
    assert c.get("/healthz").json()["gallery_templates"] == 1

    # the model guard is each collection's own: a third collection of another model in the same file
    other = open_gallery("milvus", uri=str(db), collection="contractors", model_name="other-model", dim=64)
    other.enroll("eve", np.eye(1, 64, dtype=np.float32), model_name="other-model")
    other.close()
    with pytest.raises(GalleryMismatchError, match="'contractors'.*other-model"):
        create_app(ServeConfig(faces={**two_galleries(tiny_face_model, db), "galleries": {
            **two_galleries(tiny_face_model, db)["galleries"],
            "contractors": {"backend": "milvus", "uri": str(db), "collection": "contractors"}}}))
    again = TestClient(create_app(ServeConfig(faces=two_galleries(tiny_face_model, db))))  # the other two still open
    assert [i["identity"] for i in again.get("/v1/galleries/visitors/faces").json()["identities"]] == ["bob"]
    with pytest.raises(GalleryMismatchError, match="other-model"):
        open_gallery("milvus", uri=str(db), collection="visitors", model_name="other-model", dim=64)
    kept = open_gallery("milvus", uri=str(db), collection="contractors")
    assert kept.info["model_name"] == "other-model" and [r["identity"] for r in kept.list()] == ["eve"]
    kept.close()


def test_unknown_and_malformed_gallery_names_are_a_404_naming_them(tiny_face_model, tmp_path):
    c = TestClient(create_app(ServeConfig(faces=two_galleries(tiny_face_model, tmp_path / "g.db"))))
    r = c.get("/v1/galleries/nope/faces")
    assert r.status_code == 404 and "'nope'" in r.json()["error"]
    r = c.post("/v1/galleries/nope/faces/identify", files={"image": face_jpeg(1)})
    assert r.status_code == 404 and "'nope'" in r.json()["error"]
    r = c.post("/v1/galleries/nope/faces/enroll", data={"identity": "x"}, files={"image": face_jpeg(1)})
    assert r.status_code == 404 and "'nope'" in r.json()["error"]
    assert c.delete("/v1/galleries/nope/faces", params={"identity": "x"}).status_code == 404
    assert c.post("/v1/faces/verify", files={"image_a": face_jpeg(1), "image_b": face_jpeg(1)},
                  data={"gallery": "nope"}).status_code == 404
    long = "a" * 5000
    r = c.get(f"/v1/galleries/{long}/faces")
    assert r.status_code == 404 and len(r.json()["error"]) < 300  # the name is echoed, bounded
    r = c.get("/v1/galleries/bad.name/faces")
    assert r.status_code == 404 and "'bad.name'" in r.json()["error"]


# --- API keys restricted to galleries -------------------------------------------------------------------------
def test_a_key_restricted_to_one_gallery_is_refused_on_the_other_and_sees_only_its_own(tiny_face_model, tmp_path,
                                                                                       monkeypatch, caplog):
    monkeypatch.setenv("VISREC_API_KEYS", ENV_KEY)
    caplog.set_level(logging.DEBUG)
    faces = two_galleries(tiny_face_model, tmp_path / "g.db", default_gallery="visitors")
    cfg = ServeConfig(host="0.0.0.0", faces=faces, api_keys=[ADMIN_KEY, {"key": STAFF_KEY, "galleries": ["staff"]}])
    c = TestClient(create_app(cfg))
    staff, admin, env = ({"X-API-Key": k} for k in (STAFF_KEY, ADMIN_KEY, ENV_KEY))
    img = face_jpeg(3)
    assert c.get("/v1/galleries").status_code == 401  # no key at all
    r = c.post("/v1/galleries/visitors/faces/enroll", data={"identity": "zed"}, files={"image": img}, headers=admin)
    assert r.status_code == 200, r.text

    # the restricted key: its own gallery works
    r = c.post("/v1/galleries/staff/faces/enroll", data={"identity": "sam"}, files={"image": face_jpeg(4)}, headers=staff)
    assert r.status_code == 200, r.text
    assert best(c.post("/v1/galleries/staff/faces/identify", files={"image": face_jpeg(4)}, headers=staff))["identity"] == "sam"
    assert [g["name"] for g in c.get("/v1/galleries", headers=staff).json()["galleries"]] == ["staff"]
    r = c.post("/v1/faces/verify", files={"image_a": img, "image_b": img}, data={"gallery": "staff"}, headers=staff)
    assert r.status_code == 200, r.text

    # ... every other gallery is a 403, through every route, the default /v1/faces (visitors here) included
    refused = [
        c.get("/v1/galleries/visitors/faces", headers=staff),
        c.post("/v1/galleries/visitors/faces/identify", files={"image": img}, headers=staff),
        c.post("/v1/galleries/visitors/faces/enroll", data={"identity": "mallory"}, files={"image": img}, headers=staff),
        c.post("/v1/galleries/visitors/faces/verify", files={"image_a": img, "image_b": img}, headers=staff),
        c.delete("/v1/galleries/visitors/faces", params={"identity": "zed"}, headers=staff),
        c.delete("/v1/galleries/visitors/faces/zed", headers=staff),
        c.get("/v1/faces", headers=staff),
        c.post("/v1/faces/identify", files={"image": img}, headers=staff),
        c.post("/v1/faces/enroll", data={"identity": "mallory"}, files={"image": img}, headers=staff),
        c.delete("/v1/faces", params={"identity": "zed"}, headers=staff),
        c.post("/v1/faces/verify", files={"image_a": img, "image_b": img}, headers=staff),
        c.post("/v1/faces/verify", files={"image_a": img, "image_b": img}, data={"gallery": "visitors"}, headers=staff),
        c.get("/v1/galleries/no-such-gallery/faces", headers=staff),  # 403, not 404: it learns no other name
    ]
    for r in refused:
        assert r.status_code == 403, (r.request.method, r.request.url, r.status_code, r.text)
        error = r.json()["error"]
        assert STAFF_KEY not in error and ADMIN_KEY not in error and "staff" not in error, error
    # nothing the refused requests asked for happened
    assert [i["identity"] for i in c.get("/v1/faces", headers=admin).json()["identities"]] == ["zed"]

    # unrestricted keys: the configured one and VISREC_API_KEYS's see both; an unknown gallery is a 404 for them
    for headers in (admin, env):
        rows = c.get("/v1/galleries", headers=headers).json()["galleries"]
        assert [(g["name"], g["default"]) for g in rows] == [("staff", False), ("visitors", True)]
        assert c.get("/v1/galleries/staff/faces", headers=headers).status_code == 200
        r = c.get("/v1/galleries/no-such-gallery/faces", headers=headers)
        assert r.status_code == 404 and "'no-such-gallery'" in r.json()["error"]
    # keys are never logged
    assert all(k not in caplog.text for k in (STAFF_KEY, ADMIN_KEY, ENV_KEY))


def test_key_restrictions_are_checked_at_start_without_naming_the_key(tiny_face_model, tmp_path, monkeypatch):
    monkeypatch.delenv("VISREC_API_KEYS", raising=False)
    faces = two_galleries(tiny_face_model, tmp_path / "g.db")
    with pytest.raises(ConfigError, match="api_keys entry 2: no face gallery named 'staf'") as err:
        ServeConfig(faces=faces, api_keys=[ADMIN_KEY, {"key": STAFF_KEY, "galleries": ["staf"]}]).check()
    assert STAFF_KEY not in str(err.value)
    with pytest.raises(ConfigError, match="api_keys entry 2 repeats") as err:
        ServeConfig(faces=faces, api_keys=[STAFF_KEY, {"key": STAFF_KEY, "galleries": ["staff"]}]).check()
    assert STAFF_KEY not in str(err.value)
    with pytest.raises(ConfigError, match="blank"):
        ServeConfig(faces=faces, api_keys=[{"key": "  ", "galleries": ["staff"]}]).check()
    monkeypatch.setenv("VISREC_API_KEYS", STAFF_KEY)  # the environment's keys are unrestricted: no mixing
    with pytest.raises(ConfigError, match="VISREC_API_KEYS") as err:
        ServeConfig(faces=faces, api_keys=[{"key": STAFF_KEY, "galleries": ["staff"]}]).check()
    assert STAFF_KEY not in str(err.value)
    yaml = tmp_path / "serve.yaml"
    yaml.write_text(f"faces:\n  model: {tiny_face_model}\napi_keys:\n  - {{key: k1, galleries: []}}\n")
    with pytest.raises(ConfigError, match="api_keys.0"):
        load_serve_config(yaml)


# --- the single-gallery form, unchanged ------------------------------------------------------------------------
def test_the_single_gallery_config_works_as_before_and_is_the_gallery_named_default(tiny_face_model, tmp_path):
    yaml = tmp_path / "serve.yaml"
    yaml.write_text(f"faces:\n  model: {tiny_face_model}\n  aligned: true\n"
                    f"  gallery: {{backend: milvus, uri: {tmp_path / 'g.db'}, collection: visrec_faces}}\n"
                    f"api_keys: [plain-key]\n")
    cfg = load_serve_config(yaml)
    assert list(cfg.faces.named_galleries()) == ["default"] and cfg.faces.default_gallery_name() == "default"
    c = TestClient(create_app(cfg))
    key = {"X-API-Key": "plain-key"}
    r = c.post("/v1/faces/enroll", data={"identity": "alice"}, files={"image": face_jpeg(1)}, headers=key)
    assert r.status_code == 200 and set(r.json()) == {"identity", "enrolled", "entries", "templates", "faces_found"}, r.text
    assert best(c.post("/v1/faces/identify", files={"image": face_jpeg(1)}, headers=key))["identity"] == "alice"
    assert c.get("/v1/faces", headers=key).json() == c.get("/v1/galleries/default/faces", headers=key).json()
    rows = c.get("/v1/galleries", headers=key).json()["galleries"]
    assert [(g["name"], g["default"], g["identities"]) for g in rows] == [("default", True, 1)]
    del c
    # stored where it always was: the configured collection itself
    g = open_gallery("milvus", uri=str(tmp_path / "g.db"), collection="visrec_faces")
    assert [r["identity"] for r in g.list()] == ["alice"]
    g.close()
    # no gallery given at all: still the one default gallery with the default settings
    bare = ServeConfig(faces={"model": str(tiny_face_model)}).faces.named_galleries()
    assert list(bare) == ["default"] and (bare["default"].backend, bare["default"].path) == ("faiss", "gallery.sqlite")


def test_the_default_gallery_is_a_durable_faiss_file_and_never_hides_an_older_milvus_lite_one(
        tiny_face_model, tmp_path, monkeypatch):
    """No backend named: a FAISS gallery in gallery.sqlite that survives a restart; a uri alone still means
    Milvus; and where the Milvus Lite gallery.db of the old default lies, the service refuses to start on an
    empty new gallery, naming the file and both ways out."""
    new, old = tmp_path / "new", tmp_path / "old"
    new.mkdir(), old.mkdir()
    monkeypatch.chdir(new)
    for _ in range(2):  # enrolled, then the service restarted (its shutdown releases the file): still there
        with TestClient(create_app(ServeConfig(faces={"model": str(tiny_face_model), "aligned": True}))) as c:
            r = c.post("/v1/faces/enroll", data={"identity": "alice"}, files={"image": face_jpeg(1)})
            assert r.status_code == 200 and r.json()["templates"] == 1, r.text
    assert (new / "gallery.sqlite").is_file() and not (new / "gallery.db").exists()
    g = open_gallery("faiss", path=new / "gallery.sqlite")
    assert [r["identity"] for r in g.list()] == ["alice"]
    g.close()
    assert ServeConfig(faces={"model": "m", "gallery": {"uri": "http://127.0.0.1:19530"}}).faces.gallery.backend == "milvus"

    monkeypatch.chdir(old)
    g = open_gallery("milvus", uri="gallery.db")  # what an earlier version wrote with no backend named
    g.close()
    with pytest.raises(ConfigError, match=r"(?s)'default' names no backend.*gallery\.db.*backend: milvus.*export"):
        create_app(ServeConfig(faces={"model": str(tiny_face_model), "aligned": True}))
    assert not (old / "gallery.sqlite").exists()
    for chosen in ({"backend": "milvus"}, {"backend": "faiss", "path": "gallery.sqlite"}):  # either choice starts
        app = create_app(ServeConfig(faces={"model": str(tiny_face_model), "aligned": True, "gallery": chosen}))
        with TestClient(app) as c:
            assert c.get("/v1/faces").status_code == 200


# --- config errors name the bad gallery --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["bad name", "x/y", "", "a" * 65, "-lead", "zoë", "a.b"])
def test_a_bad_gallery_name_is_a_config_error_naming_it(tiny_face_model, name):
    faces = {"model": str(tiny_face_model), "galleries": {name: {"backend": "faiss"}}}
    with pytest.raises(ConfigError, match="gallery name") as err:
        ServeConfig(faces=faces).check()
    assert repr(name)[:60] in str(err.value)


def test_galleries_sharing_milvus_collections_and_other_mistakes_are_refused_by_name(tiny_face_model, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = str(tiny_face_model)
    mk = lambda uri, coll: {"backend": "milvus", "uri": uri, "collection": coll}  # noqa: E731
    cases = {
        "same uri and collection": ({"staff": mk("g.db", "faces"), "visitors": mk("g.db", "faces")},
                                    "'staff' and 'visitors'"),
        "the same file spelt two ways": ({"a": mk("g.db", "faces"), "b": mk(str(tmp_path / "g.db"), "faces")},
                                         "'a' and 'b'"),
        "one's collections inside the other's": ({"a": mk("g.db", "x"), "b": mk("g.db", "x_templates")},
                                                 "'a' and 'b'"),
    }
    for case, (galleries, named) in cases.items():
        with pytest.raises(ConfigError, match="same Milvus collections") as err:
            ServeConfig(faces={"model": model, "galleries": galleries}).check()
        assert named in str(err.value), case
    # what is allowed: other files, other collections, in-memory galleries
    ok = {"a": mk("g.db", "faces"), "b": mk("h.db", "faces"), "c": mk("g.db", "faces2"),
          "d": {"backend": "faiss"}, "e": {"backend": "faiss"}}
    assert list(ServeConfig(faces={"model": model, "galleries": ok}).check().faces.named_galleries()) == list(ok)
    with pytest.raises(ConfigError, match="faces.galleries.default: the name 'default' is taken by faces.gallery"):
        ServeConfig(faces={"model": model, "gallery": {"backend": "faiss"},
                           "galleries": {"default": {"backend": "faiss"}}}).check()
    with pytest.raises(ConfigError, match="faces.default_gallery: no gallery named 'staf'"):
        ServeConfig(faces={"model": model, "default_gallery": "staf", "galleries": {"staff": {"backend": "faiss"}}}).check()
    yaml = tmp_path / "serve.yaml"
    yaml.write_text(f"faces:\n  model: {model}\n  galleries:\n    staff: {{collection: 'x;drop'}}\n")
    with pytest.raises(ConfigError, match=r"faces\.galleries\.staff\.collection"):
        load_serve_config(yaml)


# --- the CLI's --gallery ----------------------------------------------------------------------------------------
def test_the_cli_gallery_option_picks_the_gallery_it_acts_on(tiny_face_model, tmp_path):
    from typer.testing import CliRunner

    from visrec import cli
    from visrec.data.synth import write_face_dataset

    db = tmp_path / "g.db"
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"faces:\n  model: {tiny_face_model}\n  aligned: true\n  galleries:\n"
                   f"    staff: {{backend: milvus, uri: {db}, collection: staff}}\n"
                   f"    visitors: {{backend: milvus, uri: {db}, collection: visitors}}\n")
    people = tmp_path / "people"
    for name, identity in (("alice", 1), ("bob", 2)):
        (people / name).mkdir(parents=True)
        (people / name / "1.jpg").write_bytes(face_jpeg(identity))
    runner = CliRunner()

    def run(*args):
        return runner.invoke(cli.app, ["gallery", *args, "--config", str(cfg)])

    res = run("enroll", str(people), "--gallery", "staff")
    assert res.exit_code == 0 and "'staff'" in res.output, res.output
    res = run("list")  # several galleries, no default: which one must be said
    assert isinstance(res.exception, ConfigError) and "--gallery" in str(res.exception)
    assert "staff, visitors" in str(res.exception)
    res = run("list", "--gallery", "nope")
    assert isinstance(res.exception, ConfigError) and "'nope'" in str(res.exception)
    res = run("list", "--gallery", "staff")
    assert res.exit_code == 0 and "alice" in res.output and "bob" in res.output, res.output
    res = run("list", "--gallery", "visitors")
    assert res.exit_code == 0 and "alice" not in res.output and "'visitors'" in res.output, res.output

    res = run("export", "--gallery", "staff", "--out", str(tmp_path / "staff.npz"))
    assert res.exit_code == 0 and "2 templates" in res.output, res.output
    res = run("import", str(tmp_path / "staff.npz"), "--gallery", "visitors")
    assert res.exit_code == 0 and "imported 2 new" in res.output, res.output
    res = run("delete", "bob", "--gallery", "visitors")
    assert res.exit_code == 0 and "bob" in res.output, res.output
    res = run("delete", "bob", "--gallery", "visitors")
    assert res.exception is not None and "not enrolled in gallery 'visitors'" in str(res.exception)

    data = write_face_dataset(tmp_path / "cal", 8, 3, format="folder", seed=3)
    res = run("calibrate", "--data", str(data), "--target-fpr", "1e-2", "--gallery", "visitors")
    assert res.exit_code == 0 and "'visitors'" in res.output, res.output

    stores = {n: open_gallery("milvus", uri=str(db), collection=n) for n in ("staff", "visitors")}
    try:
        names = {n: [r["identity"] for r in g.list()] for n, g in stores.items()}
        assert names == {"staff": ["alice", "bob"], "visitors": ["alice"]}
        assert stores["staff"].threshold is None and stores["visitors"].threshold is not None  # calibrated: visitors only
    finally:
        for g in stores.values():
            g.close()

    # with a default declared, no --gallery means it
    cfg.write_text(cfg.read_text().replace("  galleries:\n", "  default_gallery: visitors\n  galleries:\n"))
    res = run("list")
    assert res.exit_code == 0 and "'visitors'" in res.output and "bob" not in res.output, res.output


def test_cli_errors_for_a_bad_gallery_exit_2_on_stderr(tiny_face_model, tmp_path, monkeypatch, capsys):
    from visrec import cli

    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"faces:\n  model: {tiny_face_model}\n  gallery: {{backend: faiss}}\n")
    monkeypatch.setattr(sys, "argv", ["visrec", "gallery", "list", "--config", str(cfg), "--gallery", "staff"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = " ".join(capsys.readouterr().err.split())  # the console wraps lines at its width
    assert exit_.value.code == 2 and "no face gallery named 'staff'" in err and "declared: default" in err


def test_the_service_sets_one_intra_op_thread_per_request_worker(tmp_path, tiny_face_model, monkeypatch):
    """Threads are set deliberately by `visrec serve`: the config's, else cores / max_concurrent (at least 1), for
    torch, FAISS and every ONNX Runtime session opened after; building an app alone changes nothing."""
    import faiss
    import torch
    import uvicorn

    from visrec import _onnx
    from visrec.serve import app as app_module
    from visrec.serve.config import load_serve_config

    # everything serve() does but serving: it takes its address (port 0 below), loads, and hands both to uvicorn
    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets: setattr(server, "started", True))
    before = (torch.get_num_threads(), faiss.omp_get_max_threads(), _onnx.DEFAULT_THREADS[0])
    try:
        for extra, want in (("threads: 3\n", 3), ("limits: {max_concurrent: 64}\n", 1)):
            cfg = tmp_path / "serve.yaml"
            cfg.write_text(f"{extra}port: 0\nfaces:\n  model: {tiny_face_model}\n  aligned: true\n"
                           "  gallery: {backend: faiss}\n")
            now = (torch.get_num_threads(), faiss.omp_get_max_threads(), _onnx.DEFAULT_THREADS[0])
            app_module.create_app(load_serve_config(cfg))
            assert (torch.get_num_threads(), faiss.omp_get_max_threads(), _onnx.DEFAULT_THREADS[0]) == now
            app_module.serve(load_serve_config(cfg))
            assert (torch.get_num_threads(), faiss.omp_get_max_threads(), _onnx.DEFAULT_THREADS[0]) == (want,) * 3
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])
        _onnx.set_default_threads(before[2])


def test_index_and_consistency_settings_reach_each_gallery(tiny_face_model, tmp_path):
    from visrec.serve.pipeline import open_configured_galleries

    cfg = ServeConfig.model_validate({"faces": {"model": str(tiny_face_model), "aligned": True, "galleries": {
        "ann": {"backend": "faiss", "index": "HNSW32", "search_params": {"efSearch": 40}},
        "ivf": {"backend": "milvus", "uri": str(tmp_path / "g.db"), "collection": "ivf", "index": "IVF_FLAT",
                "index_params": {"nlist": 8}, "search_params": {"nprobe": 2}, "consistency": "Strong"}}}})
    embedder = Embedder(tiny_face_model)
    galleries = open_configured_galleries(cfg.faces, embedder)
    try:
        assert galleries["ann"].index_spec == "HNSW32" and galleries["ann"].search_params == {"efSearch": 40}
        assert galleries["ivf"].index == {"index": "IVF_FLAT", "params": {"nlist": 8}}
        assert galleries["ivf"].client._consistency == "Strong"
    finally:
        for g in galleries.values():
            g.close()
    with pytest.raises(ValidationError, match="index_params: a setting a faiss gallery does not use .* factory string"):
        ServeConfig.model_validate({"faces": {"model": str(tiny_face_model), "aligned": True, "gallery": {
            "backend": "faiss", "index": "HNSW32", "index_params": {"M": 8}}}})


def test_a_durable_faiss_gallery_file_belongs_to_one_gallery(tiny_face_model, tmp_path):
    for other in ({"backend": "faiss", "path": str(tmp_path / "g.sqlite")},
                  {"backend": "milvus", "uri": str(tmp_path / "g.sqlite"), "collection": "x"}):
        cfg = ServeConfig.model_validate({"faces": {"model": str(tiny_face_model), "galleries": {
            "a": {"backend": "faiss", "path": str(tmp_path / "g.sqlite")}, "b": other}}})
        with pytest.raises(ConfigError, match="'a' and 'b' use the same file"):
            cfg.faces.named_galleries()
