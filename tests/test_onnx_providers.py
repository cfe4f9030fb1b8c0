"""ONNX Runtime execution providers (visrec._onnx): the choice (cpu, cuda, tensorrt, auto, a list), the errors an
explicit GPU request gets on a machine without onnxruntime-gpu or after ONNX Runtime's silent fall back to the CPU;
the --providers / --device options end to end on the CPU; catalogue extraction in PyTorch and in ONNX Runtime (the
same vectors) with its loader threads; and the extraction benchmark."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from visrec._onnx import (CPU, CUDA, TENSORRT, check_session_providers, open_session, parse_providers,
                          provider_options, resolve_providers)
from visrec.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
ALL = [TENSORRT, CUDA, "AzureExecutionProvider", CPU]


# --- the choice ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("available, expected", [
    (ALL, [TENSORRT, CUDA, CPU]),
    ([CUDA, CPU], [CUDA, CPU]),
    (["AzureExecutionProvider", CPU], [CPU]),  # a provider that is neither GPU nor CPU is never picked by auto
    ([CPU], [CPU]),
])
def test_auto_takes_tensorrt_then_cuda_then_cpu_among_those_available(available, expected):
    assert resolve_providers("auto", available) == expected


def test_cpu_and_none_are_the_cpu_alone_whatever_is_available():
    assert resolve_providers("cpu", ALL) == [CPU] == resolve_providers(None, ALL)
    assert parse_providers(None).is_cpu and not parse_providers("auto").explicit_gpu


def test_cuda_and_tensorrt_when_available_keep_the_cpu_last():
    assert resolve_providers("cuda", ALL) == [CUDA, CPU]
    assert resolve_providers("TensorRT", ALL) == [TENSORRT, CUDA, CPU]
    assert resolve_providers("tensorrt", [TENSORRT, CPU]) == [TENSORRT, CPU]
    spec = parse_providers("cuda:1")
    assert spec.word == "cuda" and spec.device_id == 1 and spec.explicit_gpu
    assert provider_options(resolve_providers(spec, ALL), spec.device_id) == [{"device_id": 1}, {}]


@pytest.mark.parametrize("choice, missing", [("cuda", CUDA), ("tensorrt", TENSORRT), ("cuda:0", CUDA),
                                             ("CUDAExecutionProvider,CPUExecutionProvider", CUDA)])
def test_an_explicit_gpu_request_without_onnxruntime_gpu_says_what_to_install(choice, missing):
    with pytest.raises(ConfigError) as err:
        resolve_providers(choice, ["AzureExecutionProvider", CPU])
    text = str(err.value)
    assert missing in text and "pip install 'visrec[gpu]'" in text and "onnxruntime-gpu" in text
    assert "AzureExecutionProvider, CPUExecutionProvider" in text  # what this onnxruntime has
    with pytest.raises(ConfigError, match=TENSORRT):
        resolve_providers("tensorrt", [CUDA, CPU])  # CUDA alone does not make tensorrt


def test_an_explicit_list_passes_through_as_given():
    assert resolve_providers("CUDAExecutionProvider,CPUExecutionProvider", ALL) == [CUDA, CPU]
    assert resolve_providers([CPU, CUDA], ALL) == [CPU, CUDA]  # its order, nothing added
    assert resolve_providers(["AzureExecutionProvider"], ALL) == ["AzureExecutionProvider"]  # no CPU appended
    assert resolve_providers("tensorrt, cpu", ALL) == [TENSORRT, CPU]  # words stand for their provider


@pytest.mark.parametrize("choice, named", [("gpu", "'gpu'"), ("cuda,foo", "'foo'"), ("", "empty"),
                                           ("auto,cpu", "'auto'"), ("cuda:x", "must be a number")])
def test_an_unknown_name_is_an_error_naming_it(choice, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        resolve_providers(choice, ALL)


def test_tensorrt_runs_float32_engines_cached_where_the_docs_say(tmp_path, monkeypatch):
    monkeypatch.setenv("VISREC_TENSORRT_CACHE", str(tmp_path / "trt"))
    trt, cuda, cpu = provider_options([TENSORRT, CUDA, CPU], device_id=2)
    assert trt["trt_fp16_enable"] is False and trt["trt_int8_enable"] is False
    assert trt["trt_engine_cache_enable"] is True and trt["trt_engine_cache_path"] == str(tmp_path / "trt")
    assert (tmp_path / "trt").is_dir() and trt["device_id"] == 2 and cuda == {"device_id": 2} and cpu == {}
    monkeypatch.delenv("VISREC_TENSORRT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert provider_options([TENSORRT])[0]["trt_engine_cache_path"] == str(tmp_path / "xdg" / "visrec" / "tensorrt")


# --- after the session is made: the silent fall back to the CPU ----------------------------------------------------

class FakeSession:
    def __init__(self, got):
        self.got = got

    def get_providers(self):
        return list(self.got)


def test_a_gpu_request_that_ended_on_the_cpu_is_an_error_and_auto_reports_it():
    with pytest.raises(ConfigError) as err:
        check_session_providers(FakeSession([CPU]), "cuda", [CUDA, CPU], "m.onnx", "face detector")
    text = str(err.value)
    assert "m.onnx" in text and "face detector" in text and CUDA in text and "fell back" in text
    with pytest.raises(ConfigError, match=TENSORRT):
        check_session_providers(FakeSession([CUDA, CPU]), "tensorrt", [TENSORRT, CUDA, CPU])
    with pytest.raises(ConfigError, match=CUDA):  # a list: every GPU provider in it
        check_session_providers(FakeSession([CPU]), [CUDA, CPU], [CUDA, CPU])
    assert check_session_providers(FakeSession([CUDA, CPU]), "cuda", [CUDA, CPU]) == [CUDA, CPU]
    assert check_session_providers(FakeSession([CPU]), "auto", [TENSORRT, CUDA, CPU]) == [CPU]


@pytest.fixture(scope="module")
def identity_onnx(tmp_path_factory):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3])
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["out"])], "identity", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("identity") / "identity.onnx"
    onnx.save(model, str(path))
    return path


def test_open_session_catches_onnxruntimes_own_fall_back(identity_onnx, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    if CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the CPU build's fall back cannot be provoked")
    assert open_session(identity_onnx).get_providers() == [CPU]  # the default, as before
    assert open_session(identity_onnx, "auto").get_providers() == [CPU]
    # this onnxruntime claims CUDA but is the CPU build: the session opens on the CPU alone, as when libcudnn is
    # missing on a GPU machine, and an explicit request must not pass
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    with pytest.raises(ConfigError, match="fell back"):
        open_session(identity_onnx, "cuda", what="face detector")
    assert open_session(identity_onnx, "auto").get_providers() == [CPU]


def test_a_session_takes_its_threads_from_the_call_the_default_or_omp_num_threads(identity_onnx, monkeypatch):
    """onnxruntime ignores OMP_NUM_THREADS (its pool takes every physical core); visrec's sessions follow it, as
    PyTorch does, unless the call or set_default_threads (the service's per-worker setting) says otherwise."""
    pytest.importorskip("onnxruntime")
    from visrec import _onnx

    def threads(**kw):
        return open_session(identity_onnx, **kw).get_session_options().intra_op_num_threads

    monkeypatch.setattr(_onnx, "DEFAULT_THREADS", [None])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads() == 1 and threads(threads=3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads() == 3
    _onnx.set_default_threads(2)
    assert threads() == 2
    _onnx.set_default_threads(None)
    for unset in ("", "0", "two"):
        monkeypatch.setenv("OMP_NUM_THREADS", unset)
        assert threads() == 0  # onnxruntime's own default
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads() == 0


def test_the_module_imports_and_parses_without_onnxruntime():
    code = ("import sys; sys.modules['onnxruntime'] = None\n"
            "import visrec._onnx as o\n"
            "print(o.parse_providers('tensorrt:1').device_id)\n"
            "try:\n    o.resolve_providers('auto')\nexcept ImportError as e:\n    print('needs:', e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "1" and "pip install 'visrec[export]'" in done.stdout


# --- a product descriptor, as a checkpoint and as its ONNX export; a small catalogue -----------------------------

@pytest.fixture(scope="module")
def products(tmp_path_factory):
    """(catalogue root, model.pt, model.onnx): 24 synthetic catalogue images (96 px), a random product descriptor
    (timm's test_resnet, GeM, 16-d, 64 px input) and its visrec export."""
    pytest.importorskip("onnxscript")
    import torch

    from visrec._torchfile import atomic_save
    from visrec.data.synth_products import write_product_dataset
    from visrec.export import export_checkpoint
    from visrec.models import build_backbone
    from visrec.models.model_file import default_contract

    tmp = tmp_path_factory.mktemp("onnx-products")
    write_product_dataset(tmp / "data", families=2, products_per_family=4, variants=3, queries_per_product=1,
                          seed=5, size=96)
    cfg = {"name": "product", "backbone": "test_resnet", "dim": 16}
    torch.manual_seed(0)
    net = build_backbone(**cfg).eval()
    atomic_save({"model_config": cfg, "backbone": net.state_dict(),
                 "contract": default_contract(net, cfg, image_size=64).to_dict()}, tmp / "model.pt")
    export_checkpoint(tmp / "model.pt", tmp / "model.onnx")
    return tmp / "data", tmp / "model.pt", tmp / "model.onnx"


INDEX = {"index.size": 64, "index.batch_size": 4, "index.shard_size": 8, "index.dtype": "float32"}


def test_torch_and_onnx_extraction_give_the_same_vectors(products, tmp_path):
    from visrec.index.catalogue import CatalogueIndex, index_catalogue

    root, pt, onnx = products
    a = index_catalogue(root / "catalogue", tmp_path / "torch", checkpoint=pt, overrides=INDEX)
    b = index_catalogue(root / "catalogue", tmp_path / "onnx", checkpoint=onnx, overrides=INDEX, providers="auto")
    assert a["runtime"] == "PyTorch on cpu" and b["runtime"] == "ONNX Runtime on CPUExecutionProvider"
    assert a["count"] == b["count"] == 24 and b["model_config"] == a["model_config"]
    va, vb = np.load(tmp_path / "torch" / "descriptors.npy"), np.load(tmp_path / "onnx" / "descriptors.npy")
    assert va.dtype == np.float32 and np.abs(va - vb).max() < 1e-5 and np.abs(va).max() > 0.1
    assert (tmp_path / "torch" / "ids.txt").read_text() == (tmp_path / "onnx" / "ids.txt").read_text()
    # each index keeps the descriptor it was built with, and searches with it
    assert {p.name for p in (tmp_path / "onnx").glob("descriptor.*")} == {"descriptor.onnx"}
    assert {p.name for p in (tmp_path / "torch").glob("descriptor.*")} == {"descriptor.pt"}
    queries = sorted((root / "query").glob("*.jpg"))
    items = [(q.stem, q) for q in queries]
    ta, tb = CatalogueIndex(tmp_path / "torch"), CatalogueIndex(tmp_path / "onnx")
    assert tb.runtime.startswith("ONNX Runtime") and ta.runtime == "PyTorch on cpu"
    (_, qa), (_, qb) = ta.describe_items(items), tb.describe_items(items)
    assert np.abs(qa - qb).max() < 1e-5
    # an index rebuilt in place with the other runtime drops the descriptor it no longer uses
    index_catalogue(root / "catalogue", tmp_path / "torch", checkpoint=onnx, overrides=INDEX)
    assert {p.name for p in (tmp_path / "torch").glob("descriptor.*")} == {"descriptor.onnx"}


def test_loader_threads_give_the_bits_of_one_thread_in_catalogue_order(products, tmp_path):
    import shutil

    from visrec.index.catalogue import IndexOptions, extract_descriptors
    from visrec.data.products import list_images
    from visrec.models.model_file import load_backbone

    root, pt, _ = products
    cat = tmp_path / "cat"
    shutil.copytree(root / "catalogue", cat)
    ids = [i for i, _ in list_images(cat)]
    (cat / f"{ids[6]}.jpg").write_bytes(b"not a jpeg")  # in the second batch of the first shard
    model, _ = load_backbone(pt)
    runs = {}
    for workers in (0, 1, 3):
        opts = IndexOptions(size=64, batch_size=4, shard_size=8, dtype="float32", workers=workers)
        seen = []
        runs[workers] = extract_descriptors(model, list_images(cat), tmp_path / f"w{workers}", opts,
                                            progress=seen.append)
        assert sum(seen) == len(ids)
    got_ids, vectors, bad = runs[0]
    assert got_ids == [i for i in ids if i != ids[6]] and bad == [(ids[6], bad[0][1])] and "decod" in bad[0][1]
    for workers in (1, 3):
        assert runs[workers][0] == got_ids and runs[workers][2] == bad
        assert np.array_equal(runs[workers][1], vectors)  # the same batches, the same bits


def test_describe_takes_images_or_their_prepared_batch_alike():
    import torch

    from visrec.models import build_backbone
    from visrec.models.inference import describe, prepare_batch

    torch.manual_seed(0)
    net = build_backbone("product", backbone="test_resnet", dim=8).eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (50 + 7 * i, 40, 3), dtype=np.uint8) for i in range(3)]
    for multiscale in (None, [1.0, 0.75]):
        direct = describe(net, images, 48, multiscale)
        prepared = prepare_batch(images, 48, multiscale)
        assert len(prepared) == 3 and len(prepared.scales) == (2 if multiscale else 1)
        assert np.array_equal(describe(net, prepared, 48, multiscale), direct)



def test_prepared_batches_are_pixels_whose_normalisation_gives_preprocess_products_bits():
    """The loader threads hand over uint8 squares (a quarter of the float batch to copy to the device); the
    normalisation after the copy must be preprocess_product's to the bit, or catalogue and query would differ."""
    import torch

    from visrec.data.products import normalise_product_pixels, preprocess_product
    from visrec.models.inference import prepare_batch

    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, (int(rng.integers(20, 300)), int(rng.integers(20, 300)), 3), dtype=np.uint8)
              for _ in range(5)]
    prepared = prepare_batch(images, 64, [1.0, 0.707, 1.5])
    for x, scale in zip(prepared.scales, (1.0, 0.707, 1.5)):
        side = int(round(64 * scale))
        assert x.dtype == np.uint8 and x.shape == (5, side, side, 3)
        want = np.stack([preprocess_product(im, side) for im in images])
        got = normalise_product_pixels(torch.from_numpy(x)).numpy()
        assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), want.view(np.uint32))

