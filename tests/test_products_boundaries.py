"""Products retrieval at its input boundaries: an index directory, a data set root and a config from elsewhere.
Each bad input is an error naming the file and the line / key / field, never a silently wrong result."""

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("faiss", reason="catalogue indexes need visrec[products]")

from visrec.errors import ConfigError, DataError  # noqa: E402

DESC = {"name": "product", "backbone": "resnet18", "dim": 16}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A data set (one catalogue image unreadable) and its index: whiten (dim 2) then qe (k 2)."""
    from visrec.data.synth_products import write_product_dataset
    from visrec.index.catalogue import IndexOptions, build_catalogue_index
    from visrec.models import build_backbone

    root = tmp_path_factory.mktemp("boundaries")
    write_product_dataset(root / "p", families=2, products_per_family=2, variants=2, queries_per_product=1, size=64)
    (root / "p" / "catalogue" / "zz-broken.jpg").write_bytes(b"not a jpeg")
    torch.manual_seed(0)
    desc = build_backbone("product", backbone="resnet18", dim=16)
    opts = IndexOptions(size=64, shard_size=4, postprocess=[{"name": "whiten", "dim": 2}, {"name": "qe", "k": 2}])
    build_catalogue_index(root / "p" / "catalogue", root / "idx", desc, DESC, opts)
    return root


def _copy(built, tmp_path):
    shutil.copytree(built / "idx", tmp_path / "idx", ignore=shutil.ignore_patterns("shards"))
    return tmp_path / "idx"


def _rewrite(idx, name, data: bytes, manifest_changes=None):
    """Replace one file and rewrite the manifest with every file's record made again, as an attacker can."""
    from visrec.index.catalogue import MANIFEST, _file_record

    (idx / name).write_bytes(data)
    m = json.loads((idx / MANIFEST).read_text())
    (manifest_changes or (lambda m: None))(m)
    m["files"] = {n: _file_record(idx / n) for n in m["files"]}
    (idx / MANIFEST).write_text(json.dumps(m))


def _edit_manifest(idx, change):
    from visrec.index.catalogue import MANIFEST

    _rewrite(idx, MANIFEST, (idx / MANIFEST).read_bytes(), change)


def _save_chain(idx, change):
    from visrec._torchfile import read_torch_file

    state = read_torch_file(idx / "chain.pt")
    change(state)
    torch.save(state, idx / "chain.tmp")
    _rewrite(idx, "chain.pt", (idx / "chain.tmp").read_bytes())
    (idx / "chain.tmp").unlink()


# --- 1. ground-truth ids against the catalogue -------------------------------------------------------------

def _gt_lines(built):
    return (built / "p" / "val.csv").read_text().splitlines()


def _data_root(built, tmp_path, lines):
    root = tmp_path / "data"
    root.mkdir()
    (root / "query").symlink_to(built / "p" / "query")
    (root / "val.csv").write_text("\n".join(lines) + "\n")
    return root


def test_a_ground_truth_id_naming_no_catalogue_image_is_an_error_naming_line_and_id(built, tmp_path):
    from visrec.index.evaluation import evaluate_products, postprocess_ablation

    lines = _gt_lines(built)
    lines[1] = lines[1].upper()  # the ids of another catalogue: every one would score 0
    root = _data_root(built, tmp_path, lines)
    for run in (lambda: evaluate_products(built / "idx", root, tmp_path / "ev"),
                lambda: postprocess_ablation(built / "idx", root)):
        with pytest.raises(DataError, match="names no catalogue image") as err:
            run()
        assert err.value.path.endswith("val.csv") and err.value.record == "line 2"
        assert repr(lines[1].split(",")[1]) in str(err.value)


