"""Products: descriptors, resumable extraction, FAISS index, search and the CLI, on synthetic products."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from visrec.data.synth_products import write_product_dataset
from visrec.errors import ConfigError, DataError
from visrec.models import build_backbone


@pytest.fixture(scope="module")
def products(tmp_path_factory):
    root = tmp_path_factory.mktemp("products")
    write_product_dataset(root, families=3, products_per_family=2, variants=2, queries_per_product=1, seed=3, size=64)
    return root


@pytest.mark.parametrize("kw", [dict(backbone="resnet18", pooling="rmac", dim=32),
                                dict(backbone="resnet18", source="torchvision", pooling="mac"),
                                dict(backbone="vit_tiny_patch16_224"),
                                dict(backbone="mobilefacenet", source="visrec")])
def test_descriptors_are_unit_vectors_of_the_declared_dim(kw):
    m = build_backbone("product", **kw).eval()
    size = 224 if "vit" in kw["backbone"] else 96
    out = m(torch.randn(2, 3, size, size))
    assert out.shape == (2, m.dim) and torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)


def test_ensemble_concat_inner_product_is_the_mean_of_part_cosines():
    heads = [dict(backbone="resnet18", pooling="gem"), dict(backbone="resnet18", pooling="spoc", dim=16)]
    e = build_backbone("product_ensemble", heads=heads).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        out = e(x)
        parts = [h(x) for h in e.heads]
    assert out.shape == (3, 512 + 16)
    expected = sum(p @ p.T for p in parts) / 2
    assert torch.allclose(out @ out.T, expected, atol=1e-5)
    with pytest.raises(ConfigError, match="equal dimensions"):
        build_backbone("product_ensemble", heads=heads, combine="sum")


def test_local_weights_load_and_mismatches_are_named(tmp_path):
    src = build_backbone("product", backbone="resnet18").eval()
    torch.save(src.trunk.net.state_dict(), tmp_path / "r18.pth")
    dst = build_backbone("product", backbone="resnet18", weights=str(tmp_path / "r18.pth")).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(src(x), dst(x), atol=1e-6)
    torch.save(build_backbone("product", backbone="resnet34").trunk.net.state_dict(), tmp_path / "r34.pth")
    with pytest.raises(DataError, match="r34.pth.*keys differ"):
        build_backbone("product", backbone="resnet18", weights=str(tmp_path / "r34.pth"))
    with pytest.raises(ConfigError, match="no model"):
        build_backbone("product", backbone="not_a_net_xyz")


def test_faiss_flat_is_exact_and_ivf_builds(tmp_path):
    from visrec.index.faiss_index import FaissIndex

    rng = np.random.default_rng(0)
    cat = rng.normal(size=(500, 32)).astype(np.float32)
    cat /= np.linalg.norm(cat, axis=1, keepdims=True)
    q = cat[:5] + 0.1 * rng.normal(size=(5, 32)).astype(np.float32)
    scores, rows = FaissIndex(32).build(cat).search(q, 7)
    assert np.array_equal(rows, np.argsort(-(q @ cat.T), axis=1)[:, :7])
    ivf = FaissIndex(32, "IVF8,Flat", nprobe=8).build(cat)  # all lists probed: exact
    assert np.array_equal(ivf.search(q, 7)[1], rows)
    ivf.save(tmp_path / "x.faiss")
    assert np.array_equal(FaissIndex.load(tmp_path / "x.faiss", nprobe=8).search(q, 7)[1], rows)
    with pytest.raises(ConfigError, match="cannot build"):
        FaissIndex(32, "NoSuchIndex")
    with pytest.raises(DataError, match="dimension 32"):
        FaissIndex(32).build(cat[:, :16])


def _opts(**kw):
    from visrec.index.catalogue import IndexOptions
    return IndexOptions(size=64, shard_size=4, batch_size=4, **kw)


def test_extraction_resumes_after_a_crash_and_reports_bad_images(products, tmp_path, monkeypatch):
    import shutil

    import visrec.index.catalogue as cat_mod

    cat_dir = tmp_path / "catalogue"
    shutil.copytree(products / "catalogue", cat_dir)
    ids = sorted(p.stem for p in cat_dir.glob("*.jpg"))
    (cat_dir / f"{ids[5]}.jpg").write_bytes(b"not a jpeg")
    model = build_backbone("product", backbone="resnet18", dim=16)
    spec = {"name": "product", "backbone": "resnet18", "dim": 16}
    described = []
    real = cat_mod.describe
    monkeypatch.setattr(cat_mod, "describe", lambda m, ims, *a, **k: (described.append(len(ims)), real(m, ims, *a, **k))[1])
    out = tmp_path / "idx"
    manifest = cat_mod.build_catalogue_index(cat_dir, out, model, spec, _opts())
    assert manifest["count"] == len(ids) - 1
    assert manifest["unreadable"][0]["id"] == ids[5] and "decod" in manifest["unreadable"][0]["reason"]
    assert sum(described) == len(ids) - 1
    first = np.load(out / "descriptors.npy")
    # a crash during the last shard: that shard never got written; the rest are reused
    shards = sorted((out / "shards").glob("shard-*.npz"))
    shards[-1].unlink()
    described.clear()
    cat_mod.build_catalogue_index(cat_dir, out, model, spec, _opts())
    assert len(ids) == 12 and len(shards) == 3  # shards of 4; the bad image (index 5) is in shard 1
    assert sum(described) == 4  # only the lost shard is described again
    assert np.array_equal(np.load(out / "descriptors.npy"), first)
    with pytest.raises(DataError, match=ids[5]):
        cat_mod.build_catalogue_index(cat_dir, tmp_path / "strict", model, spec, _opts(strict=True))


def test_cli_index_search_and_eval(products, tmp_path, monkeypatch):
    import visrec.commands.products as products_command
    from visrec.cli import app

    cfg = tmp_path / "p.yaml"
    cfg.write_text("model: {name: product, backbone: resnet18, pooling: gem, dim: 32}\nschedule: {max_steps: 1}\n"
                   "index: {size: 64, shard_size: 8, postprocess: [{name: whiten, dim: 16}, {name: dba, k: 2},"
                   " {name: qe, k: 2}, {name: diffusion, k: 4, query_k: 3}]}\n")
    run = CliRunner().invoke
    r = run(app, ["products", "index", str(products / "catalogue"), "--config", str(cfg), "--out", str(tmp_path / "idx")])
    assert r.exit_code == 0, r.output
    assert "whiten -> dba -> qe -> diffusion" in r.output
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    # 12 catalogue vectors cannot fit a 16-d whitening (n >= 4 x dim): shrunk to 3, said in the output and manifest
    assert manifest["count"] == 12 and manifest["index_dim"] == 3
    assert len(manifest["postprocess_adjustments"]) == 1 and "dim=3" in manifest["postprocess_adjustments"][0]
    assert "stage shrunk" in r.output
    q = sorted((products / "query").glob("*.jpg"))[0]
    r = run(app, ["products", "search", str(q), "--index", str(tmp_path / "idx"), "-k", "3"])
    assert r.exit_code == 0 and q.stem in r.output and "of 1 queries" not in r.output, r.output
    # a long query set is printed in part, and the table says so and where the rest is
    monkeypatch.setattr(products_command, "SHOWN_QUERIES", 4)
    from rich.console import Console
    monkeypatch.setattr(products_command, "console", Console(width=400))  # the caption on one line, whatever the path
    r = run(app, ["products", "search", str(products / "query"), "--index", str(tmp_path / "idx")])
    assert r.exit_code == 0 and "the first 4 of 6 queries; --out FILE writes all" in r.output, r.output
    r = run(app, ["products", "search", str(products / "query"), "--index", str(tmp_path / "idx"),
                  "--out", str(tmp_path / "all.csv")])
    assert r.exit_code == 0 and f"the first 4 of 6 queries; {tmp_path / 'all.csv'} holds all" in r.output, r.output
    r = run(app, ["eval", "products", str(tmp_path / "idx"), "--data", str(products), "--out", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    # each mAP form is labelled by its definition, not by who is said to have used it
    assert "teams" not in r.output and "AP / hits in top 7" in r.output and "min(|GT|, 7)" in r.output
    from visrec.data.products import read_submission
    sub = read_submission(tmp_path / "ev" / "submission.csv")
    assert len(sub) == 6 and all(len(v) == 7 for v in sub.values())
    page = (tmp_path / "ev" / "report.html").read_text()
    assert page.count("data:image/jpeg;base64") == 6 * 8 and "min(|GT|, 7)" in page
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: product, backbone: resnet18}\nschedule: {max_steps: 1}\nindex: {postprocess: [{name: diffusion}, {name: qe}]}\n")
    r = run(app, ["products", "index", str(products / "catalogue"), "--config", str(bad), "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "last stage" in str(r.exception)


def test_cli_index_names_the_first_unreadable_images_and_counts_the_rest(products, tmp_path):
    import shutil

    from visrec.cli import app

    catalogue = tmp_path / "catalogue"
    shutil.copytree(products / "catalogue", catalogue)
    for i in range(7):
        (catalogue / f"broken{i}.jpg").write_bytes(b"\xff\xd8 not a picture")
    cfg = tmp_path / "p.yaml"
    cfg.write_text("model: {name: product, backbone: resnet18, pooling: gem, dim: 16}\nschedule: {max_steps: 1}\n"
                   "index: {size: 64}\n")
    r = CliRunner().invoke(app, ["products", "index", str(catalogue), "--config", str(cfg), "--out", str(tmp_path / "i")])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "i" / "manifest.json").read_text())
    assert manifest["count"] == 12 and len(manifest["unreadable"]) == 7
    assert sum(f"broken{i}" in r.output for i in range(7)) == 5 and "and 2 more" in r.output, r.output


def _seeded_descriptor(seed: int, dim: int = 16):
    torch.manual_seed(seed)
    return build_backbone("product", backbone="resnet18", dim=dim).eval()


def _index_files(folder) -> dict:
    """Every file directly in an index folder (the shards are a cache, not the index), by name -> SHA-256."""
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_reindex_describes_again_what_another_model_options_or_image_file_would_change(products, tmp_path,
                                                                                       monkeypatch):
    import os
    import shutil

    import visrec.index.catalogue as cat_mod

    cat_dir = tmp_path / "catalogue"
    shutil.copytree(products / "catalogue", cat_dir)
    ids = sorted(p.stem for p in cat_dir.glob("*.jpg"))
    spec = {"name": "product", "backbone": "resnet18", "dim": 16}
    a, b = _seeded_descriptor(0), _seeded_descriptor(1)
    described = []
    real = cat_mod.describe
    monkeypatch.setattr(cat_mod, "describe",
                        lambda m, ims, *x, **k: (described.append(len(ims)), real(m, ims, *x, **k))[1])
    out = tmp_path / "idx"
    cat_mod.build_catalogue_index(cat_dir, out, a, spec, _opts())
    with_a = np.load(out / "descriptors.npy")
    # the same folder, another model: every shard is described again, as a fresh build with that model does
    described.clear()
    m = cat_mod.build_catalogue_index(cat_dir, out, b, spec, _opts())
    assert sum(described) == len(ids) == 12
    assert m["shards"]["reused"] == 0 and m["shards"]["described"] == 3 and m["shards"]["why"] == {"another model": 3}
    fresh = tmp_path / "fresh"
    cat_mod.build_catalogue_index(cat_dir, fresh, b, spec, _opts())
    with_b = np.load(out / "descriptors.npy")
    assert np.array_equal(with_b, np.load(fresh / "descriptors.npy"))
    assert np.abs(with_b.astype(np.float32) - with_a.astype(np.float32)).max() > 1e-2
    # the same model again: everything reused, nothing described
    described.clear()
    m = cat_mod.build_catalogue_index(cat_dir, out, b, spec, _opts())
    assert sum(described) == 0 and m["shards"] == {"reused": 3, "described": 0, "why": {}}
    # another descriptor dimension: the manifest, the descriptors and the search agree on it
    narrow = cat_mod.build_catalogue_index(cat_dir, out, _seeded_descriptor(2, dim=8), {**spec, "dim": 8}, _opts())
    assert narrow["dim"] == 8 and np.load(out / "descriptors.npy").shape == (12, 8)
    q = sorted((products / "query").glob("*.jpg"))[0]
    assert len(cat_mod.CatalogueIndex(out).search_items([(q.stem, q)], k=3)[0][q.stem]) == 3
    # an option that changes a descriptor (the input size): described again
    cat_mod.build_catalogue_index(cat_dir, out, b, spec, _opts())
    described.clear()
    m = cat_mod.build_catalogue_index(cat_dir, out, b, spec, cat_mod.IndexOptions(size=48, shard_size=4, batch_size=4))
    assert sum(described) == 12 and m["shards"]["why"] == {"other options (size, multiscale, dtype)": 3}
    # an image replaced under the same id: its shard (and only that one) is described again
    cat_mod.build_catalogue_index(cat_dir, out, b, spec, _opts())
    target = cat_dir / f"{ids[5]}.jpg"
    shutil.copyfile(cat_dir / f"{ids[0]}.jpg", target)
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new mtime even on a coarse clock
    described.clear()
    m = cat_mod.build_catalogue_index(cat_dir, out, b, spec, _opts())
    assert sum(described) == 4 and m["shards"] == {"reused": 2, "described": 1, "why": {"image files changed": 1}}
    raw = np.load(out / "descriptors.npy")
    assert np.array_equal(raw[5], raw[0])  # the same pixels now, so the same descriptor
    fresh2 = tmp_path / "fresh2"
    cat_mod.build_catalogue_index(cat_dir, fresh2, b, spec, _opts())
    assert np.array_equal(raw, np.load(fresh2 / "descriptors.npy"))
    # a shard without the record of what made it (an older visrec's) is never trusted
    shard = out / "shards" / "shard-00000.npz"
    z = dict(np.load(shard))
    del z["record"]
    np.savez(shard, **z)
    described.clear()
    m = cat_mod.build_catalogue_index(cat_dir, out, b, spec, _opts())
    assert sum(described) == 4 and m["shards"]["reused"] == 2
    assert list(m["shards"]["why"]) == ["no record of its model, options and files (older shard)"]


def test_a_failed_reindex_leaves_the_previous_index_as_it_was(products, tmp_path, monkeypatch):
    import os
    import shutil

    import visrec.index.catalogue as cat_mod
    from visrec.index.faiss_index import FaissIndex

    spec = {"name": "product", "backbone": "resnet18", "dim": 16}
    out = tmp_path / "idx"
    cat_mod.build_catalogue_index(products / "catalogue", out, _seeded_descriptor(0), spec, _opts())
    before = _index_files(out)
    assert set(before) == {"descriptor.pt", "descriptors.npy", "ids.txt", "chain.pt", "index.faiss", "manifest.json"}
    queries = [(q.stem, q) for q in sorted((products / "query").glob("*.jpg"))]
    ranked, scores = cat_mod.CatalogueIndex(out).search_items(queries, k=5)

    def unchanged():
        assert _index_files(out) == before
        assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left behind
        again = cat_mod.CatalogueIndex(out).search_items(queries, k=5)
        assert again == (ranked, scores)

    other = _seeded_descriptor(1)
    shutil.rmtree(out / "shards")  # as the tester did: nothing to reuse, everything is described again
    # a bad FAISS factory string: refused before any work
    with pytest.raises(ConfigError, match="BOGUS"):
        cat_mod.build_catalogue_index(products / "catalogue", out, other, spec, _opts(factory="BOGUS"))
    unchanged()
    assert not (out / "shards").exists()
    # a failure after the descriptors are written (FAISS refusing the vectors)
    def broken_build(self, vectors, *a, **k):
        raise DataError("injected FAISS failure")

    with monkeypatch.context() as mp:
        mp.setattr(FaissIndex, "build", broken_build)
        with pytest.raises(DataError, match="injected"):
            cat_mod.build_catalogue_index(products / "catalogue", out, other, spec, _opts())
    unchanged()
    assert len(list((out / "shards").glob("shard-*.npz"))) == 3  # the finished extraction is kept for the rerun
    # killed while the new files were moved in (before the manifest): the reader refuses the mix
    real_replace = os.replace

    def killed_before_manifest(src, dst):
        if str(dst).endswith("manifest.json") and ".building-" in str(src):
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    with monkeypatch.context() as mp:
        mp.setattr(cat_mod.os, "replace", killed_before_manifest)
        with pytest.raises(KeyboardInterrupt):
            cat_mod.build_catalogue_index(products / "catalogue", out, other, spec, _opts())
    now = _index_files(out)
    assert now["manifest.json"] == before["manifest.json"] and now["descriptors.npy"] != before["descriptors.npy"]
    with pytest.raises(DataError, match="not the file this index's manifest.json was written with"):
        cat_mod.CatalogueIndex(out)
    # the rerun completes the new index, from the shards already described
    m = cat_mod.build_catalogue_index(products / "catalogue", out, other, spec, _opts())
    assert m["shards"]["reused"] == 3
    cat_mod.CatalogueIndex(out).search_items(queries, k=5)


def test_an_index_of_an_older_visrec_is_checked_against_its_files(products, tmp_path):
    import json as _json

    import visrec.index.catalogue as cat_mod

    spec = {"name": "product", "backbone": "resnet18", "dim": 16}
    out = tmp_path / "idx"
    cat_mod.build_catalogue_index(products / "catalogue", out, _seeded_descriptor(0), spec, _opts())
    manifest = _json.loads((out / "manifest.json").read_text())
    manifest.pop("files", None)  # as an older visrec wrote it
    (out / "manifest.json").write_text(_json.dumps(manifest))
    cat_mod.CatalogueIndex(out)
    # its descriptor replaced by a wider one (what the unchecked re-run left): refused, not searched wrongly
    wide = tmp_path / "wide"
    cat_mod.build_catalogue_index(products / "catalogue", wide, _seeded_descriptor(1, dim=32), {**spec, "dim": 32},
                                  _opts())
    (out / "descriptor.pt").write_bytes((wide / "descriptor.pt").read_bytes())
    with pytest.raises(DataError, match="descriptor.pt makes 32-d descriptors but manifest.json says 16"):
        cat_mod.CatalogueIndex(out)
