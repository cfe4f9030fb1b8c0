"""Products results a user trusts: an evaluation folder never holds another run's submission, a search of no query
writes nothing, a rebuild joins only extraction shards that hold what their images make, a checkpoint describes at
its own input size, a ground truth's first line is never dropped when it may be a query's row, and a products
config is checked (data.size, the validation ground truth) before the first training step."""

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("faiss", reason="catalogue indexes need visrec[products]")

from visrec.errors import ConfigError, DataError  # noqa: E402

DESC = {"name": "product", "backbone": "test_resnet", "dim": 16}  # timm's tiny test network: fast on a CPU
SIDE = 64  # the input side the fixture's checkpoint was "trained" at


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A data set of 8 catalogue images, a random descriptor saved as a checkpoint whose contract says 64 px,
    and its index (shard_size 3: three extraction shards)."""
    from visrec._torchfile import atomic_save
    from visrec.data.synth_products import write_product_dataset
    from visrec.index.catalogue import IndexOptions, build_catalogue_index
    from visrec.models import build_backbone
    from visrec.models.model_file import default_contract

    root = tmp_path_factory.mktemp("trust")
    write_product_dataset(root / "p", families=2, products_per_family=2, variants=2, queries_per_product=1, size=64)
    torch.manual_seed(0)
    desc = build_backbone(**DESC).eval()
    atomic_save({"model_config": DESC, "backbone": desc.state_dict(),
                 "contract": default_contract(desc, DESC, image_size=SIDE).to_dict()}, root / "model.pt")
    opts = IndexOptions(size=SIDE, shard_size=3, batch_size=4, dtype="float32")
    build_catalogue_index(root / "p" / "catalogue", root / "idx", desc, DESC, opts)
    return root, desc, opts


# --- 1. an evaluation that writes no submission leaves none of an earlier run's -------------------------------

def test_an_evaluation_without_a_submission_removes_the_earlier_runs_submission(built, tmp_path):
    from visrec.index.evaluation import evaluate_products

    root, _, _ = built
    first = evaluate_products(root / "idx", root / "p", tmp_path / "ev", k=3)
    assert first.submission == tmp_path / "ev" / "submission.csv" and first.submission.is_file()
    # k above the catalogue of 8: no row can be filled, so this run writes no submission
    second = evaluate_products(root / "idx", root / "p", tmp_path / "ev", k=9)
    assert second.submission is None and any("no submission.csv" in n for n in second.notes)
    assert sorted(p.name for p in (tmp_path / "ev").iterdir()) == ["report.html"]
    assert "no submission.csv" in second.report.read_text()


# --- 2. a search of a folder without query images is refused before anything is written ----------------------

@pytest.mark.parametrize("names", [[], ["a.webp", "b.bmp", "notes.txt"]])
def test_a_search_of_a_folder_without_query_images_is_refused_and_keeps_the_earlier_submission(built, tmp_path,
                                                                                                names):
    from visrec.index.catalogue import search_catalogue

    root, _, _ = built
    folder = tmp_path / "queries"
    folder.mkdir()
    for name in names:
        (folder / name).write_bytes(b"x")
    mine = tmp_path / "mysub.csv"
    mine.write_text("q1,a,b,c\n")
    with pytest.raises(DataError, match=r"no query images.*\.jpg / \.jpeg / \.png") as err:
        search_catalogue(root / "idx", folder, k=3, submission=mine)
    assert err.value.path == str(folder)
    assert mine.read_text() == "q1,a,b,c\n"


# --- 3. a rebuild reuses an extraction shard only when it holds what its images make ---------------------------

def _edit_shard(path, edit):
    """Rewrite an extraction shard with ``edit(arrays)`` applied, its record (what made it) kept as it was."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    edit(arrays)
    path.unlink()
    np.savez(path, **arrays)


def _duplicate_id(a):
    a["ids"] = np.array([a["ids"][0], a["ids"][0], *a["ids"][2:]])


def _drop_an_id(a):
    a["ids"], a["vectors"] = a["ids"][1:], a["vectors"][1:]


def _nan_row(a):
    a["vectors"][1] = np.nan


def _inf_row(a):
    a["vectors"][2, 0] = np.inf


def _float16(a):
    a["vectors"] = a["vectors"].astype(np.float16)


def _id_of_no_image(a):
    a["ids"] = np.array(["elsewhere", *a["ids"][1:]])