def test_ground_truth_ids_of_skipped_unreadable_images_are_counted_and_reported(built, tmp_path):
    from visrec.index.evaluation import evaluate_products

    lines = _gt_lines(built)
    lines[0] += ",zz-broken"
    lines[2] += ",zz-broken"
    res = evaluate_products(built / "idx", _data_root(built, tmp_path, lines), tmp_path / "ev")
    assert [u["id"] for u in res.unreadable_catalogue] == ["zz-broken"]
    assert res.ground_truth_unreadable == 2
    assert "2 ground-truth ids name catalogue images the index skipped" in res.report.read_text()


def test_a_quoted_ground_truth_field_is_an_error_not_an_id(tmp_path):
    from visrec.data.products import read_ground_truth

    (tmp_path / "val.csv").write_text('q1,a\n"q2","b"\n')
    with pytest.raises(DataError, match="in quotes") as err:
        read_ground_truth(tmp_path / "val.csv")
    assert err.value.record == "line 2"


def test_evaluate_descriptor_checks_ground_truth_ids_and_an_empty_catalogue(built, tmp_path):
    from visrec.models import build_backbone
    from visrec.models.inference import evaluate_descriptor

    model = build_backbone("product", backbone="resnet18", dim=16)
    root = tmp_path / "root"
    shutil.copytree(built / "p", root)
    (root / "catalogue" / "zz-broken.jpg").unlink()
    lines = _gt_lines(built)
    (root / "val.csv").write_text("\n".join(lines[:1] + [lines[1] + ",nope"]) + "\n")
    with pytest.raises(DataError, match="'nope'.*names no catalogue image"):
        evaluate_descriptor(model, root, size=64)
    shutil.rmtree(root / "catalogue")
    (root / "catalogue").mkdir()
    with pytest.raises(DataError, match="no catalogue images"):
        evaluate_descriptor(model, root, size=64)


# --- 2. non-finite values in a loaded index ----------------------------------------------------------------

def test_nan_in_chain_pt_is_refused_naming_the_key(built, tmp_path):
    from visrec.index.catalogue import CatalogueIndex

    idx = _copy(built, tmp_path)

    def poison(state):
        state["0.projection"][1, 0] = float("nan")

    _save_chain(idx, poison)
    with pytest.raises(DataError, match="not finite.*row 1") as err:
        CatalogueIndex(idx)
    assert err.value.path.endswith("chain.pt") and err.value.field == "0.projection"


def test_nan_rows_in_index_faiss_are_refused_naming_the_row(built, tmp_path):
    import faiss

    from visrec.index.catalogue import CatalogueIndex

    idx = _copy(built, tmp_path)
    index = faiss.read_index(str(idx / "index.faiss"))
    x = index.reconstruct_n(0, index.ntotal)
    x[3] = np.nan
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    faiss.write_index(flat, str(idx / "new.faiss"))
    _rewrite(idx, "index.faiss", (idx / "new.faiss").read_bytes())
    with pytest.raises(DataError, match="NaN or inf") as err:
        CatalogueIndex(idx)
    assert err.value.path.endswith("index.faiss") and err.value.record == "row 3"


def test_nan_in_descriptors_npy_is_refused_before_the_ablation_scores_it(built, tmp_path, monkeypatch):
    import io

    import visrec.index.catalogue as catalogue
    from visrec.index.catalogue import CatalogueIndex

    monkeypatch.setattr(catalogue, "FINITE_CHECK_ROWS", 2)  # the check goes block by block
    idx = _copy(built, tmp_path)
    raw = np.load(idx / "descriptors.npy")
    raw[5:] = np.nan
    buf = io.BytesIO()
    np.save(buf, raw)
    _rewrite(idx, "descriptors.npy", buf.getvalue())
    with pytest.raises(DataError, match="NaN or inf") as err:
        CatalogueIndex(idx).raw_catalogue()
    assert err.value.path.endswith("descriptors.npy") and err.value.record == "row 5"