def test_an_onnx_descriptor_refuses_sizes_its_export_fixed(products, tmp_path):
    from visrec.index.catalogue import index_catalogue

    root, _, onnx = products
    with pytest.raises(ConfigError, match="64x64"):
        index_catalogue(root / "catalogue", tmp_path / "x", checkpoint=onnx, overrides={"index.size": 96})
    with pytest.raises(ConfigError, match="--providers"):
        index_catalogue(root / "catalogue", tmp_path / "x", checkpoint=onnx, device="cuda")
    assert not (tmp_path / "x").exists()  # refused before anything is written


# --- the commands ------------------------------------------------------------------------------------------------

def test_products_index_providers_cpu_works_and_cuda_fails_cleanly_here(products, tmp_path, monkeypatch, capsys):
    root, pt, onnx = products
    sets = [x for k, v in INDEX.items() for x in ("--set", f"{k}={v}")]
    code, out, err = run_cli(["products", "index", root / "catalogue", "--model", onnx, "--out", tmp_path / "i",
                              "--providers", "cpu", *sets], monkeypatch, capsys)
    assert code == 0, err
    assert "images indexed │ 24" in out and "ONNX Runtime on CPUExecutionProvider" in out
    code, out, err = run_cli(["products", "index", root / "catalogue", "--model", pt, "--out", tmp_path / "t",
                              "--device", "auto", *sets], monkeypatch, capsys)
    assert code == 0 and "PyTorch on cpu" in out, err
    pytest.importorskip("onnxruntime")
    import onnxruntime

    if CUDA in onnxruntime.get_available_providers():
        pytest.skip("this machine has onnxruntime-gpu")
    code, out, err = run_cli(["products", "index", root / "catalogue", "--model", onnx, "--out", tmp_path / "c",
                              "--providers", "cuda"], monkeypatch, capsys)
    assert code == 2 and err.startswith("error:") and "pip install 'visrec[gpu]'" in err and CUDA in err
    assert "Traceback" not in err and not (tmp_path / "c").exists()
    code, out, err = run_cli(["products", "index", root / "catalogue", "--model", pt, "--out", tmp_path / "c",
                              "--providers", "tensorrt"], monkeypatch, capsys)
    assert code == 2 and "--device cuda" in err  # a checkpoint runs in PyTorch: the message says what applies
    code, out, err = run_cli(["products", "search", root / "query", "--index", tmp_path / "i", "--providers", "cuda"],
                             monkeypatch, capsys)
    assert code == 2 and "visrec[gpu]" in err
    code, out, err = run_cli(["eval", "products", tmp_path / "i", "--data", root, "--out", tmp_path / "ev",
                              "--providers", "cpu"], monkeypatch, capsys)
    assert code == 0 and "mAP@7" in out, err


