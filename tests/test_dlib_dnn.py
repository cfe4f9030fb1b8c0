"""dlib's face-recognition ResNet read from its own file into PyTorch (visrec.models.dlib_dnn): the same
descriptors as dlib on random and real chips, every malformed file a DataError naming the file and byte, and
the embedder's runtimes."""

from __future__ import annotations

import numpy as np
import pytest

from visrec.errors import DataError, VisrecError

RESNET = "dlib_face_recognition_resnet_model_v1.dat"


@pytest.fixture(scope="module")
def resnet_file(faces_dir):
    from visrec.models.dlib_models import model_file

    return model_file(RESNET)


@pytest.fixture(scope="module")
def both(resnet_file):
    from visrec.models.dlib_models import DlibResnetEmbedder

    return DlibResnetEmbedder(runtime="torch"), DlibResnetEmbedder(runtime="dlib")


def test_reads_the_network(resnet_file):
    from visrec.models.dlib_dnn import read_dlib_resnet

    w = read_dlib_resnet(resnet_file)
    assert len(w.convs) == 29  # the stem and two per residual block (3 + 4 + 3 + 3 + 1 blocks)
    assert [c.filters for c in w.convs[:2]] == [32, 32] and w.convs[-1].filters == 256
    assert w.fc.shape == (256, 128)
    np.testing.assert_allclose(w.channel_means, (122.782, 117.001, 104.298), atol=1e-3)
    assert w.distance_threshold == pytest.approx(0.6)  # the file's own metric-loss threshold: dlib's 0.6


def test_same_descriptors_as_dlib_on_random_chips(both):
    torch_run, dlib_run = both
    chips = np.random.default_rng(0).integers(0, 256, (5, 150, 150, 3), dtype=np.uint8)
    ours, theirs = torch_run.embed_chips(chips), dlib_run.embed_chips(chips)
    assert ours.shape == (5, 128) and ours.dtype == np.float32
    assert np.abs(ours - theirs).max() < 1e-4
    # and not trivially: different chips give descriptors far apart on this scale
    assert np.linalg.norm(ours[0] - ours[1]) > 0.05


def test_same_descriptors_as_dlib_on_real_faces(both, faces_dir):
    import visrec
    from visrec.models.dlib_models import build_external

    torch_run, dlib_run = both
    detector, landmarks = build_external("dlib-hog"), build_external("dlib-68")
    chips = []
    for name in ("obama.jpg", "biden.jpg", "obama2.jpg"):
        image = visrec.load_image(faces_dir / name)
        box, _ = detector(image)[0]
        chips.append(torch_run.chip(image, landmarks(image, box)))
    ours, theirs = torch_run.embed_chips(np.stack(chips)), dlib_run.embed_chips(np.stack(chips))
    assert np.abs(ours - theirs).max() < 1e-4
    same, other = np.linalg.norm(ours[0] - ours[2]), np.linalg.norm(ours[0] - ours[1])
    assert same < 0.6 < other  # Obama twice within dlib's threshold, Biden beyond it


def test_empty_batch(both):
    assert both[0].embed_chips(np.zeros((0, 150, 150, 3), np.uint8)).shape == (0, 128)


def test_runtime_choice(resnet_file):
    from visrec.models.dlib_models import DlibResnetEmbedder

    assert DlibResnetEmbedder().runtime == "torch"
    assert DlibResnetEmbedder(num_jitters=2).runtime == "dlib"  # jittering is dlib's own
    with pytest.raises(VisrecError, match="num_jitters"):
        DlibResnetEmbedder(num_jitters=2, runtime="torch")
    with pytest.raises(VisrecError, match="runtime 'tf'"):
        DlibResnetEmbedder(runtime="tf")


def test_pipeline_reports_the_runtime(faces_dir):
    import visrec

    fa = visrec.FaceAnalysis("dlib-resnet")
    assert fa.pipeline.embedder.runtime == "torch"
    faces = fa.faces(faces_dir / "obama.jpg")
    assert len(faces) == 1 and faces[0].embedding.shape == (128,)


