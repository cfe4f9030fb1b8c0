"""The web console driven in headless Chromium (Debian's chromium + chromium-driver, installed by
scripts/setup-test-env.sh) on the real photos, with the service configured as a user of the dlib models would
(HOG detector, 68 points, ResNet; a durable gallery keeping thumbnails; a second gallery; a product index; an
API key). Every flow of the console: status, enroll from several photos (one face, no face, several faces with
a pick), the gallery view (thumbnail, search, rename, delete), identify on one face and on a group photo,
verify, landmarks with the JSON download, products; errors shown as the API's message; keyboard tabs; a phone
width; an accessibility check (axe-core from npm, installed by the set-up) with no serious violation; and no
request to any other host, the API key never in a URL.

Screenshots of each view go to ``test-artifacts/console/`` (the README shows them, copied to docs/img/)."""

import base64
import json
import shutil
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest

from conftest import free_port

pytest.importorskip("fastapi", reason="the service needs visrec[serve]")
selenium = pytest.importorskip("selenium", reason="the browser test needs selenium (visrec[dev])")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [pytest.mark.real_faces, pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="Debian's chromium and chromium-driver are not installed "
                                            "(scripts/setup-test-env.sh installs them where apt-get runs as root)")]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "console"
KEY = "console-test-key"
AXE = Path.home() / ".cache" / "visrec" / "tools" / "node_modules" / "axe-core" / "axe.min.js"