# --- 3. sizes in the options -------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, field", [
    ({"size": 20000}, "index.size"),
    ({"multiscale": [1.0] * 9}, "index.multiscale"),
    ({"multiscale": [1.0, float("nan")]}, "multiscale"),
    ({"multiscale": [1.0, 30.0]}, "multiscale"),
    ({"multiscale": [1.0, -1.0]}, "multiscale"),
    ({"nprobe": 10 ** 12}, "index.nprobe"),
])
def test_unbounded_sizes_in_the_options_are_refused_naming_the_field(raw, field):
    from visrec.index.catalogue import load_index_options

    with pytest.raises(ConfigError, match=field):
        load_index_options(raw, "products.yaml")


@pytest.mark.parametrize("change, words", [
    (lambda m: m["options"].update(size=20000), "index.size"),
    (lambda m: m["options"].update(multiscale=[1.0, 100.0]), "multiscale"),
    (lambda m: m["options"].update(nprobe=10 ** 12), "index.nprobe"),
    (lambda m: m["options"]["postprocess"].__setitem__(1, {"name": "qe", "k": -5}), "qe: k must be"),
    (lambda m: m.pop("catalogue"), "catalogue must be"),
    (lambda m: m.pop("count"), "count must be"),
    (lambda m: m.update(catalogue=5), "catalogue must be"),
    (lambda m: m.update(unreadable=[{"id": "a,b", "reason": "x"}]), "unreadable must be"),
])
def test_a_manifest_field_out_of_bounds_is_a_data_error_naming_manifest_json(built, tmp_path, change, words):
    from visrec.index.catalogue import CatalogueIndex

    idx = _copy(built, tmp_path)
    _edit_manifest(idx, change)
    with pytest.raises(DataError, match=words) as err:
        CatalogueIndex(idx)
    assert err.value.path.endswith("manifest.json")


# --- 4. chain.pt against the chain, the dimensions and the catalogue ---------------------------------------

@pytest.mark.parametrize("change, key, words", [
    (lambda s: s.__setitem__("0.projection", torch.zeros(8, 2)), "0.projection", "expected"),
    (lambda s: s.__setitem__("0.projection", s["0.projection"][None]), "0.projection", "3-D"),
    (lambda s: s.__setitem__("0.mean", torch.zeros(7)), "0.mean", "expected"),
    (lambda s: s.__setitem__("0.mean", torch.zeros(16, dtype=torch.int32)), "0.mean", "floating"),
    (lambda s: s.pop("1.catalogue_vectors"), "1.catalogue_vectors", "missing"),
    (lambda s: s.__setitem__("1.catalogue_vectors", s["1.catalogue_vectors"][:5]), "1.catalogue_vectors", "(8, 2)"),
    (lambda s: s.__setitem__("1.catalogue_vectors", torch.zeros(8, 16)), "1.catalogue_vectors", "(8, 2)"),
    (lambda s: s.__setitem__("2.vectors", torch.zeros(8, 2)), "2.vectors", "no stage"),
])
def test_chain_pt_not_matching_the_chain_is_refused_naming_the_key(built, tmp_path, change, key, words):
    from visrec.index.catalogue import CatalogueIndex

    idx = _copy(built, tmp_path)
    _save_chain(idx, change)
    with pytest.raises(DataError, match="chain.pt") as err:
        CatalogueIndex(idx)
    assert err.value.field == key and words in str(err.value)


def test_a_manifest_stage_that_chain_pt_lacks_is_refused(built, tmp_path):
    from visrec.index.catalogue import CatalogueIndex

    idx = _copy(built, tmp_path)
    _edit_manifest(idx, lambda m: m["options"]["postprocess"].append({"name": "diffusion", "k": 2, "query_k": 2}))
    with pytest.raises(DataError, match="missing") as err:
        CatalogueIndex(idx)
    assert err.value.path.endswith("chain.pt") and err.value.field == "2.vectors"


# --- 5. ids: catalogue file names and what the writers write ----------------------------------------------

