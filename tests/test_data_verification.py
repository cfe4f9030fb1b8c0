"""Verification .bin (pickle of (encoded images, issame)): round trips, the Python 2 files InsightFace
ships, numpy issame variants, and a restricted unpickler that refuses anything else before it runs."""

import os
import pickle
import struct

import numpy as np
import pytest

from visrec.data.images import encode_jpeg
from visrec.data.verification import read_verification_bin, write_verification_bin
from visrec.errors import DataError


def smooth_images(n, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 190, (n, 1, 1, 3))
    ramp = np.linspace(0, 60, 112)[:, None, None]
    return np.clip(base + ramp + np.zeros((n, 112, 112, 3)), 0, 255).astype(np.uint8)


def close(a, b):
    return np.abs(a.astype(int) - b.astype(int)).mean() < 4


def test_round_trip_arrays_and_bytes(tmp_path):
    imgs = smooth_images(6)
    items = list(imgs[:4]) + [encode_jpeg(imgs[4]), encode_jpeg(imgs[5])]
    path = write_verification_bin(tmp_path / "v.bin", items, [True, False, True])
    back, issame = read_verification_bin(path)
    assert issame.dtype == bool and issame.tolist() == [True, False, True]
    assert len(back) == 6 and all(close(b, a) for a, b in zip(imgs, back))
    # what InsightFace's loader does: a plain pickle.load gives (list of bytes, list of bool)
    with open(path, "rb") as fh:
        bins, flags = pickle.load(fh)
    assert all(isinstance(b, bytes) for b in bins) and flags == [True, False, True]
    with pytest.raises(ValueError, match="6 images for 2 pairs"):
        write_verification_bin(tmp_path / "w.bin", items, [True, False])


def py2_bin(bins, issame) -> bytes:
    """A protocol-2 pickle as Python 2 writes ([str, ...], [bool, ...]): BINSTRING opcodes, no globals."""
    out = bytearray(b"\x80\x02(")
    for b in bins:
        out += (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))) + b
    out += b"l("
    out += b"".join(b"\x88" if x else b"\x89" for x in issame)
    out += b"l\x86."
    return bytes(out)


def test_python2_bin_as_insightface_ships_it(tmp_path):
    imgs = smooth_images(4, seed=3)
    path = tmp_path / "lfw.bin"
    path.write_bytes(py2_bin([encode_jpeg(im) for im in imgs], [False, True]))
    with open(path, "rb") as fh:  # why InsightFace needs encoding='bytes': py2 str is not UTF-8
        with pytest.raises(UnicodeDecodeError):
            pickle.load(fh)
    back, issame = read_verification_bin(path)
    assert issame.tolist() == [False, True] and all(close(b, a) for a, b in zip(imgs, back))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_issame_variants(tmp_path, protocol):
    bins = [encode_jpeg(im) for im in smooth_images(4)]
    for issame in (np.array([True, False]), [np.bool_(False), np.bool_(True)], np.array([1, 0], np.int64)):
        path = tmp_path / f"np{protocol}.bin"
        path.write_bytes(pickle.dumps((bins, issame), protocol=protocol))
        _, got = read_verification_bin(path)
        assert got.tolist() == np.asarray(issame).astype(bool).tolist()


class RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class RunsEval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({self.marker!r}, 'w').close()",))


@pytest.mark.parametrize("evil", [RunsShell, RunsEval])
@pytest.mark.parametrize("where", ["images", "issame"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, evil, where):
    marker = tmp_path / "pwned"
    payload = evil(str(marker))
    obj = ([payload, b"x"], [True]) if where == "images" else ([b"x", b"y"], [payload])
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(DataError, match=r"evil\.bin: refusing to load ((posix|nt|os)\.system|(__builtin__|builtins)\.eval)"):
        read_verification_bin(path)
    assert not marker.exists()


def test_the_malicious_payload_is_live_under_plain_pickle(tmp_path):
    # guards the test above: the same bytes do run code when loaded without the restriction
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(([RunsEval(str(marker)), b"x"], [True]), protocol=2))
    assert marker.exists()


def test_other_globals_are_refused(tmp_path):
    from collections import OrderedDict

    path = tmp_path / "od.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b"], OrderedDict(x=True))))
    with pytest.raises(DataError, match=r"refusing to load collections\.OrderedDict"):
        read_verification_bin(path)


def test_structure_and_image_errors(tmp_path):
    good = [encode_jpeg(im) for im in smooth_images(2)]
    cases = {
        "count.bin": ((good, [True, False]), r"2 images for 2 pairs"),
        "notbytes.bin": (([good[0], 7], [True]), r"record 1.*int, not encoded image bytes"),
        "strflags.bin": ((good, ["yes"]), r"issame must hold booleans"),
        "notlist.bin": (({"a": 1}, [True]), r"images must be a list"),
        "shape.bin": ((good,), r"not a verification \.bin"),
        "decode.bin": (([good[0], b"garbage"], [True]), r"decode\.bin.*record 1.*not a decodable image"),
    }
    for name, (obj, pattern) in cases.items():
        path = tmp_path / name
        path.write_bytes(pickle.dumps(obj, protocol=2))
        with pytest.raises(DataError, match=pattern):
            read_verification_bin(path)
    (tmp_path / "random.bin").write_bytes(np.random.default_rng(0).bytes(64))
    with pytest.raises(DataError, match=r"random\.bin"):
        read_verification_bin(tmp_path / "random.bin")
    (tmp_path / "cut.bin").write_bytes(pickle.dumps((good, [True]), protocol=2)[:100])
    with pytest.raises(DataError, match=r"cut\.bin"):
        read_verification_bin(tmp_path / "cut.bin")
    with pytest.raises(DataError, match=r"missing\.bin.*cannot read"):
        read_verification_bin(tmp_path / "missing.bin")