@pytest.mark.parametrize("edit, words", [
    (_duplicate_id, "twice"), (_drop_an_id, "lacks 1"), (_nan_row, "NaN or inf"), (_inf_row, "NaN or inf"),
    (_float16, "float16"), (_id_of_no_image, "lacks 1"),
])
def test_a_shard_not_holding_its_images_ids_and_finite_vectors_is_described_again(built, tmp_path, edit, words):
    from visrec.data.products import list_images
    from visrec.index.catalogue import CatalogueIndex, build_catalogue_index, extract_descriptors

    root, desc, opts = built
    idx = tmp_path / "idx"
    shutil.copytree(root / "idx", idx)
    items = list_images(root / "p" / "catalogue")
    ref_ids, ref, _ = extract_descriptors(desc, items, idx, opts)
    _edit_shard(idx / "shards" / "shard-00001.npz", edit)
    stats = {}
    ids, vectors, bad = extract_descriptors(desc, items, idx, opts, stats=stats)
    assert stats["reused"] == 2 and stats["described"] == 1
    (why,) = stats["why"]
    assert why.startswith("broken contents") and words in why
    assert ids == ref_ids and not bad and np.array_equal(vectors, ref)
    # the build the user runs: the index it leaves opens and holds every image once, with finite descriptors
    _edit_shard(idx / "shards" / "shard-00001.npz", edit)
    manifest = build_catalogue_index(root / "p" / "catalogue", idx, desc, DESC, opts)
    assert manifest["shards"]["described"] == 1
    index = CatalogueIndex(idx)
    assert index.ids == ref_ids and np.array_equal(index.raw_catalogue(), ref)


@pytest.mark.parametrize("edit", [_duplicate_id, _drop_an_id, _nan_row])
def test_joining_a_shard_not_holding_its_images_is_an_error_naming_it(built, tmp_path, edit):
    """The join after a sharded run (every rank wrote its shards) refuses a shard with broken contents."""
    from visrec.data.products import list_images
    from visrec.index.catalogue import extract_descriptors, join_shards

    root, desc, opts = built
    items = list_images(root / "p" / "catalogue")
    extract_descriptors(desc, items, tmp_path, opts)
    _edit_shard(tmp_path / "shards" / "shard-00001.npz", edit)
    with pytest.raises(DataError, match="does not hold what its images make") as err:
        join_shards(items, tmp_path, opts, model=desc)
    assert err.value.path.endswith("shard-00001.npz")


# --- 4. data.size is bounded like index.size ---------------------------------------------------------------------

def _products_config(built, tmp_path, **over):
    from visrec.config import parse_config

    root, _, _ = built
    raw = {"task": "products", "output": str(tmp_path / "run"), "model": dict(DESC),
           "data": {"catalogue": str(root / "p" / "catalogue"), "labels": str(root / "p" / "catalogue_products.csv"),
                    "size": 32, "val": str(root / "p")},
           "loss": {"name": "arcface", "s": 30.0, "m": 0.3}, "schedule": {"max_steps": 1, "warmup_steps": 0},
           "batch_size": 4, "log_every": 1, "checkpoint_every": 1}
    for key, value in over.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    return parse_config(raw, "products.yaml")


@pytest.mark.parametrize("size", [4097, 10**9])
def test_a_products_data_size_beyond_the_contracts_bound_is_a_config_error_naming_it(built, tmp_path, size):
    from visrec.train.trainer import train

    with pytest.raises(ConfigError, match=r"data\.size") as err:
        train(_products_config(built, tmp_path, data={"size": size}), progress=False)
    assert "4096" in str(err.value)
    assert not (tmp_path / "run" / "model.pt").exists()


# --- 5. a checkpoint describes at its own input size unless index.size says otherwise --------------------------

def test_a_checkpoint_without_index_size_describes_at_its_contracts_size(built, tmp_path):
    from visrec.index.catalogue import index_catalogue
    from visrec.models.model_file import load_checkpoint

    root, _, _ = built
    m = index_catalogue(root / "p" / "catalogue", tmp_path / "idx", checkpoint=root / "model.pt")
    assert m["options"]["size"] == SIDE
    assert load_checkpoint(tmp_path / "idx" / "descriptor.pt")[2].input_size == (SIDE, SIDE)
    assert json.loads((tmp_path / "idx" / "manifest.json").read_text())["options"]["size"] == SIDE
    # the same vectors as an explicit index.size of the checkpoint's side
    index_catalogue(root / "p" / "catalogue", tmp_path / "explicit", checkpoint=root / "model.pt",
                    overrides={"index.size": SIDE})
    assert np.array_equal(np.load(tmp_path / "idx" / "descriptors.npy"),
                          np.load(tmp_path / "explicit" / "descriptors.npy"))
    # a PyTorch descriptor takes any side: an explicit one is kept, and the saved contract says it
    m = index_catalogue(root / "p" / "catalogue", tmp_path / "other", checkpoint=root / "model.pt",
                        overrides={"index.size": 32})
    assert m["options"]["size"] == 32
    assert load_checkpoint(tmp_path / "other" / "descriptor.pt")[2].input_size == (32, 32)


