"""The service under a hostile client: names reach no query, rejected writes never come back (also after a
restart), every request is bounded while it streams, /metrics stays parseable, blank keys are refused."""

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the service needs visrec[serve]")
pytest.importorskip("pymilvus", reason="the Milvus gallery needs visrec[serve]")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from conftest import free_port, save_tiny_landmark_model, wait_healthy  # noqa: E402
from visrec.data.images import encode_jpeg  # noqa: E402
from visrec.data.synth import render_face  # noqa: E402
from visrec.errors import ConfigError  # noqa: E402
from visrec.serve.app import create_app  # noqa: E402
from visrec.serve.config import ServeConfig  # noqa: E402

HOSTILE = ["O'Brien", "x','victim", "zz'] or identity like '%' or identity in ['yy", 'a"b', "back\\slash",
           "a/b", "/lead/slash", "50%", "日本語 😀", "?q=1&x#frag", "[/]"]


def face_jpeg(identity: int, k: int = 0) -> bytes:
    img, _ = render_face(identity, np.random.default_rng([identity, k]), difficulty=0.1)
    return encode_jpeg(img)


def milvus_config(model, tmp_path, **kw):
    return ServeConfig(faces={"model": str(model), "aligned": True,
                              "gallery": {"backend": "milvus", "uri": str(tmp_path / "g.db")}}, **kw)


