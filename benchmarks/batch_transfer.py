"""What a batch of encoded face JPEGs costs the training process to receive from a DataLoader worker: the batch
as one packed byte buffer (``visrec.data.jpeg_batches.collate_encoded``) against the same items as a list of
per-image byte tensors (how a plain collate hands them over). Each tensor crosses the process boundary on its
own shared-memory handle, so the list pays per image; the packed buffer pays once per batch.

The workers read a synthetic ``.rec`` (``visrec.data.synth``, 112x112 JPEGs) and are given time to fill the
loader's queue first, so the timed ``next()`` calls measure the hand-over, not the reading.

    python benchmarks/batch_transfer.py --batch 512 --batches 8 --workers 2
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from torch.utils.data import DataLoader


def per_image_list(items):
    datas, is_pixels, labels, index = zip(*items)
    return list(datas), torch.tensor(is_pixels), torch.tensor(labels), torch.tensor(index)


def receive_ms(dataset, collate, batch: int, batches: int, workers: int) -> float:
    sampler = [list(range(k * batch, (k + 1) * batch)) for k in range(batches + 2)]
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                        prefetch_factor=max(2, -(-(batches + 2) // workers)))
    it = iter(loader)
    next(it)
    next(it)
    time.sleep(3.0)  # the workers fill the queue: what follows is the hand-over alone
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return (time.perf_counter() - t) / batches * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    from visrec.data.datasets import open_face_dataset
    from visrec.data.jpeg_batches import EncodedFaces, collate_encoded
    from visrec.data.synth import write_face_dataset

    with tempfile.TemporaryDirectory(prefix="visrec-transfer-") as tmp:
        images = a.batch * (a.batches + 2)
        root = write_face_dataset(f"{tmp}/train", -(-images // 20), 20, format="recordio", seed=0)
        encoded = EncodedFaces(open_face_dataset(root))
        size = sum(encoded[i][0].numel() for i in range(64)) / 64
        print(f"{len(encoded):,} JPEGs of {size:,.0f} B on average, batch {a.batch}, {a.workers} workers")
        packed = receive_ms(encoded, collate_encoded, a.batch, a.batches, a.workers)
        listed = receive_ms(encoded, per_image_list, a.batch, a.batches, a.workers)
    print(f"per-image tensors: {listed:,.1f} ms per batch; packed buffer (visrec): {packed:,.1f} ms per batch; "
          f"ratio {listed / packed:,.1f}x")


if __name__ == "__main__":
    main()