@pytest.fixture(scope="module")
def server(tmp_path_factory, faces_dir):
    import torch
    import uvicorn

    from visrec.data.images import encode_jpeg
    from visrec.data.synth_products import write_product_dataset
    from visrec.index.catalogue import IndexOptions, build_catalogue_index
    from visrec.models import build_backbone
    from visrec.serve.app import create_app
    from visrec.serve.config import ServeConfig

    d = tmp_path_factory.mktemp("console")
    write_product_dataset(d / "p", families=3, products_per_family=2, variants=2, queries_per_product=1, size=96)
    torch.manual_seed(0)
    build_catalogue_index(d / "p" / "catalogue", d / "idx", build_backbone("product", backbone="resnet18", dim=16),
                          {"name": "product", "backbone": "resnet18", "dim": 16}, IndexOptions(size=64))
    photos = {p.name: p for p in faces_dir.iterdir()}
    photos.update({p.name: p for p in (faces_dir.parent / "dlib-examples").glob("*.jpg")})
    blank = d / "blank-wall.jpg"
    blank.write_bytes(encode_jpeg(np.full((240, 320, 3), 200, np.uint8)))
    photos["blank-wall.jpg"] = blank
    photos["product-query.jpg"] = sorted((d / "p" / "query").glob("*.jpg"))[0]
    port = free_port()
    cfg = ServeConfig(port=port, api_keys=[KEY], faces={
        "model": "dlib-resnet", "detector": "dlib-hog", "landmarks": "dlib-68", "galleries": {
            "default": {"backend": "faiss", "path": str(d / "gallery.sqlite"), "thumbnails": str(d / "thumbs")},
            "visitors": {"backend": "faiss"}}},
        landmarks={"model": "dlib-68"}, products={"index": str(d / "idx"), "top_k": 4})
    srv = uvicorn.Server(uvicorn.Config(create_app(cfg), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started and time.time() < deadline:
        time.sleep(0.1)
    assert srv.started, "uvicorn did not start"
    yield {"url": f"http://127.0.0.1:{port}", "photos": photos, "thumbs": d / "thumbs", "downloads": d / "downloads"}
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser(server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1000"):
        opts.add_argument(arg)
    server["downloads"].mkdir(exist_ok=True)
    opts.add_experimental_option("prefs", {"download.default_directory": str(server["downloads"]),
                                           "download.prompt_for_download": False})
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.requested = []  # URLs collected from the performance log, test by test
    yield driver
    driver.quit()


def until(predicate, what: str, timeout: float = 60):
    deadline = time.time() + timeout
    while True:
        try:
            value = predicate()
        except Exception:  # noqa: BLE001 - an element not there yet
            value = None
        if value:
            return value
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.15)


def by_id(driver, element_id):
    return driver.find_element("id", element_id)


def text_of(driver, element_id) -> str:
    return by_id(driver, element_id).text


def tab(driver, name: str):
    by_id(driver, f"tab-{name}").click()
    until(lambda: by_id(driver, f"panel-{name}").is_displayed(), f"the {name} panel")


def choose(driver, input_id: str, *paths):
    field = by_id(driver, input_id)
    driver.execute_script("arguments[0].value = ''", field)  # a file input keeps what it held otherwise
    field.send_keys("\n".join(str(p) for p in paths))


def shot(driver, name: str):
    time.sleep(0.3)  # images decoded and laid out
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def collect_requests(driver):
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.requestWillBeSent":
            driver.requested.append(msg["params"]["request"]["url"])


DROP = """const [b64, name] = arguments;
const file = new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], name, {type: 'image/jpeg'});
const dt = new DataTransfer(); dt.items.add(file);
const zone = document.getElementById('drop');
for (const kind of ['dragover', 'drop']) zone.dispatchEvent(new DragEvent(kind, {dataTransfer: dt, bubbles: true, cancelable: true}));"""


def axe_check(driver, view: str):
    """axe-core on the page as shown: no violation of impact serious or critical."""
    if not AXE.is_file():
        pytest.fail(f"axe-core is not installed at {AXE}: run scripts/setup-test-env.sh (npm install axe-core)")
    driver.execute_script(AXE.read_text(encoding="utf-8"))
    result = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document, {resultTypes: ['violations']}).then(r => done(r.violations.map("
        "v => ({id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.map(n => n.target.join(' ')).slice(0, 5)}))))")
    serious = [v for v in result if v["impact"] in ("serious", "critical")]
    assert not serious, f"{view}: {json.dumps(serious, indent=1)}"


@pytest.fixture(scope="module")
def console(server, browser):
    """The console opened with the API key typed in (as a person does: into the key field)."""
    browser.get(server["url"] + "/")
    # without the key, the page shows the API's own refusal, not a blank page
    assert "API key" in until(lambda: text_of(browser, "global-error"), "the missing-key error")
    key = by_id(browser, "key")
    key.send_keys(KEY)
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
    until(lambda: not text_of(browser, "global-error") and by_id(browser, "tab-enroll").is_displayed(), "the tabs")
    assert browser.execute_script("return sessionStorage.getItem('visrec-api-key')") == KEY
    return browser


def test_status_shows_every_model_contract_gallery_and_limit(console, server):
    tab(console, "status")
    out = until(lambda: text_of(console, "status-out") if "Request limits" in text_of(console, "status-out") else "",
                "the status view")
    for expected in ("dlib-resnet", "face-embedding", "128-d, euclidean", "author", "300w68", "visitors",
                     "max_pixels", "catalogue images"):
        assert expected in out, (expected, out)
    rows = console.find_elements("css selector", "#status-galleries tbody tr")
    assert [r.find_element("css selector", "td").text for r in rows] == ["default (default)", "visitors"]
    shot(console, "status")
    axe_check(console, "status")


def test_enroll_several_photos_reports_each_and_a_face_is_picked_on_a_group_photo(console, server):
    p = server["photos"]
    tab(console, "enroll")
    by_id(console, "enroll-name").send_keys("Barack Obama")
    choose(console, "enroll-files", p["obama.jpg"], p["blank-wall.jpg"], p["2008_002506.jpg"])
    by_id(console, "enroll-go").click()
    cards = lambda: console.find_elements("css selector", "#enroll-results li")  # noqa: E731
    until(lambda: len(cards()) == 3 and all(c.get_attribute("data-result") for c in cards()), "three results")
    results = {c.get_attribute("data-file"): c.get_attribute("data-result") for c in cards()}
    assert results == {"obama.jpg": "enrolled", "blank-wall.jpg": "no-face", "2008_002506.jpg": "several-faces"}
    assert "enrolled as Barack Obama (1 template(s))" in cards()[0].text
    group = cards()[2]
    assert len(group.find_elements("css selector", "svg rect.pick")) >= 2  # every face boxed on the photo
    shot(console, "enroll")
    axe_check(console, "enroll")
    # the same group photo for another person: pick the second face
    by_id(console, "enroll-name").clear()
    by_id(console, "enroll-name").send_keys("Pat")
    choose(console, "enroll-files", p["2008_002506.jpg"])
    by_id(console, "enroll-go").click()
    until(lambda: len(cards()) == 1 and cards()[0].get_attribute("data-result") == "several-faces", "the face picker")
    picks = cards()[0].find_elements("css selector", ".picks button")
    assert [b.text for b in picks][:2] == ["Enroll face 1", "Enroll face 2"]
    picks[1].click()
    until(lambda: cards()[0].get_attribute("data-result") == "enrolled", "the picked face enrolled")
    assert "enrolled as Pat" in cards()[0].text
    # an API refusal is shown as the API's message
    by_id(console, "enroll-name").clear()
    by_id(console, "enroll-name").send_keys("x" * 201)
    choose(console, "enroll-files", p["obama2.jpg"])
    by_id(console, "enroll-go").click()
    until(lambda: len(cards()) == 1 and cards()[0].get_attribute("data-result") == "error", "the refusal")
    assert "longer than 200 characters" in cards()[0].text
    by_id(console, "enroll-name").clear()
    by_id(console, "enroll-go").click()
    assert "name" in until(lambda: text_of(console, "enroll-error"), "the page's own missing-name note")
    # a photo dropped on the drop zone (a real DragEvent carrying the file) is enrolled as a chosen one is
    by_id(console, "enroll-name").send_keys("Barack Obama")
    console.execute_script(DROP, base64.b64encode(p["obama3.jpg"].read_bytes()).decode(), "obama3.jpg")
    assert "1 photo(s) dropped" in text_of(console, "drop")
    by_id(console, "enroll-go").click()
    until(lambda: len(cards()) == 1 and cards()[0].get_attribute("data-result") == "enrolled", "the dropped photo")
    assert cards()[0].get_attribute("data-file") == "obama3.jpg" and "(2 template(s))" in cards()[0].text


def test_gallery_view_lists_searches_and_renames_with_thumbnails(console, server):
    tab(console, "gallery")
    rows = lambda: console.find_elements("css selector", "#people tbody tr[data-identity]")  # noqa: E731
    until(lambda: len(rows()) == 2, "two identities")
    assert [r.get_attribute("data-identity") for r in rows()] == ["Barack Obama", "Pat"]
    assert [r.find_elements("css selector", "td")[2].text for r in rows()] == ["2", "1"]  # templates
    thumb = rows()[0].find_element("css selector", "img.thumb")
    until(lambda: console.execute_script("return arguments[0].naturalWidth", thumb) > 0, "the thumbnail")
    assert "1-2 of 2" in text_of(console, "page-info")
    by_id(console, "gallery-q").send_keys("OBA")
    by_id(console, "gallery-q").submit()
    until(lambda: len(rows()) == 1 and rows()[0].get_attribute("data-identity") == "Barack Obama", "the search result")
    shot(console, "gallery")
    axe_check(console, "gallery")
    by_id(console, "gallery-q").clear()
    by_id(console, "gallery-q").submit()
    until(lambda: len(rows()) == 2, "both identities again")
    rows()[1].find_element("css selector", "button[aria-label='Rename Pat']").click()
    until(lambda: by_id(console, "rename-dialog").is_displayed(), "the rename dialog")
    by_id(console, "rename-to").clear()
    by_id(console, "rename-to").send_keys("Pat Doe")
    by_id(console, "rename-save").click()
    until(lambda: [r.get_attribute("data-identity") for r in rows()] == ["Barack Obama", "Pat Doe"], "the new name")


def test_identify_boxes_every_face_with_its_match_and_decision(console, server):
    p = server["photos"]
    tab(console, "identify")
    faces = lambda: console.find_elements("css selector", "#identify-faces li")  # noqa: E731
    choose(console, "identify-file", p["obama2.jpg"])
    by_id(console, "identify-go").click()
    until(lambda: faces(), "the identified face")
    assert faces()[0].get_attribute("data-identity") == "Barack Obama"
    assert faces()[0].get_attribute("data-verdict") == "accepted"
    assert "author" in text_of(console, "identify-threshold")  # where the threshold came from
    choose(console, "identify-file", p["biden.jpg"])
    by_id(console, "identify-go").click()
    until(lambda: faces() and faces()[0].get_attribute("data-verdict") == "rejected", "Biden rejected")
    choose(console, "identify-file", p["2008_002506.jpg"])
    by_id(console, "identify-go").click()
    until(lambda: len(faces()) >= 2, "every face of the group photo")
    boxes = console.find_elements("css selector", "#identify-photo svg rect")
    assert len(boxes) == len(faces())
    assert [f.get_attribute("data-verdict") for f in faces()].count("accepted") == 1  # Pat Doe, the face picked
    assert "Pat Doe" in [f.get_attribute("data-identity") for f in faces()]
    shot(console, "identify")
    axe_check(console, "identify")
    choose(console, "identify-file", p["blank-wall.jpg"])
    by_id(console, "identify-go").click()
    assert "no face found" in until(lambda: text_of(console, "identify-error"), "the no-face error")


def test_verify_shows_both_crops_score_decision_and_threshold(console, server):
    p = server["photos"]
    tab(console, "verify")
    choose(console, "verify-a", p["obama.jpg"])
    choose(console, "verify-b", p["obama3.jpg"])
    by_id(console, "verify-go").click()
    until(lambda: by_id(console, "verify-verdict").get_attribute("data-same") == "true", "same person")
    assert text_of(console, "verify-verdict").startswith("Same person: score -0.")
    crops = console.find_elements("css selector", "#verify-pair img.crop-img")
    until(lambda: len(crops) == 2 and all(console.execute_script("return arguments[0].naturalWidth", c) == 150
                                          for c in crops), "the two aligned crops")
    assert "Threshold -0.6" in text_of(console, "verify-threshold")
    shot(console, "verify")
    axe_check(console, "verify")
    choose(console, "verify-b", p["biden.jpg"])
    by_id(console, "verify-go").click()
    until(lambda: by_id(console, "verify-verdict").get_attribute("data-same") == "false", "different people")


def test_landmarks_are_drawn_with_the_crop_and_downloaded_as_json(console, server):
    p = server["photos"]
    tab(console, "landmarks")
    choose(console, "lm-file", p["obama.jpg"])
    by_id(console, "lm-go").click()
    info = until(lambda: text_of(console, "lm-info"), "the landmark summary")
    assert info.startswith("68 points, scheme 300w68; face box detected")
    assert len(console.find_elements("css selector", "#lm-photo svg circle")) == 68
    assert len(console.find_elements("css selector", "#lm-photo svg rect")) == 2  # the face box and the crop
    shot(console, "landmarks")
    axe_check(console, "landmarks")
    by_id(console, "lm-download").click()
    target = server["downloads"] / "obama.jpg.landmarks.json"
    until(lambda: target.is_file() and target.stat().st_size > 0, "the downloaded points")
    saved = json.loads(target.read_text())
    assert len(saved["points"]) == 68 and saved["scheme"] == "300w68" and saved["box_source"] == "detected"


def test_products_show_the_top_k_catalogue_images(console, server):
    tab(console, "products")
    choose(console, "products-file", server["photos"]["product-query.jpg"])
    by_id(console, "products-go").click()
    items = lambda: console.find_elements("css selector", "#products-grid li")  # noqa: E731
    loaded = lambda i: console.execute_script("return arguments[0].naturalWidth",  # noqa: E731
                                              i.find_element("css selector", "img")) > 0
    until(lambda: len(items()) == 7 and all(loaded(i) for i in items()), "seven catalogue images shown")
    assert all("score" in i.text for i in items())
    shot(console, "products")
    axe_check(console, "products")


def test_delete_erases_the_person_and_their_thumbnails(console, server):
    tab(console, "gallery")
    rows = lambda: console.find_elements("css selector", "#people tbody tr[data-identity]")  # noqa: E731
    until(lambda: len(rows()) == 2, "two identities")
    before = len(list(server["thumbs"].rglob("*.jpg")))
    rows()[0].find_element("css selector", "button[aria-label='Delete Barack Obama']").click()
    until(lambda: by_id(console, "delete-dialog").is_displayed(), "the confirmation")
    assert "Barack Obama" in text_of(console, "delete-text")
    by_id(console, "delete-confirm").click()
    until(lambda: [r.get_attribute("data-identity") for r in rows()] == ["Pat Doe"], "Obama gone from the list")
    assert len(list(server["thumbs"].rglob("*.jpg"))) == before - 2  # obama.jpg and the dropped obama3.jpg
    tab(console, "identify")
    choose(console, "identify-file", server["photos"]["obama2.jpg"])
    by_id(console, "identify-go").click()
    faces = lambda: console.find_elements("css selector", "#identify-faces li")  # noqa: E731
    until(lambda: faces() and faces()[0].get_attribute("data-identity") == "Pat Doe", "the next best: Pat Doe")
    assert faces()[0].get_attribute("data-verdict") == "rejected"


def test_the_keyboard_moves_between_tabs_and_a_phone_width_fits(console, server):
    first = by_id(console, "tab-gallery")
    first.click()
    first.send_keys(selenium.webdriver.common.keys.Keys.ARROW_RIGHT)
    assert console.switch_to.active_element.get_attribute("id") == "tab-enroll"
    assert by_id(console, "panel-enroll").is_displayed() and not by_id(console, "panel-gallery").is_displayed()
    console.set_window_size(390, 844)
    try:
        for name in ("gallery", "enroll", "identify", "verify", "landmarks", "products", "status"):
            tab(console, name)
            wide = console.execute_script("return document.documentElement.scrollWidth - document.documentElement.clientWidth")
            assert wide <= 0, f"the {name} view is {wide}px wider than a phone"
        shot(console, "phone-status")
    finally:
        console.set_window_size(1280, 1000)


def test_no_request_left_the_server_and_the_key_never_rode_in_a_url(console, server):
    collect_requests(console)
    assert len(console.requested) > 20
    host = urlparse(server["url"]).netloc
    for url in console.requested:
        parsed = urlparse(url)
        assert parsed.scheme in ("blob", "data") or parsed.netloc == host, url
        assert KEY not in url


def test_docs_and_redoc_work_offline_and_docs_uploads_an_image(server, browser):
    """/docs and /redoc load their scripts from the server itself (no CDN: this machine has no internet), and
    Swagger UI's own form for a POST route takes an image file and gets the route's answer (its Authorize
    dialog carries the API key)."""
    from selenium.webdriver.common.by import By

    url = server["url"]
    browser.get(url + "/docs")
    scripts = [s.get_attribute("src") for s in browser.find_elements(By.TAG_NAME, "script") if s.get_attribute("src")]
    assert scripts and all(s.startswith(url) for s in scripts), scripts
    op = until(lambda: browser.find_element(By.ID, "operations-landmarks-landmarks_v1_landmarks_post"), "Swagger UI")
    op.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    visible = lambda css: next(e for e in op.find_elements(By.CSS_SELECTOR, css) if e.is_displayed())  # noqa: E731
    until(lambda: visible(".try-out__btn"), "try it out").click()
    until(lambda: visible("input[type=file]"), "the file field").send_keys(str(server["photos"]["obama.jpg"]))
    visible(".execute").click()
    status = until(lambda: visible(".live-responses-table .response .response-col_status"), "the answer")
    assert status.text.strip().startswith("401")  # no key given to Swagger UI: the API's refusal, shown
    browser.get(url + "/redoc")
    until(lambda: "/v1/faces/identify" in browser.find_element(By.TAG_NAME, "body").text, "ReDoc")