def png_header(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def test_hostile_names_are_enrolled_listed_identified_and_erased_by_every_route(tiny_face_model, tmp_path):
    c = TestClient(create_app(milvus_config(tiny_face_model, tmp_path)))
    r = c.post("/v1/faces/enroll", data={"identity": "victim", "metadata": '{"secret": 1}'}, files={"image": face_jpeg(0)})
    assert r.status_code == 200, r.text
    for i, name in enumerate(HOSTILE, start=1):
        r = c.post("/v1/faces/enroll", data={"identity": name}, files={"image": face_jpeg(i)})
        assert r.status_code == 200 and r.json()["identity"] == name, (name, r.text)
        best = c.post("/v1/faces/identify", files={"image": face_jpeg(i)}).json()["faces"][0]["matches"][0]
        assert best["identity"] == name and best["score"] == pytest.approx(1.0, abs=1e-4)
    rows = {r["identity"]: r for r in c.get("/v1/faces").json()["identities"]}
    assert set(rows) == set(HOSTILE) | {"victim"} and rows["victim"]["metadata"] == {"secret": 1}
    for i, name in enumerate(HOSTILE):
        if i % 2:  # the query form takes any name
            r = c.delete("/v1/faces", params={"identity": name})
        else:  # the path form, percent-encoded ('/' included)
            r = c.delete("/v1/faces/" + urllib.parse.quote(name, safe=""))
        assert r.status_code == 200 and r.json() == {"identity": name, "removed": 1}, (name, r.text)
    assert [r["identity"] for r in c.get("/v1/faces").json()["identities"]] == ["victim"]
    assert c.delete("/v1/faces", params={"identity": "nobody"}).status_code == 404
    assert c.delete("/v1/faces").status_code == 400  # no name given
    assert c.post("/v1/faces/enroll", data={"identity": "tab\there"}, files={"image": face_jpeg(1)}).status_code == 400


def test_a_rejected_enrollment_is_never_found_even_after_a_restart(tiny_face_model, tmp_path):
    cfg = milvus_config(tiny_face_model, tmp_path)
    c = TestClient(create_app(cfg))
    big = json.dumps({"note": "x" * 70_000})
    r = c.post("/v1/faces/enroll", data={"identity": "too much", "metadata": big}, files={"image": face_jpeg(1)})
    assert r.status_code == 422 and "limit" in r.json()["error"]
    r = c.post("/v1/faces/enroll", data={"identity": "inf", "metadata": '{"x": Infinity}'}, files={"image": face_jpeg(2)})
    assert r.status_code == 400 and "finite" in r.json()["error"]
    for k in (1, 2):
        assert c.post("/v1/faces/identify", files={"image": face_jpeg(k)}).json()["faces"][0]["matches"] == []
    assert c.get("/v1/faces").json()["identities"] == []
    c = TestClient(create_app(cfg))
    assert c.get("/v1/faces").json()["identities"] == [] and c.get("/healthz").json()["gallery_templates"] == 0


def test_images_and_pixels_per_request_are_bounded(tiny_face_model, tmp_path):
    c = TestClient(create_app(milvus_config(tiny_face_model, tmp_path, limits={"max_images": 3,
                                                                             "max_request_pixels": 30_000_000})))
    img = face_jpeg(1)
    r = c.post("/v1/faces/enroll", json={"identity": "a", "images": [base64.b64encode(img).decode()] * 4})
    assert r.status_code == 413 and "limits.max_images" in r.json()["error"]
    for n in (4, 9):  # at the limit + 1 and well above (the multipart parser's own bound)
        r = c.post("/v1/faces/enroll", data={"identity": "a"}, files=[("image", img)] * n)
        assert r.status_code == 413 and "limits.max_images" in r.json()["error"], r.text
    r = c.post("/v1/faces/enroll", data={"identity": "a"}, files=[("image", png_header(4000, 4000))] * 2)
    assert r.status_code == 413 and "limits.max_request_pixels" in r.json()["error"]
    assert c.get("/v1/faces").json()["identities"] == []
    r = c.post("/v1/faces/enroll", data={"identity": "a"}, files=[("image", face_jpeg(k)) for k in (1, 2, 3)])
    assert r.status_code == 200 and r.json()["templates"] == 3, r.text  # at the limit


def test_non_finite_numbers_anywhere_in_a_request_are_a_400(tiny_face_model, tmp_path):
    c = TestClient(create_app(milvus_config(tiny_face_model, tmp_path)))
    img = base64.b64encode(face_jpeg(1)).decode()
    for body in ('{"image": "%s", "top_k": NaN}', '{"image": "%s", "top_k": Infinity}',
                 '{"image": "%s", "top_k": -Infinity}'):
        r = c.post("/v1/faces/identify", content=(body % img).encode(), headers={"content-type": "application/json"})
        assert r.status_code == 400 and "finite" in r.json()["error"], r.text


def test_landmark_boxes_must_be_finite_and_on_the_image(tmp_path):
    save_tiny_landmark_model(tmp_path / "lm")
    c = TestClient(create_app(ServeConfig(landmarks={"model": str(tmp_path / "lm")})))
    img = face_jpeg(1)
    for box in ("inf,0,10,10", "0,0,nan,10", "1e400,0,1e401,10", "-50,-50,-10,-10", "5000,5000,6000,6000",
                "0,0,1e300,1e300", "-1e308,-1e308,1e308,1e308", "0,0,5e-324,5e-324", "10,10,10.5,40"):
        r = c.post("/v1/landmarks", files={"image": img}, data={"box": box})
        assert r.status_code == 400 and "box" in r.json()["error"], (box, r.text)
    r = c.post("/v1/landmarks", json={"image": base64.b64encode(img).decode(), "box": [0, 0, 50, 50]})
    assert r.status_code == 200 and len(r.json()["points"]) == 106


def route_templates(routes) -> set:
    """Every path template of the app, routers included (FastAPI keeps an included router as one entry)."""
    from starlette.routing import Mount

    out = set()
    for r in routes:
        if hasattr(r, "original_router"):
            out |= route_templates(r.original_router.routes)
        elif isinstance(r, Mount):
            out.add(r.path_format)  # /_docs-assets/{path}
        elif hasattr(r, "path"):
            out.add(r.path)
    return out


def test_metrics_are_labelled_by_route_template_and_parse_after_hostile_paths(tiny_face_model, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    c = TestClient(create_app(milvus_config(tiny_face_model, tmp_path)))
    c.post("/v1/faces/enroll", data={"identity": "a/b"}, files={"image": face_jpeg(1)})
    c.delete("/v1/faces/" + urllib.parse.quote("a/b", safe=""))
    # percent-encoded: the server sees '/x"} 1<newline>visrec_fake 9' and the like as the path
    for path in ["/x%22%7D%201%0Avisrec_fake%209", "/%0Aevil%7Ble=%221%22%7D", "/v1/nothing/%0A", "/" + "A" * 3000]:
        c.get(path)
    for i in range(3000):
        c.get(f"/junk/{i}")
    text = c.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    routes = {s.labels["route"] for f in families.values() for s in f.samples if "route" in s.labels}
    assert routes <= route_templates(c.app.routes) | {"unmatched"}, routes
    assert {"/v1/faces/enroll", "/v1/faces/{identity:path}", "unmatched"} <= routes
    assert "visrec_fake" not in families and len(text) < 20_000
    unmatched = [s for s in families["visrec_requests"].samples
                 if s.name == "visrec_requests_total" and s.labels["route"] == "unmatched"]
    assert sum(s.value for s in unmatched) == 3004


def test_blank_api_keys_are_refused_and_the_key_is_checked(tiny_face_model, monkeypatch):
    faces = {"model": str(tiny_face_model), "aligned": True, "gallery": {"backend": "faiss"}}
    monkeypatch.delenv("VISREC_API_KEYS", raising=False)
    for keys in ([""], ["  "], ["good", ""]):
        with pytest.raises(ConfigError, match="blank"):
            ServeConfig(host="0.0.0.0", api_keys=keys, faces=faces).check()
    monkeypatch.setenv("VISREC_API_KEYS", "good,,other")
    with pytest.raises(ConfigError, match="VISREC_API_KEYS"):
        ServeConfig(host="0.0.0.0", faces=faces).check()
    monkeypatch.setenv("VISREC_API_KEYS", "s3cret")
    c = TestClient(create_app(ServeConfig(host="0.0.0.0", faces=faces)))
    assert c.get("/v1/faces", headers={"X-API-Key": ""}).status_code == 401
    assert c.get("/v1/faces", headers=[("X-API-Key", "s3cret"), ("X-API-Key", "s3cret")]).status_code == 401
    assert c.get("/v1/faces", headers={"X-API-Key": "s3cret"}).status_code == 200


# --- a real server: the body is bounded while it streams ------------------------------------------------------
def _peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def _send_chunked(port: int, path: str, total: int, chunk: int, pause: float = 0.0, headers: str = "") -> tuple[bytes, int]:
    """POST ``total`` bytes as a chunked body (stops when the server answers or closes); (answer, bytes sent)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}"
              f"Transfer-Encoding: chunked\r\n\r\n".encode())
    s.settimeout(0.0 if not pause else None)
    sent, piece = 0, f"{chunk:x}\r\n".encode() + b"A" * chunk + b"\r\n"
    answer = b""
    try:
        while sent < total:
            s.setblocking(True)
            s.settimeout(10)
            s.sendall(piece)
            sent += chunk
            s.setblocking(False)
            try:
                answer += s.recv(65536)
            except BlockingIOError:
                pass
            if answer:
                break
            if pause:
                time.sleep(pause)
    except (BrokenPipeError, ConnectionResetError, TimeoutError, socket.timeout):
        pass
    s.setblocking(True)
    s.settimeout(10)
    try:
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            more = s.recv(65536)
            if not more:
                break
            answer += more
    except OSError:
        pass
    s.close()
    return answer, sent


def _raw_request(port: int, raw: bytes) -> bytes:
    """Send ``raw`` bytes as they are and read the answer until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(raw)
        answer = b""
        while more := s.recv(65536):
            answer += more
    return answer


@pytest.mark.slow
def test_a_1_gb_chunked_body_is_refused_while_streaming_and_a_slow_one_starves_nobody(tiny_face_model, tmp_path):
    port = free_port()
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"host: 127.0.0.1\nport: {port}\nfaces:\n  model: {tiny_face_model}\n  aligned: true\n"
                   f"  gallery: {{backend: faiss}}\nlimits: {{max_body_mb: 10, body_timeout_s: 4}}\n")
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "visrec.cli", "serve", "--config", str(cfg)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        img = face_jpeg(1)
        assert httpx.post(url + "/v1/faces/enroll", data={"identity": "a"}, files={"image": img}).status_code == 200
        before = _peak_rss_mib(proc.pid)
        answer, sent = _send_chunked(port, "/v1/faces/identify", total=1 << 30, chunk=1 << 20)
        assert answer.startswith(b"HTTP/1.1 413") and b"limits.max_body_mb" in answer, answer[:300]
        assert sent < 200 << 20, f"the server read {sent:,} bytes before refusing"
        growth = _peak_rss_mib(proc.pid) - before
        assert growth < 100, f"peak RSS grew by {growth:.0f} MiB for a refused body"

        # a client trickling its body in holds no worker: identify answers meanwhile; the trickle gets a 408
        slow: dict = {}
        t = threading.Thread(target=lambda: slow.update(
            zip(("answer", "sent"), _send_chunked(port, "/v1/faces/identify", total=1 << 20, chunk=64, pause=0.1))))
        t.start()
        time.sleep(0.5)
        r = httpx.post(url + "/v1/faces/identify", files={"image": img}, timeout=30)
        assert r.status_code == 200 and r.json()["faces"][0]["matches"][0]["identity"] == "a"
        assert t.is_alive(), "the slow upload should still be going when identify has answered"
        t.join(60)
        assert slow["answer"].startswith(b"HTTP/1.1 408") and b"limits.body_timeout_s" in slow["answer"], slow
        assert httpx.get(url + "/healthz", timeout=5).status_code == 200
        # requests the HTTP parser refuses before the app sees them answer in the service's JSON shape too
        for raw in (b"GET /v1/status?\xff HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"POST /v1/faces/identify HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
                    b"GET /v1/status HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n"):
            answer = _raw_request(port, raw)
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head.lower(), answer
            assert "not valid HTTP/1.1" in json.loads(body)["error"], answer
        # the service's own start-up lines reach its log (it configured none, so Python dropped every INFO line)
        started = (tmp_path / "server.log").read_text()
        assert f"visrec.serve.app: faces {tiny_face_model}: PyTorch: no model.onnx beside it" in started, started[-2000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


def test_gallery_cli_erases_any_name_and_says_when_it_is_not_enrolled(tiny_face_model, tmp_path, monkeypatch, capsys):
    from typer.testing import CliRunner

    from visrec import cli
    from visrec.index.gallery import open_gallery

    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"faces:\n  model: {tiny_face_model}\n  aligned: true\n"
                   f"  gallery: {{backend: milvus, uri: {tmp_path / 'g.db'}}}\n")
    g = open_gallery("milvus", uri=str(tmp_path / "g.db"), collection="visrec_faces")
    x = np.eye(3, 64, dtype=np.float32)
    for name, row in zip(["O'Brien/[/]", "[bold]keep", "x','victim"], x):
        g.enroll(name, row[None])
    g.close()
    runner = CliRunner()
    res = runner.invoke(cli.app, ["gallery", "delete", "O'Brien/[/]", "--config", str(cfg)])
    assert res.exit_code == 0 and "O'Brien/[/]" in res.output, res.output
    res = runner.invoke(cli.app, ["gallery", "list", "--config", str(cfg)])
    assert res.exit_code == 0 and "[bold]keep" in res.output and "O'Brien" not in res.output, res.output
    monkeypatch.setattr(sys, "argv", ["visrec", "gallery", "delete", "[/]nobody", "--config", str(cfg)])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2 and "'[/]nobody' is not enrolled" in capsys.readouterr().err


def with_tem_marker(jpeg: bytes) -> bytes:
    """The JPEG with a TEM marker (FF 01, no length) after its first segment: libjpeg and visrec's header parser
    step over it, Pillow cannot open the file."""
    cut = 4 + int.from_bytes(jpeg[4:6], "big")
    return jpeg[:cut] + b"\xff\x01" + jpeg[cut:]


def test_request_pixels_are_counted_by_the_decoders_own_header_parser(tiny_face_model, tmp_path):
    from visrec.serve.requests import header_pixels

    odd = with_tem_marker(face_jpeg(1))
    assert header_pixels(odd) == 112 * 112  # Pillow alone read nothing here, so such images counted 0 pixels
    c = TestClient(create_app(milvus_config(tiny_face_model, tmp_path, limits={"max_request_pixels": 30_000})))
    r = c.post("/v1/faces/enroll", data={"identity": "a"}, files=[("image", odd)] * 3)
    assert r.status_code == 413 and "limits.max_request_pixels" in r.json()["error"], r.text
    two = [("image", odd), ("image", with_tem_marker(face_jpeg(2)))]  # two photos: one photo twice is a 400
    r = c.post("/v1/faces/enroll", data={"identity": "a"}, files=two)
    assert r.status_code == 200, r.text  # the image itself is fine: libjpeg decodes it


def test_json_a_store_could_not_write_back_is_a_400_and_listing_keeps_working(tiny_face_model, tmp_path):
    c = TestClient(create_app(ServeConfig(faces={"model": str(tiny_face_model), "aligned": True,
                                                 "gallery": {"backend": "faiss"}})))
    img = base64.b64encode(face_jpeg(1)).decode()
    assert c.post("/v1/faces/enroll", json={"identity": "ok", "image": img}).status_code == 200
    bodies = {
        "lone surrogate in metadata": '{"identity": "a", "image": "%s", "metadata": {"x": "\\udc00"}}' % img,
        "lone surrogate in a name": '{"identity": "a\\ud800b", "image": "%s"}' % img,
        "a key twice": '{"identity": "a", "identity": "b", "image": "%s"}' % img,
        "nested too deeply": '{"identity": "a", "image": "%s", "metadata": %s}' % (img, "[" * 100_000),
        "a number beyond a float": '{"identity": "a", "image": "%s", "x": 1e400}' % img,
    }
    for why, body in bodies.items():
        r = c.post("/v1/faces/enroll", content=body.encode(), headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"], (why, r.text)
    r = c.post("/v1/faces/enroll", data={"identity": "a", "metadata": "[" * 100_000}, files={"image": face_jpeg(1)})
    assert r.status_code == 400 and "field 'metadata'" in r.json()["error"], r.text
    # valid JSON one level deeper than a gallery stores (what it stores must read back from its file)
    r = c.post("/v1/faces/enroll", data={"identity": "a", "metadata": '{"k": ' + "[" * 100 + "]" * 100 + "}"},
               files={"image": face_jpeg(1)})
    assert r.status_code == 400 and "nested more than 100 levels deep" in r.json()["error"], r.text
    r = c.post("/v1/faces/rename", content=b'{"identity": "ok", "to": "x\\udfff"}',
               headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    listed = c.get("/v1/faces")
    assert listed.status_code == 200 and [row["identity"] for row in listed.json()["identities"]] == ["ok"]
    # a name with "limit" in it and bad metadata is the client's mistake (400), not an over-limit one (422)
    r = c.post("/v1/faces/enroll", data={"identity": "limit", "metadata": "[1]"}, files={"image": face_jpeg(2)})
    assert r.status_code == 400 and "JSON object" in r.json()["error"], r.text


def test_fields_are_integers_sent_once_in_an_exact_content_type(tiny_face_model, tmp_path):
    c = TestClient(create_app(ServeConfig(faces={"model": str(tiny_face_model), "aligned": True,
                                                 "gallery": {"backend": "faiss"}})))
    img = face_jpeg(1)
    b64 = base64.b64encode(img).decode()
    for top_k in (True, 1.9, "1.9", "", [2], "9" * 4000):
        r = c.post("/v1/faces/identify", json={"image": b64, "top_k": top_k})
        assert r.status_code == 400 and "top_k" in r.json()["error"], (top_k, r.text)
        assert len(r.json()["error"]) < 200  # never the client's 4000 digits echoed back
    for top_k in (3, 3.0, "3"):
        assert c.post("/v1/faces/identify", json={"image": b64, "top_k": top_k}).status_code == 200, top_k
    # ASCII digits and nothing else (int() alone takes a sign, spaces around, '_' and other scripts' digits)
    for top_k in ("\u00b2", "\u2460", "5\u00b2", "\u0663", " 3", "+3", "1_0", "３"):
        r = c.post("/v1/faces/identify", data={"top_k": top_k}, files={"image": img})
        assert r.status_code == 400 and "top_k" in r.json()["error"], (top_k, r.text)
    # a misspelt or undeclared field is named, not silently the default (or a threshold the client thinks it set)
    r = c.post("/v1/faces/identify", data={"topk": "1", "threshold": "0.99"}, files={"image": img})
    assert r.status_code == 400 and "unknown field 'topk'" in r.json()["error"] and "top_k" in r.json()["error"]
    r = c.post("/v1/faces/identify", json={"image": b64, "threshold": 0.99})
    assert r.status_code == 400 and "unknown field 'threshold'" in r.json()["error"], r.text
    # a face box of 400 digits, or true for a coordinate, is a 400 naming it (was a 500: OverflowError)
    huge = '{"identity": "a", "image": "%s", "box": [%s, 0, 50, 50]}' % (b64, "9" * 400)
    r = c.post("/v1/faces/enroll", content=huge, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "'box'" in r.json()["error"], r.text
    r = c.post("/v1/faces/enroll", json={"identity": "a", "image": b64, "box": [True, 0, 50, 50]})
    assert r.status_code == 400 and "'box'" in r.json()["error"], r.text
    r = c.post("/v1/faces/enroll", data={"identity": ["first", "second"]}, files={"image": img})
    assert r.status_code == 400 and "'identity' is sent twice" in r.json()["error"], r.text
    assert c.get("/v1/faces").json()["identities"] == []
    body = json.dumps({"identity": "a", "image": b64}).encode()
    r = c.post("/v1/faces/enroll", content=body, headers={"content-type": "application/jsonp"})
    assert r.status_code == 415, r.text
    r = c.post("/v1/faces/enroll", content=body, headers={"content-type": "Application/JSON; charset=utf-8"})
    assert r.status_code == 200, r.text  # media types are case-insensitive
    r = c.post("/v1/faces/rename", data={"identity": "a", "to": "b"}, files={"x": b"1"})
    assert r.status_code == 400 and "takes no file" in r.json()["error"], r.text


def test_new_names_hold_no_invisible_formatting_characters(tiny_face_model, tmp_path):
    c = TestClient(create_app(ServeConfig(faces={"model": str(tiny_face_model), "aligned": True,
                                                 "gallery": {"backend": "faiss"}})))
    for i, name in enumerate(["alice\u200b", "\ufeff", "a\u202eb", "\u2066x\u2069"]):
        r = c.post("/v1/faces/enroll", data={"identity": name}, files={"image": face_jpeg(i)})
        assert r.status_code == 400 and "invisible formatting character" in r.json()["error"], (name, r.text)
    for i, name in enumerate(["\u0645\u06cc\u200c\u0631\u0648\u0632", "👩\u200d🔬"]):  # joiners inside real names
        r = c.post("/v1/faces/enroll", data={"identity": name}, files={"image": face_jpeg(10 + i)})
        assert r.status_code == 200, (name, r.text)
    r = c.post("/v1/faces/rename", data={"identity": "👩\u200d🔬", "to": "bob\u200b"})
    assert r.status_code == 400 and "U+200B" in r.json()["error"], r.text
    # invisible outside category Cf: Hangul fillers, the blank Braille pattern, the combining grapheme joiner, a
    # variation selector after a letter; and names that show nothing (a lone filler, a lone combining mark)
    for i, name in enumerate(["alice\u3164", "alice\u2800", "alice\u034f", "alice\ufe0f", "alice\u115f",
                              "alice\uffa0", "\u3164", "\u2800", "\u0301", "\u0301alice"]):
        r = c.post("/v1/faces/enroll", data={"identity": name}, files={"image": face_jpeg(20 + i)})
        assert r.status_code == 400 and "U+" in r.json()["error"], (name, r.text)
    for i, name in enumerate(["\u2764\ufe0f", "\u845b\U000e0100", "Zoe\u0308"]):  # selectors that pick a form
        r = c.post("/v1/faces/enroll", data={"identity": name}, files={"image": face_jpeg(40 + i)})
        assert r.status_code == 200, (name, r.text)
    # spaces around a name are refused on every path, not silently stripped into another person's name
    for name in (" bob", "bob\u00a0", "\u3000bob"):
        r = c.post("/v1/faces/enroll", data={"identity": name}, files={"image": face_jpeg(50)})
        assert r.status_code == 400 and "surrounded by spaces" in r.json()["error"], (name, r.text)
    assert not [n for n in (r["identity"] for r in c.get("/v1/faces").json()["identities"]) if "bob" in n]


def test_a_query_parameter_sent_twice_is_a_400_and_erases_nobody(tiny_face_model):
    c = TestClient(create_app(ServeConfig(faces={"model": str(tiny_face_model), "aligned": True,
                                                 "gallery": {"backend": "faiss"}})))
    for i, name in enumerate(("alice", "bob")):
        assert c.post("/v1/faces/enroll", data={"identity": name}, files={"image": face_jpeg(i)}).status_code == 200
    r = c.delete("/v1/faces?identity=alice&identity=bob")  # which one? a log reading the first saw alice
    assert r.status_code == 400 and "query parameter 'identity' is sent twice" in r.json()["error"], r.text
    assert c.get("/v1/faces?limit=2&limit=3").status_code == 400
    assert sorted(r["identity"] for r in c.get("/v1/faces").json()["identities"]) == ["alice", "bob"]
    assert c.get("/v1/faces?limit=1&&offset=1").json()["identities"][0]["identity"] == "bob"  # an empty pair is no name


def test_a_query_parameter_a_route_does_not_declare_is_a_400_and_changes_nothing(tiny_face_model):
    c = TestClient(create_app(ServeConfig(faces={"model": str(tiny_face_model), "aligned": True,
                                                 "gallery": {"backend": "faiss"}})))
    for i, name in enumerate(("bob", "Zed", "alice")):
        assert c.post("/v1/faces/enroll", data={"identity": name}, files={"image": face_jpeg(i)}).status_code == 200
    # a misspelt page size was the whole list; an erase with another parameter erased and ignored it
    r = c.get("/v1/faces?limt=1")
    assert r.status_code == 400 and r.json()["error"] == "unknown query parameter 'limt': this route takes limit, " \
                                                        "offset, q", r.text
    r = c.delete("/v1/faces?identity=bob&gallery=other")
    assert r.status_code == 400 and "'gallery'" in r.json()["error"] and "takes identity" in r.json()["error"]
    assert c.post("/v1/faces/identify?top_k=1", files={"image": face_jpeg(0)}).json()["error"] == \
        "unknown query parameter 'top_k': this route takes none"
    for path in ("/v1/galleries?verbose=1", "/v1/status?x=", "/v1/faces/thumbnail?identity=bob&size=9"):
        assert c.get(path).status_code == 400, path
    # what the service reads is what /docs declares for the route
    listed = c.get("/openapi.json").json()["paths"]["/v1/faces"]["get"]["parameters"]
    assert [(q["name"], q["in"], q["schema"]["type"]) for q in listed] == [
        ("limit", "query", "integer"), ("offset", "query", "integer"), ("q", "query", "string")]
    # page numbers are ASCII digits (int() alone took '1_0', '+2', ' 3' and other scripts' digits)
    for value in ("1_0", "+2", "%203", "%D9%A3", "%EF%BC%93", "2.0", "-0"):
        r = c.get(f"/v1/faces?limit={value}")
        assert r.status_code == 400 and "'limit'" in r.json()["error"], (value, r.text)
    # a name missing from the query is named as a query parameter
    assert c.delete("/v1/faces").json()["error"] == "query parameter 'identity' (a non-empty string) is required"
    # all of them or a page: one order, by name ignoring case (the whole list put 'Zed' before 'alice')
    whole = [r["identity"] for r in c.get("/v1/faces").json()["identities"]]
    paged = [r["identity"] for r in c.get("/v1/faces?limit=10").json()["identities"]]
    assert whole == paged == ["alice", "bob", "Zed"]


def test_a_json_body_in_another_charset_is_a_415(tiny_face_model):
    c = TestClient(create_app(ServeConfig(faces={"model": str(tiny_face_model), "aligned": True,
                                                 "gallery": {"backend": "faiss"}})))
    body = json.dumps({"identity": "Zoë", "image": base64.b64encode(face_jpeg(1)).decode()}, ensure_ascii=False)
    r = c.post("/v1/faces/enroll", content=body.encode(), headers={"content-type": "application/json; charset=latin-1"})
    assert r.status_code == 415 and "charset 'latin-1'" in r.json()["error"], r.text
    assert c.get("/v1/faces").json()["identities"] == []
    for charset, data in (("utf-16", body.encode("utf-16")), ("UTF-8", body.encode())):  # what json.loads reads
        r = c.post("/v1/faces/enroll", content=data, headers={"content-type": f"application/json; charset={charset}"})
        assert r.status_code == 200 and r.json()["identity"] == "Zoë", (charset, r.text)


def test_a_named_gallerys_verify_takes_no_gallery_field_and_status_shows_no_server_path(tiny_face_model, tmp_path):
    c = TestClient(create_app(ServeConfig(faces={
        "model": str(tiny_face_model), "aligned": True,
        "galleries": {"staff": {"backend": "faiss"}, "visitors": {"backend": "faiss"}}})))
    files = {"image_a": face_jpeg(1), "image_b": face_jpeg(1, 1)}
    assert c.post("/v1/galleries/staff/faces/verify", files=files).status_code == 200
    r = c.post("/v1/galleries/staff/faces/verify", data={"gallery": "staff"}, files=files)
    assert r.status_code == 400 and "unknown field 'gallery'" in r.json()["error"], r.text  # /docs lists none
    assert c.post("/v1/faces/verify", data={"gallery": "staff"}, files=files).status_code == 200
    faces = c.get("/v1/status").json()["faces"]
    # the contract's source was the full path the server loaded the model from
    assert (faces["model"], faces["contract"]["source"]) == (tiny_face_model.name, "model.pt")
    assert str(tiny_face_model.parent) not in json.dumps(c.get("/v1/status").json())


def test_serve_config_refuses_values_no_request_could_use(tiny_face_model, tmp_path, monkeypatch):
    from pydantic import ValidationError

    faces = {"model": str(tiny_face_model), "aligned": True, "gallery": {"backend": "faiss"}}
    with pytest.raises(ValidationError, match="top_k"):
        ServeConfig(faces={**faces, "top_k": 5000})
    with pytest.raises(ValidationError, match="top_k"):
        ServeConfig(products={"index": str(tmp_path), "top_k": 1001})
    for limits in ({"max_body_mb": float("inf")}, {"max_body_mb": float("nan")}, {"body_timeout_s": float("inf")}):
        with pytest.raises(ValidationError):
            ServeConfig(faces=faces, limits=limits)
    for key in (" k ", "k\n", "kéy", "a key"):
        with pytest.raises(ConfigError, match="api_keys entry 1: an API key must be printable ASCII"):
            ServeConfig(faces=faces, api_keys=[key]).keys()
    monkeypatch.setenv("VISREC_API_KEYS", "good,b\u00e4d")
    with pytest.raises(ConfigError, match="a key of VISREC_API_KEYS: an API key must be printable ASCII"):
        ServeConfig(faces=faces).keys()


def test_a_gallery_setting_the_backend_would_drop_is_refused_before_anything_opens(tiny_face_model, tmp_path,
                                                                                   monkeypatch):
    """uri/collection/consistency on a FAISS gallery, a path on a Milvus one, 'Faiss' for faiss and a search
    parameter the index never reads were accepted and ignored: the service ran another gallery than configured."""
    from pydantic import ValidationError

    from visrec.serve.pipeline import configured_pipeline, open_configured_galleries

    monkeypatch.chdir(tmp_path)

    def faces(gallery):
        return {"model": str(tiny_face_model), "aligned": True, "gallery": gallery}

    for gallery, said in (({"backend": "Faiss"}, "backend 'Faiss': expected one of faiss, milvus"),
                          ({"backend": "faiss", "uri": "zzz.db", "collection": "abc"},
                           "collection, uri: settings a faiss gallery does not use \\(milvus's\\)"),
                          ({"path": "g.sqlite", "consistency": "Strong"}, "consistency: a setting a faiss gallery"),
                          ({"backend": "faiss", "index_params": {"nlist": 4}}, "index_params: a setting a faiss"),
                          ({"backend": "milvus", "path": "g.sqlite"}, "path: a setting a milvus gallery does not use")):
        with pytest.raises(ValidationError, match=said):
            ServeConfig(faces=faces(gallery))
    cfg = ServeConfig(faces=faces({"backend": "faiss", "path": "g.sqlite", "index": "Flat",
                                   "search_params": {"nprobe": 4}}))
    embedder = configured_pipeline(cfg).embedder
    with pytest.raises(ConfigError, match="'nprobe' does not apply to index 'Flat': it takes none"):
        open_configured_galleries(cfg.faces, embedder)
    # a new Milvus Lite gallery with no index is exact: its search parameters are checked before the file is made
    cfg = ServeConfig(faces=faces({"backend": "milvus", "uri": "m.db", "search_params": {"nprobe": 4}}))
    with pytest.raises(ConfigError, match="Milvus FLAT search parameter 'nprobe'"):
        open_configured_galleries(cfg.faces, embedder)
    assert not (tmp_path / "g.sqlite").exists() and not (tmp_path / "zzz.db").exists()
    assert not (tmp_path / "m.db").exists()


def test_an_image_sent_as_text_is_named_as_such(tiny_face_model):
    c = TestClient(create_app(ServeConfig(faces={"model": str(tiny_face_model), "aligned": True,
                                                 "gallery": {"backend": "faiss"}})))
    r = c.post("/v1/faces/identify", data={"image": "photo.jpg"}, files={"other": b""})
    assert r.status_code == 400 and "unexpected file field 'other'" in r.json()["error"], r.text
    r = c.post("/v1/faces/identify", content=b'--b\r\nContent-Disposition: form-data; name="image"\r\n\r\nphoto.jpg\r\n--b--\r\n',
               headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 400 and "sent as text, not as a file" in r.json()["error"], r.text
    r = c.post("/v1/faces/identify", content=b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a\"\r\n\r\nab",
               headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 400 and not r.json()["error"].startswith("malformed multipart body: 400"), r.text
    # a body cut on another boundary than its Content-Type declares: said in those words, not only the parser's
    r = c.post("/v1/faces/identify", content=b'--b\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n3\r\n--b--\r\n',
               headers={"content-type": "multipart/form-data; boundary=ZZ"})
    assert r.status_code == 400 and "each start with the line '--ZZ'" in r.json()["error"], r.text


def multipart_body(*parts, boundary=b"vr"):
    """A multipart/form-data body of (headers, data) parts, bytes as given (no encoding applied)."""
    out = b"".join(b"--" + boundary + b"\r\n" + headers + b"\r\n\r\n" + data + b"\r\n" for headers, data in parts)
    return out + b"--" + boundary + b"--\r\n"


def text_part(name: bytes, value: bytes, extra: bytes = b""):
    return b'Content-Disposition: form-data; name="' + name + b'"' + extra, value


def test_form_text_that_is_not_utf8_is_a_400_naming_the_field(tiny_face_model, tmp_path):
    """Starlette's form parser reads a text field that is not UTF-8 as Latin-1 (b"Jos\\xe9" arrives as "José"),
    a URL-encoded body's raw bytes as Latin-1 and a bad percent escape as U+FFFD: each would be enrolled or
    renamed under another name. Here each is a 400 naming the field (or query parameter, or path), nothing is
    stored, and UTF-8 text arrives as sent in every form."""
    c = TestClient(create_app(ServeConfig(faces={"model": str(tiny_face_model), "aligned": True,
                                                 "gallery": {"backend": "faiss"}})))
    photo = (b'Content-Disposition: form-data; name="image"; filename="a.jpg"\r\nContent-Type: image/jpeg',
             face_jpeg(1))
    form = "multipart/form-data; boundary=vr"

    def enroll(*parts, ctype=form):
        return c.post("/v1/faces/enroll", content=multipart_body(*parts), headers={"content-type": ctype})

    def names():
        return [row["identity"] for row in c.get("/v1/faces").json()["identities"]]

    refused = {
        "Latin-1 bytes in a name": ((text_part(b"identity", b"Jos\xe9"), photo), "field 'identity' is not UTF-8"),
        "bad bytes in metadata": ((text_part(b"identity", b"a"), text_part(b"metadata", b'{"x": "\xff"}'), photo),
                                  "field 'metadata' is not UTF-8"),
        "a field name": ((text_part(b"identit\xe9", b"a"), photo), "field name is not UTF-8"),
        "a part declared Latin-1": ((text_part(b"identity", b"Jos\xe9", b"\r\nContent-Type: text/plain; "
                                               b"charset=iso-8859-1"), photo), "field 'identity' is declared as"),
        "_charset_ Latin-1": ((text_part(b"identity", b"Jos\xe9"), text_part(b"_charset_", b"ISO-8859-1"), photo),
                              "field '_charset_' names 'ISO-8859-1'"),
        "no closing boundary": ((text_part(b"identity", b"a"), photo), "closing boundary"),
    }
    for why, (parts, words) in refused.items():
        if why == "no closing boundary":
            body = multipart_body(*parts)[:-len(b"--vr--\r\n")]
            r = c.post("/v1/faces/enroll", content=body, headers={"content-type": form})
        else:
            r = enroll(*parts)
        assert r.status_code == 400 and words in r.json()["error"], (why, r.text)
    assert "b'Jos\\xe9'" in enroll(text_part(b"identity", b"Jos\xe9"), photo).json()["error"]  # the bytes, shown
    r = enroll(text_part(b"identity", b"Jos\xe9"), photo, ctype=form + "; charset=latin-1")
    assert r.status_code == 415 and "charset 'latin-1'" in r.json()["error"], r.text
    r = c.post("/v1/faces/enroll", content=b'{"identity": "Jos\xe9", "image": "%s"}' % base64.b64encode(face_jpeg(1)),
               headers={"content-type": "application/json"})
    assert r.status_code == 400 and "the JSON body is not UTF-8" in r.json()["error"], r.text
    assert names() == []
    # UTF-8 however declared (or not, or as ASCII, or in a _charset_ field): the name as sent
    ascii_part = b"\r\nContent-Type: text/plain; charset=us-ascii"
    for identity, ctype, extra, header in ((b"Jos\xc3\xa9", form, (), b""),
                                           ("Zoë".encode(), form + "; charset=UTF-8", (), b""),
                                           ("Łukasz".encode(), form, (text_part(b"_charset_", b"utf-8"),), b""),
                                           (b"Ana", form, (), ascii_part)):
        r = enroll(text_part(b"identity", identity, header), *extra, photo, ctype=ctype)
        assert r.status_code == 200 and r.json()["identity"] == identity.decode(), r.text
        c.delete("/v1/faces", params={"identity": identity.decode()})
    r = enroll(text_part(b"identity", "Jos\u00e9".encode(), b"\r\nContent-Type: text/plain; charset=utf-8"), photo)
    assert r.status_code == 200 and names() == ["José"], r.text
    # URL-encoded (rename): percent escapes and raw bytes are UTF-8 bytes; anything else is a 400 naming the field
    urlencoded = {"content-type": "application/x-www-form-urlencoded"}
    for body, field in ((b"identity=Jos%C3%A9&to=Al%FFce", "'to'"), (b"identity=Jos%E9&to=x", "'identity'"),
                        (b"identity=Jos%C3%A9&to=Jos\xe9e", "'to'")):
        r = c.post("/v1/faces/rename", content=body, headers=urlencoded)
        assert r.status_code == 400 and f"field {field} is not UTF-8" in r.json()["error"], (body, r.text)
    assert names() == ["José"]
    r = c.post("/v1/faces/rename", content="identity=Jos%C3%A9&to=Jöse".encode(), headers=urlencoded)
    assert r.status_code == 200 and r.json()["identity"] == "Jöse" and names() == ["Jöse"], r.text
    # the query and the path: no bad byte becomes U+FFFD on the way to a name
    r = c.delete("/v1/faces?identity=J%F6se")
    assert r.status_code == 400 and "query parameter 'identity' is not UTF-8" in r.json()["error"], r.text
    r = c.delete("/v1/faces/J%F6se")
    assert r.status_code == 400 and "path is not UTF-8" in r.json()["error"], r.text
    assert names() == ["Jöse"]
    assert c.delete("/v1/faces/J%C3%B6se").json()["removed"] == 1


def test_form_bounds_still_hold_with_the_strict_form_reader(tiny_face_model):
    """The limits the form reader had (text fields per body, files per body as limits.max_images) are still
    in force: 400 / 413 with the limit named, nothing enrolled."""
    c = TestClient(create_app(ServeConfig(faces={"model": str(tiny_face_model), "aligned": True,
                                                 "gallery": {"backend": "faiss"}}, limits={"max_images": 2})))
    r = c.post("/v1/faces/rename", data={f"f{i}": "1" for i in range(65)})
    assert r.status_code == 400 and "more than 64 text fields" in r.json()["error"], r.text
    r = c.post("/v1/faces/rename", content=b"&".join(b"f%d=1" % i for i in range(65)),
               headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and "more than 64 text fields" in r.json()["error"], r.text
    r = c.post("/v1/faces/enroll", data={"identity": "a"}, files=[("image", face_jpeg(k)) for k in range(3)])
    assert r.status_code == 413 and "more than 2 images" in r.json()["error"], r.text
    assert c.get("/v1/faces").json()["identities"] == []


def test_a_crowd_photo_aligns_one_face_where_one_is_used_and_at_most_max_faces(tiny_face_model):
    """A photo of many faces: enroll, verify and identify align the one face they use (each face is a landmark
    run where a landmark model gives the points); detect and identify with all_faces answer the largest
    ``limits.max_faces``, and ``faces_found`` counts them all."""
    from visrec.faces.detectors import Detection

    app = create_app(ServeConfig(faces={"model": str(tiny_face_model), "gallery": {"backend": "faiss"}},
                                 limits={"max_faces": 5}))
    pipe = app.state.visrec.state["faces"]
    five = np.array([[38, 52], [74, 52], [56, 72], [42, 92], [70, 92]], np.float32)

    def crowd(image):  # 150 faces, the first the largest (sizes 112 down to 38 px)
        return [Detection(np.array([0, 0, 112 - k // 2, 112 - k // 2], np.float32), 0.9, five * (1 - k / 224))
                for k in range(150)]

    pipe.detector, aligned = crowd, []
    real_face_at = pipe.face_at
    pipe.face_at = lambda image, box, points=None: aligned.append(box) or real_face_at(image, box, points)
    c = TestClient(app)
    img = face_jpeg(1)
    r = c.post("/v1/faces/enroll", data={"identity": "a"}, files={"image": img})
    assert r.status_code == 200 and r.json()["faces_found"] == [150] and len(aligned) == 1, r.text
    aligned.clear()
    r = c.post("/v1/faces/identify", files={"image": img})
    assert r.status_code == 200 and len(r.json()["faces"]) == 1 and r.json()["faces_found"] == 150
    assert len(aligned) == 1
    aligned.clear()
    r = c.post("/v1/faces/identify", data={"all_faces": "true"}, files={"image": img})
    assert len(r.json()["faces"]) == 5 == len(aligned) and r.json()["faces"][0]["box"] == [0, 0, 112, 112]
    aligned.clear()
    r = c.post("/v1/faces/detect", files={"image": img})
    assert r.json()["faces_found"] == 150 and len(r.json()["faces"]) == 5 == len(aligned)
    aligned.clear()
    assert c.post("/v1/faces/verify", files={"image_a": img, "image_b": img}).status_code == 200
    assert len(aligned) == 2
