"""The web page at / driven in headless Chromium (Debian's chromium + chromium-driver, installed by
scripts/setup-test-env.sh): enroll a face, identify another photo of the same person, see the match and
score on the page, and the landmark overlay drawn; the gallery picker sends enroll / identify / list to the
gallery picked."""

import shutil
import socket
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the service needs visrec[serve]")
selenium = pytest.importorskip("selenium", reason="the browser test needs selenium (visrec[dev])")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="Debian's chromium and chromium-driver are not installed "
                                       "(scripts/setup-test-env.sh installs them where apt-get runs as root)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_face_model):
    import torch
    import uvicorn

    from visrec.data.images import encode_jpeg
    from visrec.data.synth import render_face
    from visrec.models import build_backbone
    from visrec.serve.app import create_app
    from visrec.serve.config import ServeConfig
    from visrec.train.checkpoint import atomic_save

    d = tmp_path_factory.mktemp("browser")
    torch.manual_seed(0)
    lm = build_backbone("pfld", num_points=106, width_mult=0.25).eval()
    atomic_save({"model_config": {"name": "pfld", "num_points": 106, "width_mult": 0.25},
                 "backbone": lm.state_dict()}, d / "lm" / "model.pt")
    photos = {}
    for name, (identity, k) in {"alice-1": (11, 0), "alice-2": (11, 1), "bob": (12, 0)}.items():
        img, _ = render_face(identity, np.random.default_rng([identity, k]), difficulty=0.1)
        photos[name] = d / f"{name}.jpg"
        photos[name].write_bytes(encode_jpeg(img))
    port = free_port()
    cfg = ServeConfig(port=port, faces={"model": str(tiny_face_model), "aligned": True,
                                        "galleries": {"default": {"backend": "faiss"}, "visitors": {"backend": "faiss"}}},
                      landmarks={"model": str(d / "lm")})
    srv = uvicorn.Server(uvicorn.Config(create_app(cfg), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started and time.time() < deadline:
        time.sleep(0.1)
    assert srv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}", photos
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def wait_text(driver, element_id, predicate, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = driver.find_element("id", element_id).text
        if predicate(text):
            return text
        time.sleep(0.1)
    raise AssertionError(f"#{element_id} never matched; it shows {text!r}")


def test_enroll_identify_and_landmarks_in_the_page(server, browser):
    url, photos = server
    browser.get(url + "/")
    assert browser.find_element("tag name", "h1").text == "visrec"
    for name in ("alice", "bob"):
        browser.find_element("id", "enroll-name").clear()
        browser.find_element("id", "enroll-name").send_keys(name)
        browser.find_element("id", "enroll-file").send_keys(str(photos["alice-1" if name == "alice" else "bob"]))
        browser.find_element("id", "enroll-go").click()
        wait_text(browser, "enroll-out", lambda t, n=name: f"enrolled {n}" in t)
    browser.find_element("id", "identify-file").send_keys(str(photos["alice-1"]))
    browser.find_element("id", "identify-go").click()
    assert wait_text(browser, "identify-best", lambda t: t != "") == "alice (below threshold)"  # none calibrated
    assert float(wait_text(browser, "identify-score", lambda t: t != "")) == pytest.approx(1.0, abs=1e-3)

    browser.find_element("id", "enroll-name").clear()  # an error is shown on the page, not swallowed
    browser.find_element("id", "enroll-go").click()
    assert "identity" in wait_text(browser, "enroll-out", lambda t: "identity" in t)

    browser.find_element("id", "lm-file").send_keys(str(photos["bob"]))
    browser.find_element("id", "lm-go").click()
    assert wait_text(browser, "lm-out", lambda t: "points" in t) == "106 points"
    deadline = time.time() + 10
    while browser.find_element("id", "lm-canvas").get_attribute("width") == "10" and time.time() < deadline:
        time.sleep(0.1)
    assert browser.find_element("id", "lm-canvas").get_attribute("width") == "112"  # the overlay is drawn


def test_the_gallery_picker_sends_enroll_identify_and_list_to_the_picked_gallery(server, browser):
    from selenium.webdriver.support.ui import Select

    url, photos = server
    browser.get(url + "/")
    label = browser.find_element("css selector", "label[for=gallery]")
    assert label.text.strip() and browser.find_element("id", "gallery").tag_name == "select"
    deadline = time.time() + 30
    while len(Select(browser.find_element("id", "gallery")).options) < 2:  # filled from GET /v1/galleries
        assert time.time() < deadline, "the gallery picker was never filled"
        time.sleep(0.1)
    picker = Select(browser.find_element("id", "gallery"))
    assert [o.get_attribute("value") for o in picker.options] == ["default", "visitors"]
    assert picker.first_selected_option.get_attribute("value") == "default"  # the default one is picked
    picker.select_by_value("visitors")
    browser.find_element("id", "enroll-name").clear()
    browser.find_element("id", "enroll-name").send_keys("carol")
    browser.find_element("id", "enroll-file").send_keys(str(photos["bob"]))
    browser.find_element("id", "enroll-go").click()
    wait_text(browser, "enroll-out", lambda t: "enrolled carol" in t)
    browser.find_element("id", "list-go").click()
    assert wait_text(browser, "list-out", lambda t: t != "") == "carol (1 template(s))"  # visitors only
    browser.find_element("id", "identify-file").send_keys(str(photos["bob"]))
    browser.find_element("id", "identify-go").click()
    assert wait_text(browser, "identify-best", lambda t: t.startswith("carol")) == "carol (below threshold)"
    Select(browser.find_element("id", "gallery")).select_by_value("default")
    browser.find_element("id", "list-go").click()
    listed = wait_text(browser, "list-out", lambda t: "carol" not in t and t != "")
    assert "carol" not in listed  # the default gallery never saw carol
    import httpx

    visitors = httpx.get(url + "/v1/galleries/visitors/faces").json()["identities"]
    assert [i["identity"] for i in visitors] == ["carol"]


def test_docs_and_redoc_work_offline_and_docs_uploads_an_image(server, browser):
    """/docs and /redoc load their scripts from the server itself (no CDN: this machine has no internet), and
    Swagger UI's own form for a POST route takes an image file and gets the route's answer."""
    from selenium.webdriver.common.by import By

    url, photos = server
    browser.get(url + "/docs")
    scripts = [s.get_attribute("src") for s in browser.find_elements(By.TAG_NAME, "script") if s.get_attribute("src")]
    assert scripts and all(s.startswith(url) for s in scripts), scripts
    deadline = time.time() + 30
    while not browser.find_elements(By.ID, "operations-landmarks-landmarks_v1_landmarks_post"):
        assert time.time() < deadline, "Swagger UI did not render the operations"
        time.sleep(0.2)
    op = browser.find_element(By.ID, "operations-landmarks-landmarks_v1_landmarks_post")
    op.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    wait_for = lambda css: next(iter(_wait(browser, op, css)))  # noqa: E731
    wait_for(".try-out__btn").click()
    wait_for("input[type=file]").send_keys(str(photos["bob"]))
    wait_for(".execute").click()
    status = wait_for(".live-responses-table .response .response-col_status")
    assert status.text.strip().startswith("200"), status.text
    body = wait_for(".live-responses-table .microlight").text
    assert '"points"' in body and body.count("[") > 100, body[:200]  # 106 (x, y) pairs

    browser.get(url + "/redoc")
    deadline = time.time() + 30
    while "/v1/faces/identify" not in browser.find_element(By.TAG_NAME, "body").text:
        assert time.time() < deadline, "ReDoc did not render the API"
        time.sleep(0.2)


def _wait(browser, root, css, timeout=30):
    from selenium.webdriver.common.by import By

    deadline = time.time() + timeout
    while True:
        found = [e for e in root.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()]
        if found:
            return found
        assert time.time() < deadline, f"no visible {css!r} in Swagger UI"
        time.sleep(0.2)
