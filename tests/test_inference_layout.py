"""Loaded networks run NHWC (``for_inference``) and give what NCHW gives up to float rounding; an ONNX export
of an NHWC module is the same file as that of the NCHW one; a catalogue index describes in NHWC, a
distillation teacher runs in NHWC."""

import numpy as np
import pytest
import torch

from visrec.models import build_backbone
from visrec.models.embed import embed_images, for_inference


def is_nhwc(module) -> bool:
    """Every conv weight laid out NHWC, and some of them not NCHW too (a depthwise or 1x1 kernel can be both)."""
    weights = [p for p in module.parameters() if p.dim() == 4]
    return (bool(weights) and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
            and not all(p.is_contiguous() for p in weights))


def faces(n=6, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)


def test_for_inference_puts_the_weights_in_nhwc_and_keeps_the_embeddings():
    torch.manual_seed(0)
    net = build_backbone("mobilefacenet", scale=1, embedding_size=32).eval()
    reference = embed_images(net, faces())
    assert not is_nhwc(net)
    same = for_inference(net, "cpu")
    assert same is net and not net.training and is_nhwc(net)
    out = embed_images(net, faces())
    np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-4)


def test_a_loaded_checkpoint_runs_nhwc_and_its_export_is_the_nchw_file(tmp_path):
    pytest.importorskip("onnxscript", reason="the export needs visrec[export]")
    from visrec.export import export_model
    from visrec.models.loading import load_model
    from visrec.models.model_file import default_contract

    torch.manual_seed(0)
    cfg = {"name": "mobilefacenet", "scale": 1, "embedding_size": 32}
    net = build_backbone(**cfg).eval()
    contract = default_contract(net, cfg)
    torch.save({"model_config": cfg, "backbone": net.state_dict(), "contract": contract.to_dict()},
               tmp_path / "model.pt")
    loaded = load_model(tmp_path / "model.pt")
    assert is_nhwc(loaded.module)
    np.testing.assert_allclose(loaded.embed(faces()), embed_images(net, faces()), rtol=1e-4, atol=1e-4)
    a = export_model(net, tmp_path / "nchw.onnx", contract)
    b = export_model(loaded.module, tmp_path / "nhwc.onnx", contract)
    assert a.read_bytes() == b.read_bytes()
    assert is_nhwc(loaded.module)  # exporting leaves the loaded module as it was


def test_a_catalogue_index_describes_and_searches_in_nhwc(tmp_path):
    pytest.importorskip("faiss", reason="the catalogue index needs visrec[index]")
    from visrec.data.images import read_image
    from visrec.data.synth_products import write_product_dataset
    from visrec.index.catalogue import CatalogueIndex, IndexOptions, build_catalogue_index
    from visrec.models.inference import describe

    root = tmp_path / "p"
    write_product_dataset(root, families=2, products_per_family=2, variants=2, queries_per_product=1, seed=0,
                          size=64)
    torch.manual_seed(0)
    cfg = {"name": "product", "backbone": "resnet18", "dim": 16}
    net = build_backbone(**cfg).eval()
    build_catalogue_index(root / "catalogue", tmp_path / "idx", net, cfg, IndexOptions(size=64, batch_size=4))
    assert is_nhwc(net)
    index = CatalogueIndex(tmp_path / "idx")
    assert is_nhwc(index.model)
    stored = np.load(tmp_path / "idx" / "descriptors.npy")
    first = root / "catalogue" / f"{index.ids[0]}.jpg"
    again = describe(index.model, [read_image(first)], 64)
    np.testing.assert_allclose(again[0], stored[0], rtol=1e-4, atol=1e-4)


def test_a_distillation_teacher_is_frozen_in_nhwc(tmp_path):
    from visrec.train.distill_task import load_teacher

    cfg = {"name": "mobilefacenet", "scale": 1, "embedding_size": 32}
    torch.manual_seed(0)
    net = build_backbone(**cfg).eval()
    torch.save({"model_config": cfg, "backbone": net.state_dict()}, tmp_path / "model.pt")
    for spec in (cfg, tmp_path / "model.pt"):
        teacher, config, _ = load_teacher(spec)
        assert is_nhwc(teacher) and not teacher.training and config["name"] == "mobilefacenet"
        assert not any(p.requires_grad for p in teacher.parameters())
    np.testing.assert_allclose(embed_images(teacher, faces()), embed_images(net, faces()), rtol=1e-4, atol=1e-4)
