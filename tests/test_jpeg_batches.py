"""Batched JPEG decoding for face training (data.decode: batched): the same float batches as the per-image
worker path, the images it routes to the worker decoder, bad records named, and the Trainer's result
unchanged. On a CPU torchvision decodes with libjpeg-turbo, whose pixels equal OpenCV's; nvJPEG on a GPU is
checked by scripts/gpu_bench.sh."""

import json
import struct

import numpy as np
import pytest
import torch

from visrec.config import parse_config
from visrec.data.datasets import open_face_dataset
from visrec.data.images import encode_jpeg
from visrec.data.jpeg_batches import EncodedFaces, collate_encoded
from visrec.data.synth import write_face_dataset
from visrec.distributed import RunContext
from visrec.errors import ConfigError, DataError
from visrec.train import faces_task
from visrec.train.prefetch import prefetch
from visrec.train.task import TASKS
from visrec.train.trainer import train


def worker_batch(faces, index):
    items = [faces[i] for i in index]
    return torch.stack([t for t, _ in items]), torch.tensor([lab for _, lab in items])


def batched(faces, index):
    encoded = EncodedFaces(faces)
    return encoded.decode(collate_encoded([encoded[i] for i in index]), torch.device("cpu"))


def with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """The JPEG with an APP1 Exif segment holding one Orientation tag, after SOI."""
    tiff = b"MM\x00\x2a\x00\x00\x00\x08" + struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)
    tiff += b"\x00\x00\x00\x00"
    body = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + jpeg[2:]


@pytest.fixture(scope="module")
def face_rec(tmp_path_factory):
    root = tmp_path_factory.mktemp("rec") / "train"
    write_face_dataset(root, 5, 6, format="recordio", seed=2, difficulty=0.3)
    return root


def test_batches_equal_the_worker_path_on_recordio(face_rec):
    faces = open_face_dataset(face_rec)
    index = [3, 0, 17, 29, 8, 8]
    images, labels = batched(faces, index)
    want_images, want_labels = worker_batch(faces, index)
    assert images.dtype == torch.float32 and images.shape == (6, 3, 112, 112)
    assert torch.equal(images, want_images)
    assert torch.equal(labels, want_labels)


def test_images_the_batched_decoder_would_treat_differently_go_through_the_worker(tmp_path):
    rng = np.random.default_rng(0)
    person = tmp_path / "faces" / "alice"
    person.mkdir(parents=True)
    face = rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)
    face[:, :40] = 30  # not symmetric: a rotation shows
    import cv2

    (person / "a.jpg").write_bytes(encode_jpeg(face))
    cv2.imwrite(str(person / "b.png"), face[:, :, ::-1])
    (person / "c.jpg").write_bytes(encode_jpeg(cv2.resize(face, (100, 120))))
    (person / "d.jpg").write_bytes(with_exif_orientation(encode_jpeg(face), 6))
    faces = open_face_dataset(tmp_path / "faces")
    encoded = EncodedFaces(faces)
    assert [bool(encoded[i][1]) for i in range(4)] == [False, True, True, True]
    images, labels = batched(faces, [0, 1, 2, 3])
    want, _ = worker_batch(faces, [0, 1, 2, 3])
    assert torch.equal(images, want)
    # the EXIF image came out upright as OpenCV turns it: rotated, not the stored pixels
    assert not torch.equal(images[3], images[0])


