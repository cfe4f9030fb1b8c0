"""The Python API: the README's "Python in five lines" blocks run as written on the real photos; images in
every accepted form; folder enrollment and its CLI twin report photos with no face."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from visrec.errors import DataError

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(section: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end if end > 0 else None], re.S)


@pytest.mark.real_faces
def test_the_readme_python_blocks_run_as_written(faces_dir, monkeypatch, capsys):
    blocks = python_blocks("Python in five lines")
    assert len(blocks) == 2 and len(blocks[0].strip().splitlines()) <= 6
    monkeypatch.chdir(faces_dir)
    scope: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), scope)  # noqa: S102 - the README's own code
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("same: True") and "threshold from author: dlib" in out[0], out
    assert out[1].startswith("same: False"), out
    assert "identity='obama'" in out[2] and "accepted=True" in out[2], out


@pytest.mark.real_faces
def test_images_in_every_form_give_the_same_embedding(faces_dir):
    from PIL import Image

    import visrec

    fa = visrec.FaceAnalysis("dlib-resnet")
    path = faces_dir / "obama2.jpg"
    forms = [path, str(path), path.read_bytes(), visrec.load_image(path), Image.open(path)]
    embeddings = [fa.embed(x) for x in forms]
    for e in embeddings[1:]:
        np.testing.assert_allclose(e, embeddings[0], atol=1e-5)
    found = fa.faces(path)
    assert len(found) == 1 and found[0].embedding.shape == (128,) and found[0].points.shape == (68, 2)
    with pytest.raises(DataError, match="no face found in"):
        fa.embed(np.full((200, 200, 3), 128, np.uint8))


@pytest.mark.real_faces
def test_enroll_folder_and_its_cli_twin_report_photos_without_a_face(faces_dir, tmp_path):
    from typer.testing import CliRunner

    import visrec
    from visrec.cli import app
    from visrec.data.images import encode_jpeg

    people = tmp_path / "people"
    for name, photos in {"obama": ["obama.jpg", "obama2.jpg"], "biden": ["biden.jpg"]}.items():
        (people / name).mkdir(parents=True)
        for p in photos:
            shutil.copy(faces_dir / p, people / name / p)
    (people / "biden" / "wall.jpg").write_bytes(encode_jpeg(np.full((240, 320, 3), 90, np.uint8)))
    gallery = visrec.Gallery("dlib-resnet")
    report = gallery.enroll_folder(people)
    assert sorted(report.enrolled) == ["biden/biden.jpg", "obama/obama.jpg", "obama/obama2.jpg"]
    assert report.no_face == ["biden/wall.jpg"] and report.identities == 2 and not report.errors
    assert gallery.identify(faces_dir / "obama3.jpg")[0].identity == "obama"
    assert gallery.identify(faces_dir / "obama3.jpg")[0].accepted
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"faces:\n  model: dlib-resnet\n  detector: dlib-hog\n  landmarks: dlib-68\n"
                   f"  gallery: {{backend: milvus, uri: {tmp_path / 'g.db'}}}\n")
    res = CliRunner().invoke(app, ["gallery", "enroll", str(people), "--config", str(cfg)])
    assert res.exit_code == 0 and "no face (left out)" in res.output and "biden/wall.jpg" in res.output, res.output
    res = CliRunner().invoke(app, ["gallery", "list", "--config", str(cfg)])
    assert "obama" in res.output and "biden" in res.output


@pytest.mark.real_faces
def test_a_photo_copied_twice_is_enrolled_once_and_both_reports_say_so(faces_dir, tmp_path, monkeypatch):
    """A copy of a photo in a person's folder is the same aligned face, one template: the Python report and the
    CLI's table list it as left out beside the photo it repeats, and "enrolled" counts what was stored. The same
    photo in another person's folder is enrolled for both and listed as a likely labelling mistake."""
    from rich.console import Console
    from typer.testing import CliRunner

    import visrec
    import visrec.commands.gallery as gallery_cli
    from visrec.cli import app

    people = tmp_path / "people"
    for rel, src in (("obama/a.jpg", "obama.jpg"), ("obama/b-copy.jpg", "obama.jpg"), ("biden/a.jpg", "biden.jpg"),
                     ("biden/c-obama.jpg", "obama.jpg")):
        (people / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(faces_dir / src, people / rel)
    gallery = visrec.Gallery("dlib-resnet")
    report = gallery.enroll_folder(people)
    assert sorted(report.enrolled) == ["biden/a.jpg", "biden/c-obama.jpg", "obama/a.jpg"]
    assert gallery.store.count() == 3 and not report.errors
    assert report.duplicates == [("obama/b-copy.jpg", "obama/a.jpg")]
    assert report.other_person == [("obama/a.jpg", "biden/c-obama.jpg")]  # the folders are read in name order
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"faces:\n  model: dlib-resnet\n  detector: dlib-hog\n  landmarks: dlib-68\n"
                   f"  gallery: {{backend: faiss, path: {tmp_path / 'g.sqlite'}}}\n")
    monkeypatch.setattr(gallery_cli, "console", Console(width=200))  # one table row per line
    res = CliRunner().invoke(app, ["gallery", "enroll", str(people), "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:4]]
            for line in res.output.splitlines() if line.count("│") == 4}
    assert "3 templates" in " ".join(res.output.split()), res.output
    assert rows["enrolled"] == ["3", "biden/a.jpg, biden/c-obama.jpg, obama/a.jpg"], res.output
    assert rows["same photo as another (left out)"] == ["1", "obama/b-copy.jpg (same as obama/a.jpg)"], res.output
    assert rows["same face as another person's photo (enrolled: check the labels)"] == \
        ["1", "obama/a.jpg (same as biden/c-obama.jpg)"], res.output


def test_load_image_takes_paths_bytes_arrays_and_pil_and_names_bad_input(tmp_path):
    from PIL import Image

    from visrec.api import load_image

    rgb = np.zeros((30, 40, 3), np.uint8)
    rgb[:10, :20] = (200, 30, 30)
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90": every form comes out upright, 40 x 30
    buf = io.BytesIO()
    im.save(buf, "PNG", exif=exif.tobytes())
    (tmp_path / "r.png").write_bytes(buf.getvalue())
    for form in (tmp_path / "r.png", str(tmp_path / "r.png"), buf.getvalue(), Image.open(tmp_path / "r.png")):
        assert load_image(form).shape == (40, 30, 3)
    assert load_image(rgb).shape == (30, 40, 3) and load_image(rgb[..., 0]).shape == (30, 40, 3)
    for bad, words in ((tmp_path / "missing.jpg", "missing.jpg"), (b"not an image", "not a decodable image"),
                       (np.zeros((3, 3), np.float32), "uint8"), (42, "got int")):
        with pytest.raises(DataError, match=words):
            load_image(bad)


def test_the_top_level_names_load_lazily():
    import subprocess
    import sys

    code = "import sys, visrec; assert 'torch' not in sys.modules; print(visrec.FaceAnalysis.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "visrec.api", out.stderr


def test_a_gallery_file_opens_with_the_backend_that_wrote_it(tiny_face_model, tmp_path):
    """`.sqlite` (and any SQLite database, such as the CLI's default gallery.sqlite) is the durable FAISS
    gallery; another name a Milvus Lite file."""
    import visrec

    fa = visrec.FaceAnalysis(str(tiny_face_model))
    g = visrec.Gallery(fa, tmp_path / "faces.sqlite")
    g.store.enroll("ann", np.ones((1, 64), np.float32), model_name=fa.embedder.name)
    assert type(g.store).__name__ == "FaissGallery" and (tmp_path / "faces.sqlite").is_file()
    g.store.close()
    shutil.copy(tmp_path / "faces.sqlite", tmp_path / "faces.data")  # the same database under another name
    assert visrec.Gallery(fa, tmp_path / "faces.data").names() == ["ann"]


def test_a_bad_option_is_a_config_error_on_every_path(tiny_face_model, tmp_path):
    """api.md: a bad file or input is a DataError, a bad option a ConfigError; an alignment method, a fusion, a
    runtime and a top_k were plain VisrecErrors (or a DataError) instead."""
    import visrec
    from visrec.errors import ConfigError
    from visrec.models.loading import load_model

    with pytest.raises(ConfigError, match="unknown alignment method 'bogus'"):
        visrec.FaceAnalysis(str(tiny_face_model), align="bogus")
    fa = visrec.FaceAnalysis(str(tiny_face_model))
    with pytest.raises(ConfigError, match="fusion 'median'"):
        visrec.Gallery(fa, tmp_path / "g.sqlite", fusion="median")
    with pytest.raises(ConfigError, match="runtime 'bogus'"):
        load_model(tiny_face_model, runtime="bogus")
    g = visrec.Gallery(fa, tmp_path / "h.sqlite")
    with pytest.raises(ConfigError, match="top_k must be a whole number"):
        g.store.search(np.ones((1, 64), np.float32), top_k=0)