def test_eval_faces_providers(products, tiny_face_model, tmp_path, monkeypatch, capsys):
    from visrec.data.synth import write_verification_pairs

    data = write_verification_pairs(tmp_path / "val.bin", 3, 20)
    code, out, err = run_cli(["eval", "faces", tiny_face_model, "--data", data, "--out", tmp_path / "ev",
                              "--target-fpr", "0.5", "--providers", "cpu"], monkeypatch, capsys)
    assert code == 0 and "10-fold accuracy" in out, err
    code, out, err = run_cli(["eval", "faces", tiny_face_model, "--data", data, "--out", tmp_path / "ev",
                              "--providers", "cuda"], monkeypatch, capsys)
    assert code == 2 and "runs in torch" in err and "applies to .onnx models" in err
    import onnxruntime

    if CUDA in onnxruntime.get_available_providers():
        pytest.skip("this machine has onnxruntime-gpu")
    code, out, err = run_cli(["eval", "faces", products[2], "--data", data, "--out", tmp_path / "ev",
                              "--providers", "cuda"], monkeypatch, capsys)  # an .onnx model: its session refuses
    assert code == 2 and "visrec[gpu]" in err and CUDA in err and "Traceback" not in err


def test_serve_providers_are_checked_before_the_service_starts(products, tmp_path, monkeypatch, capsys):
    pytest.importorskip("fastapi")
    from visrec.index.catalogue import index_catalogue
    from visrec.serve.config import load_serve_config

    root, _, onnx = products
    index_catalogue(root / "catalogue", tmp_path / "idx", checkpoint=onnx, overrides=INDEX)
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"port: 0\nproducts: {{index: {tmp_path / 'idx'}}}\n")
    assert load_serve_config(cfg).providers == "cpu"
    assert load_serve_config(cfg, {"providers": "tensorrt:1"}).providers == "tensorrt:1"
    with pytest.raises(ConfigError, match="unknown execution provider 'gpu'"):
        load_serve_config(cfg, {"providers": "gpu"})
    import onnxruntime

    if CUDA in onnxruntime.get_available_providers():
        pytest.skip("this machine has onnxruntime-gpu")
    code, out, err = run_cli(["serve", "--config", cfg, "--providers", "cuda"], monkeypatch, capsys)
    assert code == 2 and CUDA in err and "visrec[gpu]" in err
    assert "serving on" not in out + err  # said only once everything loaded