@pytest.mark.parametrize("name", [b"a,b.jpg", b"a\nb.jpg", b"\xff.jpg", b" a.jpg", b'"a".jpg'])
def test_a_catalogue_file_name_that_is_not_a_valid_id_is_refused_before_any_image_is_read(tmp_path, name):
    import os

    from visrec.data.products import list_images

    (tmp_path / "ok.jpg").write_bytes(b"x")
    with open(os.path.join(os.fsencode(tmp_path), name), "wb") as fh:
        fh.write(b"x")
    with pytest.raises(DataError, match="does not make a valid image id") as err:
        list_images(tmp_path)
    assert err.value.path == str(tmp_path) and repr(os.fsdecode(name)) in str(err.value)


@pytest.mark.parametrize("rows", [
    {"q1": ["a\udcff"]}, {"q1": ["a\r"]}, {"q1": [" a"]}, {"q1": ['"a"']},
    {"id": ["a"], "q2": ["b"]}, {"Query": ["a"]},
])
def test_writers_refuse_ids_their_reader_would_refuse_or_misread(tmp_path, rows):
    from visrec.data.products import read_ground_truth, write_ground_truth, write_submission

    with pytest.raises(DataError):
        write_ground_truth(tmp_path / "gt.csv", rows)
    with pytest.raises(DataError):
        write_submission(tmp_path / "sub.csv", rows, k=1)
    ok = {"v1": ["a", "b"], "q2": ["c"]}
    write_ground_truth(tmp_path / "gt.csv", ok)
    assert read_ground_truth(tmp_path / "gt.csv") == ok


# --- 6. post-processing parameters -------------------------------------------------------------------------

@pytest.mark.parametrize("spec, words", [
    ({"name": "dba", "k": 0}, "dba: k must be"),
    ({"name": "qe", "k": -1}, "qe: k must be"),
    ({"name": "qe", "k": 2.5}, "qe: k must be"),
    ({"name": "qe", "alpha": float("nan")}, "qe: alpha must be"),
    ({"name": "dba", "alpha": -1}, "dba: alpha must be"),
    ({"name": "whiten", "dim": 0}, "whiten: dim must be"),
    ({"name": "whiten", "eps": 0}, "whiten: eps must be"),
    ({"name": "diffusion", "alpha": 1.0}, "diffusion: alpha must be"),
    ({"name": "diffusion", "query_k": 0}, "diffusion: query_k must be"),
    ({"name": "diffusion", "iterations": 10 ** 9}, "diffusion: iterations must be"),
])
def test_stage_parameters_are_checked_with_the_config_before_extraction(spec, words):
    from visrec.index.catalogue import load_index_options

    with pytest.raises(ConfigError, match=words):
        load_index_options({"postprocess": [spec]}, "products.yaml")


def test_a_bad_stage_parameter_fails_the_build_before_any_image_is_described(built, tmp_path):
    from visrec.index.catalogue import IndexOptions, build_catalogue_index
    from visrec.models import build_backbone

    opts = IndexOptions.model_construct(**{**IndexOptions().model_dump(), "postprocess": [{"name": "dba", "k": 0}]})
    with pytest.raises(ConfigError, match="dba: k must be"):
        build_catalogue_index(built / "p" / "catalogue", tmp_path / "idx", build_backbone("product", dim=16), DESC,
                              opts)
    assert not (tmp_path / "idx").exists()


# --- 7. ids.txt --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("edit, line, words", [
    (lambda ids: ids.__setitem__(1, ids[0]), "line 2", "duplicate catalogue id"),
    (lambda ids: ids.__setitem__(4, ""), "line 5", "empty id"),
    (lambda ids: ids.__setitem__(2, ids[2] + " "), "line 3", "whitespace"),
])
def test_ids_txt_with_a_bad_line_is_refused_naming_it(built, tmp_path, edit, line, words):
    from visrec.index.catalogue import CatalogueIndex

    idx = _copy(built, tmp_path)
    ids = (idx / "ids.txt").read_text().split("\n")[:-1]
    edit(ids)
    _rewrite(idx, "ids.txt", "".join(f"{i}\n" for i in ids).encode())
    with pytest.raises(DataError, match=words) as err:
        CatalogueIndex(idx)
    assert err.value.path.endswith("ids.txt") and err.value.record == line