def test_an_onnx_export_without_index_size_describes_at_its_side_like_its_checkpoint(built, tmp_path):
    pytest.importorskip("onnxscript")
    from visrec.export import export_checkpoint
    from visrec.index.catalogue import index_catalogue

    root, _, _ = built
    export_checkpoint(root / "model.pt", tmp_path / "m.onnx")
    a = index_catalogue(root / "p" / "catalogue", tmp_path / "pt", checkpoint=root / "model.pt")
    b = index_catalogue(root / "p" / "catalogue", tmp_path / "onnx", checkpoint=tmp_path / "m.onnx")
    assert a["options"]["size"] == b["options"]["size"] == SIDE
    va, vb = np.load(tmp_path / "pt" / "descriptors.npy"), np.load(tmp_path / "onnx" / "descriptors.npy")
    assert np.abs(va.astype(np.float32) - vb.astype(np.float32)).max() < 1e-2
    # another side than the export fixes is still refused, with advice that holds
    with pytest.raises(ConfigError, match=r"takes 64x64 inputs.*leave index\.size unset.*set it to 64"):
        index_catalogue(root / "p" / "catalogue", tmp_path / "bad", checkpoint=tmp_path / "m.onnx",
                        overrides={"index.size": 224})


# --- 6. a header-like first line that may be a query's row ------------------------------------------------------

def _root_with_query(built, tmp_path, qid, lines):
    root, _, _ = built
    data = tmp_path / "data"
    shutil.copytree(root / "p", data)
    first = sorted((data / "query").glob("*.jpg"))[0]
    shutil.copyfile(first, data / "query" / f"{qid}.jpg")
    (data / "val.csv").write_text("".join(f"{line}\n" for line in lines))
    return data


@pytest.mark.parametrize("qid", ["id", "qid", "query_id", "Query"])
def test_a_header_like_first_line_naming_a_query_image_is_refused_naming_line_1(built, tmp_path, qid):
    from visrec.data.products import read_ground_truth
    from visrec.index.evaluation import evaluate_products

    root, _, _ = built
    rows = (root / "p" / "val.csv").read_text().splitlines()
    cat = rows[0].split(",")[1]
    data = _root_with_query(built, tmp_path, qid, [f"{qid},{cat}", *rows[:1]])
    for run in (lambda: read_ground_truth(data / "val.csv"),
                lambda: evaluate_products(root / "idx", data, tmp_path / "ev")):
        with pytest.raises(DataError, match=rf"reads as a header.*query/{qid}\.jpg is a query") as err:
            run()
        assert err.value.path.endswith("val.csv") and err.value.record == "line 1"
    # with a header line first the row is data, and its query is evaluated (second: the submission writer
    # refuses a first row its reader would skip as a header)
    (data / "val.csv").write_text(f"Validation Image ID,Training Image ID\n{qid},{cat}\n{rows[0]}\n")
    assert list(read_ground_truth(data / "val.csv")) == [qid, rows[0].split(",")[0]]
    (data / "val.csv").write_text(f"Validation Image ID,Training Image ID\n{rows[0]}\n{qid},{cat}\n")
    assert evaluate_products(root / "idx", data, tmp_path / "ev").queries == 2
    # a header naming no query image is still a header
    (data / "query" / f"{qid}.jpg").unlink()
    (data / "val.csv").write_text(f"{qid},{cat}\n{rows[0]}\n")
    assert list(read_ground_truth(data / "val.csv")) == [rows[0].split(",")[0]]


# --- 7. the validation ground truth is checked against its catalogue before the first step ----------------------

def test_a_validation_ground_truth_id_naming_no_catalogue_image_fails_before_the_first_step(built, tmp_path):
    from visrec.train.trainer import train

    root, _, _ = built
    val = tmp_path / "val"
    shutil.copytree(root / "p", val)
    rows = (val / "val.csv").read_text().splitlines()
    rows[1] = rows[1] + ",typo-id"
    (val / "val.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match="'typo-id'.*names no catalogue image") as err:
        train(_products_config(built, tmp_path, data={"val": str(val)}), progress=False)
    assert err.value.path.endswith("val.csv") and err.value.record == "line 2"
    run = tmp_path / "run"
    assert not (run / "model.pt").exists() and not (run / "last.rank0.pt").exists()  # no step was trained


def test_an_evaluation_of_a_ground_truth_without_queries_is_an_error_not_a_score(built, tmp_path):
    """The CLI checked this before opening the index; `evaluate_products` and `postprocess_ablation` called from
    Python searched nothing and then failed in the metric ("map_at_k: ground truth is empty"), naming no file, and
    `evaluate_descriptor` (a trainer's validation) failed in numpy ("need at least one array to concatenate")."""
    from visrec.index.evaluation import evaluate_products, postprocess_ablation
    from visrec.models.inference import evaluate_descriptor

    root, desc, _ = built
    data = tmp_path / "data"
    data.mkdir()
    for folder in ("query", "catalogue"):
        (data / folder).symlink_to(root / "p" / folder)
    (data / "val.csv").write_text("Validation Image ID,Training Image ID\n")
    for run in (lambda: evaluate_products(root / "idx", data, tmp_path / "ev"),
                lambda: postprocess_ablation(root / "idx", data),
                lambda: evaluate_descriptor(desc, data, size=SIDE)):
        with pytest.raises(DataError, match="lists no query") as err:
            run()
        assert err.value.path.endswith("val.csv")
    assert not (tmp_path / "ev" / "report.html").exists()
