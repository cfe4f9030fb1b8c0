"""The demo's sections at small sizes (the full demo, `visrec demo`, runs them at the sizes in demo.py):
each writes its data in the real formats, trains / indexes, and prints and returns measured numbers."""

import io
import math

import pytest
from rich.console import Console


def console():
    return Console(file=io.StringIO(), width=200)


def printed(c: Console) -> str:
    return c.file.getvalue()


def test_landmarks_section_reports_every_normalisation_against_the_mean_shape(tmp_path):
    c = console()
    from visrec.demo import landmarks_section

    stale = tmp_path / "data" / "landmarks" / "train" / "picture" / "000999.jpg"  # a killed run's half-written set
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half")
    res = landmarks_section(tmp_path, c, faces=(48, 16), steps=6)
    assert not stale.exists() and len(list(stale.parent.iterdir())) == 48  # rendered anew, not refused or mixed
    assert set(res["metrics"]) == set(res["mean_shape"]) == {"sqrt_area", "inter_ocular", "inter_pupil",
                                                               "bbox_diagonal"}
    for norm, m in res["metrics"].items():
        assert 0 < m["nme"] < 1 and 0 <= m["auc@0.08"] <= 1 and 0 < res["mean_shape"][norm]["nme"] < 1
        assert f"{m['nme']:.4f}" in printed(c)
    assert res["report"].exists() and "CED" in res["report"].read_text()
    assert (tmp_path / "data" / "landmarks" / "val" / "landmark").is_dir()  # the JD-landmark layout


def test_video_section_compares_fusions_and_says_when_tpr_is_not_estimable(tmp_path, tiny_face_model):
    from visrec.demo import video_section

    c = console()
    res = video_section(tmp_path, tiny_face_model, c, identities=(6, 5), steps=2)
    assert set(res) == {"mean", "norm", "learned"}
    # 20 held-out videos: 190 pairs of which 30 genuine, far fewer impostors than 1/1e-4 -> not estimable
    assert all(not r.estimable and r.impostor_count == 160 for r in res.values())
    assert "impostor pairs < 1/FPR" in printed(c) and (tmp_path / "runs" / "video-quality" / "model.pt").exists()


def test_gallery_and_products_sections(tmp_path, tiny_face_model):
    pytest.importorskip("pymilvus", reason="the demo gallery is Milvus Lite (visrec[serve])")
    from visrec.demo import gallery_section, products_section

    c = console()
    res = gallery_section(tmp_path, {"run": tiny_face_model}, c)
    assert res["identities"] == 50 and 0 <= res["top1"] <= 1 and "Milvus Lite" in printed(c)
    stale = tmp_path / "data" / "products" / "catalogue" / "left-by-a-killed-run.jpg"  # no val.csv beside it
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half-written")
    metrics = products_section(tmp_path, c)  # renders its data again (synth products refuses a held data set)
    assert metrics and all(0 <= v <= 1 and not math.isnan(v) for v in metrics.values()) and not stale.exists()
    assert (tmp_path / "eval-products").is_dir()