def test_a_truncated_jpeg_is_named_by_record(face_rec, tmp_path):
    from visrec.data.recordio import RecordIOWriter

    out = tmp_path / "cut"
    good = encode_jpeg(np.full((112, 112, 3), 90, np.uint8))
    with RecordIOWriter(out) as writer:
        writer.add(good, 0)
        writer.add(good[: len(good) // 2], 1)
    encoded = EncodedFaces(open_face_dataset(out))
    encoded[0]
    with pytest.raises(DataError, match=r"truncated JPEG") as err:
        encoded[1]
    assert "train.rec" in str(err.value) and "record 2" in str(err.value)


def test_a_batch_crosses_from_a_worker_as_five_tensors_whatever_its_size(face_rec):
    """Hundreds of per-image byte tensors would each cross the process boundary on their own handle (and be
    pinned one by one): the worker packs them into one buffer, and the decode after a real worker equals the
    decode of the same items in this process."""
    from torch.utils.data import DataLoader

    faces = open_face_dataset(face_rec)
    encoded = EncodedFaces(faces)
    index = [3, 0, 17, 29, 8, 8, 11, 2, 25, 14]
    batch = collate_encoded([encoded[i] for i in index])
    assert len(batch) == 5 and all(isinstance(t, torch.Tensor) for t in batch)
    packed, lengths = batch[0], batch[1]
    assert packed.dtype == torch.uint8 and packed.dim() == 1 and int(lengths.sum()) == packed.numel()
    assert [bytes(v.numpy()) for v in torch.split(packed, lengths.tolist())] == \
        [bytes(encoded[i][0].numpy()) for i in index]
    loader = DataLoader(encoded, batch_sampler=[index], num_workers=1, collate_fn=collate_encoded)
    (from_worker,) = list(loader)
    got, want = encoded.decode(from_worker, torch.device("cpu")), batched(faces, index)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(got[0], worker_batch(faces, index)[0])

def test_a_batch_the_decoder_rejects_is_decoded_image_by_image_and_the_bad_one_named(face_rec):
    faces = open_face_dataset(face_rec)
    encoded = EncodedFaces(faces)
    items = [encoded[i] for i in (0, 1)]
    data = bytearray(items[1][0].numpy().tobytes())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = b"\x00\x00\x00\x00"  # height and width 0 in the frame header: no decoder takes it
    items[1] = (torch.frombuffer(data, dtype=torch.uint8), False, items[1][2], 1)
    with pytest.raises(DataError) as err:
        encoded.decode(collate_encoded(items), torch.device("cpu"))
    source, record = encoded.where(1)
    assert str(source) in str(err.value) and f"record {record}" in str(err.value)


def make_cfg(data_dir, out, **data):
    return parse_config({
        "task": "faces", "output": str(out), "device": "cpu", "seed": 5, "deterministic": True, "batch_size": 6,
        "model": {"name": "mobilefacenet", "embedding_size": 32},
        "data": {"train": str(data_dir), "flip": True, **data},
        "loss": {"name": "arcface", "s": 16.0, "m": 0.3}, "optim": {"name": "sgd", "lr": 0.05},
        "schedule": {"max_steps": 6, "warmup_steps": 1}, "checkpoint_every": 3, "log_every": 1,
        "num_workers": 0,
    })


def test_training_on_batched_decoding_is_the_same_run(face_rec, tmp_path):
    train(make_cfg(face_rec, tmp_path / "workers", decode="workers"), progress=False)
    train(make_cfg(face_rec, tmp_path / "batched", decode="batched"), progress=False)

    def losses(out):
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                if "loss" in line]

    assert len(losses(tmp_path / "batched")) == 6
    assert losses(tmp_path / "batched") == losses(tmp_path / "workers")


def test_decode_choice(face_rec, tmp_path, monkeypatch):
    ctx = RunContext(device=torch.device("cpu"))
    auto = TASKS.get("faces")(make_cfg(face_rec, tmp_path), ctx)
    assert not isinstance(auto.train_dataset(), EncodedFaces)  # auto decodes in workers off CUDA
    forced = TASKS.get("faces")(make_cfg(face_rec, tmp_path, decode="batched"), ctx)
    assert isinstance(forced.train_dataset(), EncodedFaces) and forced.collate_fn is collate_encoded
    monkeypatch.setattr(faces_task, "batched_decode_available", lambda: "torchvision.io.decode_jpeg is gone")
    with pytest.raises(ConfigError, match="data.decode: batched, but torchvision.io.decode_jpeg is gone"):
        TASKS.get("faces")(make_cfg(face_rec, tmp_path, decode="batched"), ctx).train_dataset()
    with pytest.raises(ConfigError, match="data.decode"):
        TASKS.get("faces")(make_cfg(face_rec, tmp_path, decode="gpu"), ctx)


def test_prefetch_off_cuda_prepares_each_batch_in_order():
    seen = []

    def to_device(batch):
        seen.append(batch)
        return batch * 10

    assert list(prefetch(iter([1, 2, 3]), to_device, torch.device("cpu"))) == [10, 20, 30]
    assert seen == [1, 2, 3]