def test_the_fixture_index_opens_and_searches(built):
    from visrec.index.catalogue import search_catalogue

    ranked, _ = search_catalogue(built / "idx", built / "p" / "query", k=3)
    assert ranked and all(len(set(r)) == len(r) == 3 for r in ranked.values())


def test_synth_products_into_a_folder_holding_a_data_set_is_refused(built, tmp_path):
    from visrec.data.synth_products import write_product_dataset

    (tmp_path / "catalogue").mkdir()
    (tmp_path / "catalogue" / "old.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="already holds a data set"):
        write_product_dataset(tmp_path, families=1, products_per_family=1, variants=1, queries_per_product=1, size=32)
    assert not (tmp_path / "val.csv").exists() and not (tmp_path / "query").exists()


def test_k_beyond_the_catalogue_returns_the_whole_catalogue_without_asking_faiss_for_more(built):
    """`visrec products search -k 1000000000` asked FAISS for 10^9 rows a query (12 GB) and the kernel killed
    the command; k is now bounded by the catalogue, whose every image comes back ranked."""
    from visrec.index.catalogue import CatalogueIndex, search_catalogue

    count = len(CatalogueIndex(built / "idx").ids)
    ranked, scores = search_catalogue(built / "idx", built / "p" / "query", k=10**9)
    assert ranked and all(len(set(r)) == len(r) == count for r in ranked.values())
    assert all(len(s) == count for s in scores.values())
    for k in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="k must be a whole number >= 1"):
            CatalogueIndex(built / "idx").search_vectors(np.zeros((1, 16), np.float32), k)


def test_synthetic_sizes_beyond_what_visrec_reads_are_refused_before_anything_is_written(tmp_path):
    """A 20,000 px product image made a 1.2 GB canvas per image and the kernel killed the command; 20,000
    frames a video wrote a set that read_frames refuses. Both are refused before the first file."""
    from visrec.data.synth_products import MAX_SIDE, write_product_dataset
    from visrec.data.video import MAX_FRAMES, write_video_dataset

    with pytest.raises(ConfigError, match=f"size {MAX_SIDE + 1}: a whole number of pixels from 32 to {MAX_SIDE}"):
        write_product_dataset(tmp_path / "p", families=1, products_per_family=1, variants=1, size=MAX_SIDE + 1)
    with pytest.raises(ConfigError, match=f"frames per video {MAX_FRAMES + 1}: a whole number from 1 to "):
        write_video_dataset(tmp_path / "v", 2, 1, MAX_FRAMES + 1)
    assert not (tmp_path / "p").exists() and not (tmp_path / "v").exists()


def test_an_index_is_not_built_into_a_folder_of_other_files(built, tmp_path):
    """`products index --out FOLDER` replaced any file there named like an index file (a manifest.json or
    ids.txt of the user's); such a folder is refused unless it holds an index (or the shards of one cut short)."""
    from visrec.index.catalogue import IndexOptions, build_catalogue_index
    from visrec.models import build_backbone

    theirs = tmp_path / "mine" / "ids.txt"
    theirs.parent.mkdir()
    theirs.write_text("my own list\n")
    desc = build_backbone("product", backbone="resnet18", dim=16)
    with pytest.raises(DataError, match="holds files and no catalogue index"):
        build_catalogue_index(built / "p" / "catalogue", theirs.parent, desc, DESC, IndexOptions(size=64))
    assert theirs.read_text() == "my own list\n" and sorted(p.name for p in theirs.parent.iterdir()) == ["ids.txt"]
    again = _copy(built, tmp_path)  # a folder holding an index is rebuilt in place
    build_catalogue_index(built / "p" / "catalogue", again, desc, DESC, IndexOptions(size=64))
    assert (again / "manifest.json").exists()