# --- malformed files ------------------------------------------------------------------------------------

def _first_params_tensor(data: bytes) -> int:
    """Offset of the stem convolution's parameter tensor: after the name ``con_4`` (or 5, 6)."""
    return data.index(b"con_") + len(b"con_4")


def _packed(value: int) -> bytes:
    raw = value.to_bytes(8, "little").rstrip(b"\0") or b"\0"
    return bytes([len(raw)]) + raw


def _read(path):
    from visrec.models.dlib_dnn import read_dlib_resnet

    return read_dlib_resnet(path)


@pytest.mark.parametrize("cut", [0, 10, 5000, -1000])
def test_truncated_file(resnet_file, tmp_path, cut):
    data = resnet_file.read_bytes()
    bad = tmp_path / "cut.dat"
    bad.write_bytes(data[:cut])
    with pytest.raises(DataError, match=r"cut\.dat.*(byte \d+|ends)"):
        _read(bad)


def test_huge_tensor_is_refused_before_allocation(resnet_file, tmp_path):
    data = resnet_file.read_bytes()
    at = _first_params_tensor(data)
    assert data[at:at + 2] == b"\x01\x02"  # the tensor's version
    header = b"\x01\x02" + _packed(1 << 40) + _packed(32) + _packed(1) + _packed(1)
    rest = data[at + 2:]
    for _ in range(4):  # skip the four packed sizes of the real header
        rest = rest[1 + rest[0]:]
    bad = tmp_path / "huge.dat"
    bad.write_bytes(data[:at] + header + rest)
    with pytest.raises(DataError, match=r"huge\.dat.*values \(limit"):
        _read(bad)


def test_wrong_layer_and_wrong_shape(resnet_file, tmp_path):
    data = resnet_file.read_bytes()
    renamed = tmp_path / "renamed.dat"
    renamed.write_bytes(data.replace(b"\x05con_4", b"\x05cxn_4", 1))
    with pytest.raises(DataError, match=r"renamed\.dat.*expected layer 0 \(conv\): a convolution.*'cxn_4'"):
        _read(renamed)
    wider = tmp_path / "stride.dat"
    at = _first_params_tensor(data)
    # the stem's stride (2, packed as 01 02) follows its params tensor and filters/rows/cols: make it 3
    from visrec.models.dlib_dnn import _Reader

    r = _Reader(data, "x")
    r.pos = at
    r.tensor("stem")
    r.int(), r.int(), r.int()
    stride_at = r.pos
    assert data[stride_at:stride_at + 2] == b"\x01\x02"
    wider.write_bytes(data[:stride_at] + b"\x01\x03" + data[stride_at + 2:])
    with pytest.raises(DataError, match=r"stride\.dat.*convolution \(filters, rows, cols, stride y, stride x\) "
                                        r"= \(32, 7, 7, 3, 2\)"):
        _read(wider)


def test_other_dlib_files_and_trailing_bytes(resnet_file, faces_dir, tmp_path):
    from visrec.models.dlib_models import model_file

    with pytest.raises(DataError, match="shape_predictor_5_face_landmarks.dat"):
        _read(model_file("shape_predictor_5_face_landmarks.dat"))
    longer = tmp_path / "longer.dat"
    longer.write_bytes(resnet_file.read_bytes() + b"\0\0\0")
    with pytest.raises(DataError, match="3 bytes after the network"):
        _read(longer)
    with pytest.raises(DataError, match="missing.dat.*cannot read"):
        _read(tmp_path / "missing.dat")
    sparse = tmp_path / "sparse.dat"
    with open(sparse, "wb") as f:
        f.truncate(100 << 20)  # 100 MB of holes: refused by its size, never read
    with pytest.raises(DataError, match=r"sparse\.dat.*104857600 bytes, more than any"):
        _read(sparse)