# --- the extraction benchmark --------------------------------------------------------------------------------------

def test_extraction_benchmark_prints_the_rate_and_the_perfect_500k_time(tmp_path):
    pytest.importorskip("onnxscript")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "products_search.py"), "--dims", "--extract", "14",
           "--backbone", "test_resnet", "--dim", "16", "--size", "64", "--batch", "8", "--distinct", "6",
           "--render-size", "96", "--workers", "2", "--device", "cpu", "--providers", "cpu", "cuda",
           "--work", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = {m.group(1): m for m in re.finditer(
        r"^extraction (\S+ \S+) \((.*?), (\d+) JPEGs.*?\): ([\d,.]+) images/s; 520,000 images in ([\d,.]+) min "
        r"\(goal < 5 min: (met|not met)\)", done.stdout, flags=re.M)}
    assert set(lines) == {"torch cpu", "onnxruntime cpu"}, done.stdout
    assert lines["torch cpu"].group(2) == "PyTorch on cpu" and lines["onnxruntime cpu"].group(2).startswith("ONNX")
    for m in lines.values():
        rate, minutes = float(m.group(4).replace(",", "")), float(m.group(5).replace(",", ""))
        assert int(m.group(3)) == 16  # 14 rounded up to whole batches of 8
        assert rate > 0 and minutes == pytest.approx(520_000 / rate / 60, rel=0.01)
        assert m.group(6) == ("met" if minutes < 5 else "not met")
    import onnxruntime

    if CUDA not in onnxruntime.get_available_providers():
        assert re.search(r"^extraction onnxruntime cuda: not measured: .*onnxruntime-gpu is absent", done.stdout,
                         flags=re.M), done.stdout
    assert "catalogue extraction: JPEG files on disk -> vectors in the index" in done.stdout  # the Rich table
    assert not list(tmp_path.iterdir())  # its temporary catalogue and indexes are gone
