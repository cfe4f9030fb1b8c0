"""A catalogue index directory from elsewhere: a broken manifest or id list is a DataError naming the file; a
torn descriptor shard from an interrupted build is computed again, not trusted."""

import numpy as np
import pytest

pytest.importorskip("faiss", reason="catalogue indexes need visrec[products]")

from visrec.errors import DataError, VisrecError  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from visrec.data.synth_products import write_product_dataset
    from visrec.index.catalogue import IndexOptions, build_catalogue_index
    from visrec.models import build_backbone

    root = tmp_path_factory.mktemp("catalogue")
    write_product_dataset(root / "p", families=2, products_per_family=2, variants=2, queries_per_product=1, size=64)
    desc = build_backbone("product", backbone="resnet18", dim=16)
    opts = IndexOptions(size=64, shard_size=3)
    build_catalogue_index(root / "p" / "catalogue", root / "idx", desc, {"name": "product", "backbone": "resnet18",
                                                                          "dim": 16}, opts)
    return root, desc, opts


@pytest.mark.parametrize("name, content, words", [
    ("manifest.json", b"\xff\xfe not utf-8", "manifest"),
    ("manifest.json", b"{not json", "manifest"),
    ("manifest.json", b'{"options": {"size": 64, "evil": 1}}', "evil"),
    ("ids.txt", b"abc\n\xff\n", "ids"),
])
def test_a_broken_index_file_is_a_data_error_naming_it(built, tmp_path, name, content, words):
    import shutil

    from visrec.index.catalogue import CatalogueIndex

    root, _, _ = built
    shutil.copytree(root / "idx", tmp_path / "idx")
    (tmp_path / "idx" / name).write_bytes(content)
    with pytest.raises(VisrecError) as err:  # a DataError, or a ConfigError for an unknown option
        CatalogueIndex(tmp_path / "idx")
    assert words in str(err.value) and name in str(err.value)


def test_a_torn_shard_is_computed_again(built, tmp_path):
    import shutil

    from visrec.data.products import list_images
    from visrec.index.catalogue import extract_descriptors

    root, desc, opts = built
    shutil.copytree(root / "idx", tmp_path / "idx")
    items = list_images(root / "p" / "catalogue")
    ids, ref, _ = extract_descriptors(desc, items, tmp_path / "idx", opts)
    shard = sorted((tmp_path / "idx" / "shards").glob("*.npz"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a crash mid-write of an old build
    again, vecs, _ = extract_descriptors(desc, items, tmp_path / "idx", opts)
    assert again == ids
    np.testing.assert_allclose(vecs, ref, atol=1e-5)


def test_a_faiss_file_declaring_more_than_it_holds_is_refused_without_allocating_it(tmp_path):
    import resource
    import struct

    import faiss

    from visrec.index.faiss_index import FaissIndex

    index = faiss.IndexFlatIP(16)
    index.add(np.eye(10, 16, dtype=np.float32))
    faiss.write_index(index, str(tmp_path / "ok.faiss"))
    raw = bytearray((tmp_path / "ok.faiss").read_bytes())
    at = raw.find(struct.pack("<Q", 160))  # the length of the stored vectors (10 x 16 floats)
    raw[at:at + 8] = struct.pack("<Q", 2 << 30)  # 8 GB of floats declared in a 685-byte file
    (tmp_path / "bad.faiss").write_bytes(bytes(raw))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DataError, match="bad.faiss"):
        FaissIndex.load(tmp_path / "bad.faiss")
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) < 200 * 1024  # KiB: nothing touched here
    assert len(FaissIndex.load(tmp_path / "ok.faiss")) == 10


def test_a_shard_lying_about_its_size_is_computed_again_without_allocating_it(built, tmp_path):
    import io
    import shutil
    import struct
    import tracemalloc
    import zipfile
    import zlib

    from visrec.data.products import list_images
    from visrec.index.catalogue import _finished_shard, extract_descriptors

    root, desc, opts = built
    shutil.copytree(root / "idx", tmp_path / "idx")
    items = list_images(root / "p" / "catalogue")
    ids, ref, _ = extract_descriptors(desc, items, tmp_path / "idx", opts)
    shard = sorted((tmp_path / "idx" / "shards").glob("*.npz"))[0]
    # the shard's 'vectors' member STORED with a .npy header declaring 1 GiB and a zip64 central-directory
    # entry claiming that size; its real bytes are the header and 64 zeros
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (2**28,)})
    data, name = header.getvalue() + b"\0" * 64, b"vectors.npy"
    crc = zlib.crc32(data)
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, 0, 0, 0, crc, len(data), len(data), len(name), 0)
    extra = struct.pack("<HHQ", 1, 8, 2**30)
    cd = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 0, 0, 0, crc, len(data), 0xFFFFFFFF, len(name),
                     len(extra), 0, 0, 0, 0, 0) + name + extra
    body = local + name + data
    shard.write_bytes(body + cd + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(cd), len(body), 0))
    assert zipfile.ZipFile(shard).infolist()[0].file_size == 2**30  # zipfile believes the claim
    tracemalloc.start()
    try:
        assert _finished_shard(shard) is None  # unreadable: computed again, never trusted
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20, f"{peak:,} bytes traced"
    again, vecs, _ = extract_descriptors(desc, items, tmp_path / "idx", opts)
    assert again == ids
    np.testing.assert_allclose(vecs, ref, atol=1e-5)
