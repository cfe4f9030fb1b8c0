"""dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``) read into a PyTorch module.

Why: the ``dlib-bin`` wheel is built without BLAS, so its own convolutions take 53-205 ms a face on one CPU
thread (BENCHMARKS.md); the same weights run in PyTorch (oneDNN) about 8x faster, with descriptors that match
dlib's to ~1e-6 (tests/test_dlib_dnn.py holds them side by side).

The file is dlib's binary serialization of one network type, ``anet_type`` in dlib's
``tools/python/src/face_recognition.cpp``. The stream carries no type names for the wrappers (tags, skips),
so the reader walks the known type and checks every version, layer name, size and stride on the way;
anything else is a :class:`~visrec.errors.DataError` naming the file, the byte offset and what was
expected. Every size read from the file is bounded before anything is allocated: it is untrusted input.

The network, bottom up (input 150x150 RGB, pixels ``(v - channel mean) / 256``; channel means from the file):

- stem: conv 7x7 stride 2 (32 filters, no padding) -> affine -> ReLU -> max-pool 3x3 stride 2;
- residual stages of 32 (x3), 64 (down + x3), 128 (down + x2), 256 (down + x2), 256 (down): a block is
  conv 3x3 -> affine -> ReLU -> conv 3x3 -> affine; "down" blocks start with a stride-2 unpadded conv and
  add a 2x2 stride-2 average pool of their input; the sum is taken over the larger of the two shapes with
  the smaller zero-padded at the end of each axis (dlib's ``add_prev`` rule), then ReLU;
- global average pool -> 256x128 matrix, no bias -> the 128-d descriptor (not normalised).

dlib pads a stride-1 conv by half its size and a stride-2 conv or pool not at all; affine layers are the
inference form of batch norm (``gamma * x + beta`` per channel) and are folded into the conv before them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visrec._files import check_regular_file
from visrec.errors import DataError

INPUT_SIZE = 150
MAX_TENSOR_VALUES = 1 << 24  # 16M floats: the largest tensor of this network has 590K; refuse anything absurd
MAX_FILE_BYTES = 64 << 20   # the real file has 22 MB
MAX_STRING = 64              # layer version strings are short ("input_rgb_image_sized" is the longest, 21)

# (filters, residual blocks, first one is a down block) per stage, bottom up
STAGES = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))
EMBEDDING_DIM = 128


class _Reader:
    """dlib's serialization primitives over bytes, with the offset in every error."""

    def __init__(self, data: bytes, source: str):
        self.data, self.pos, self.source = memoryview(data), 0, source

    def fail(self, what: str):
        raise DataError(f"not dlib's face-recognition ResNet at byte {self.pos}: {what}", path=self.source)

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            self.fail(f"needs {n} more bytes, the file ends at {len(self.data)}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        """dlib's packed integer: a control byte (bit 7: negative, low 4 bits: byte count 1-8), then the
        magnitude's bytes, little-endian."""
        control = self.take(1)[0]
        size = control & 0x0F
        if size == 0 or size > 8 or control & 0x70:
            self.fail(f"bad integer control byte 0x{control:02x}")
        value = int.from_bytes(self.take(size), "little")
        return -value if control & 0x80 else value

    def float(self) -> float:
        """dlib's portable float: mantissa then exponent, both packed integers (value = m * 2**e)."""
        mantissa, exponent = self.int(), self.int()
        if exponent >= 32000:  # dlib's markers for inf / -inf / nan
            return float("nan")
        return float(np.ldexp(float(mantissa), exponent))

    def bool(self) -> bool:
        ch = bytes(self.take(1))
        if ch not in (b"0", b"1"):
            self.fail(f"expected a bool ('0' or '1'), found {ch!r}")
        return ch == b"1"

    def string(self) -> str:
        n = self.int()
        if not 0 <= n <= MAX_STRING:
            self.fail(f"a layer name of {n} bytes")
        return bytes(self.take(n)).decode("ascii", "replace")

    def version(self, expected: int | tuple[int, ...], what: str) -> int:
        v = self.int()
        if v not in (expected if isinstance(expected, tuple) else (expected,)):
            self.fail(f"{what}: version {v}, expected {expected}")
        return v

    def name(self, allowed: tuple[str, ...], what: str) -> str:
        start = self.pos
        s = self.string()
        if s not in allowed:
            self.pos = start
            self.fail(f"expected {what} ({' or '.join(allowed)}), found {s!r}")
        return s

    def tensor(self, what: str) -> np.ndarray:
        """A tensor: version 2, num_samples, k, nr, nc, then little-endian float32 values."""
        self.version(2, f"{what} tensor")
        dims = [self.int() for _ in range(4)]
        if any(d < 0 for d in dims):
            self.fail(f"{what}: negative tensor size {dims}")
        count = int(np.prod(dims, dtype=np.int64))
        if count > MAX_TENSOR_VALUES:
            self.fail(f"{what}: {count} values (limit {MAX_TENSOR_VALUES})")
        values = np.frombuffer(self.take(4 * count), dtype="<f4").astype(np.float32)
        return values.reshape(dims)

    def alias(self, what: str) -> tuple[int, ...]:
        self.version(1, f"{what} alias")
        return tuple(self.int() for _ in range(4))

    def flags_and_buffers(self, what: str, input_version: int | None = None) -> None:
        """What ``add_layer`` writes after a layer's details: three flags and its gradient / cache tensors
        (empty in a saved network; read and dropped); the input layer's (``input_version``) ends with a
        sample expansion factor from version 3 on."""
        for _ in range(3):
            self.bool()
        for buffer in ("x_grad", "cached_output", "params_grad" if input_version is None else "grad_final"):
            self.tensor(f"{what} {buffer}")
        if input_version is not None and input_version >= 3 and self.int() != 1:
            self.fail(f"{what}: a sample expansion factor other than 1")


@dataclass
class Conv:
    filters: int
    size: int
    stride: int
    weight: np.ndarray = field(repr=False)  # (filters, in, size, size)
    bias: np.ndarray = field(repr=False)    # (filters,)

    @property
    def padding(self) -> int:
        return _padding(self.size, self.stride)


@dataclass
class DlibResnetWeights:
    """What the file holds: channel means, the convolutions with their affine layers folded in (bottom up:
    stem, then two per block), the final matrix (256, 128), and the metric loss's settings."""

    channel_means: tuple[float, float, float]
    convs: list[Conv]
    fc: np.ndarray = field(repr=False)
    margin: float = 0.0
    distance_threshold: float = 0.0


def _conv(r: _Reader, filters: int, size: int, stride: int, inputs: int, what: str) -> Conv:
    version = r.name(("con_4", "con_5", "con_6"), f"{what}: a convolution")
    params = r.tensor(f"{what} params").ravel()
    got = (r.int(), r.int(), r.int(), r.int(), r.int())  # filters, nr, nc, stride_y, stride_x
    if got != (filters, size, size, stride, stride):
        r.fail(f"{what}: convolution (filters, rows, cols, stride y, stride x) = {got}, expected "
               f"{(filters, size, size, stride, stride)}")
    padding = (r.int(), r.int())
    want_pad = _padding(size, stride)
    if padding != (want_pad, want_pad):
        r.fail(f"{what}: padding {padding}, expected {(want_pad, want_pad)}")
    w_shape, b_shape = r.alias(f"{what} filters"), r.alias(f"{what} biases")
    for _ in range(4):  # learning-rate and weight-decay multipliers
        r.float()
    use_bias = True
    if version in ("con_5", "con_6"):
        use_bias = r.bool()
    if version == "con_6":
        r.bool()  # use_relu: a fused ReLU flag of newer dlib; the network here keeps ReLU as its own layer
    n_w = filters * inputs * size * size
    if w_shape != (filters, inputs, size, size) or params.size != n_w + (filters if use_bias else 0):
        r.fail(f"{what}: filters {w_shape} and {params.size} parameters, expected ({filters}, {inputs}, "
               f"{size}, {size})" + (f" and {filters} biases" if use_bias else ""))
    weight = params[:n_w].reshape(filters, inputs, size, size)
    bias = params[n_w:] if use_bias else np.zeros(filters, np.float32)
    if use_bias and b_shape[1] != filters:
        r.fail(f"{what}: biases {b_shape}, expected {filters}")
    return Conv(filters, size, stride, weight, bias)


def _affine(r: _Reader, channels: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """An affine layer (or a batch norm saved in training form: folded with its running statistics)."""
    kind = r.name(("affine_", "affine_2", "bn_con2"), f"{what}: an affine layer")
    if kind == "bn_con2":
        params = r.tensor(f"{what} params").ravel()
        r.alias(f"{what} gamma"), r.alias(f"{what} beta")
        r.tensor(f"{what} means"), r.tensor(f"{what} invstds")
        mean, var = r.tensor(f"{what} running means").ravel(), r.tensor(f"{what} running variances").ravel()
        r.int(), r.int()  # num_updates, running_stats_window_size
        for _ in range(4):
            r.float()
        eps = r.float()
        if params.size != 2 * channels or mean.size != channels or var.size != channels:
            r.fail(f"{what}: batch norm of {params.size // 2} channels, expected {channels}")
        gamma = params[:channels] / np.sqrt(var + eps)
        return gamma, params[channels:] - mean * gamma
    params = r.tensor(f"{what} params").ravel()
    r.alias(f"{what} gamma"), r.alias(f"{what} beta")
    mode = r.int()
    if mode != 0:  # dlib's CONV_MODE: one gamma and beta per channel
        r.fail(f"{what}: affine layer mode {mode}, expected 0 (per channel)")
    if kind == "affine_2":
        r.bool()  # disabled
    if params.size != 2 * channels:
        r.fail(f"{what}: affine layer of {params.size // 2} channels, expected {channels}")
    return params[:channels], params[channels:]


def _relu(r: _Reader, what: str) -> None:
    if r.name(("relu_", "relu_2"), f"{what}: a ReLU") == "relu_2":
        r.bool()


def _pool(r: _Reader, kinds: tuple[str, ...], size: int, stride: int, what: str) -> None:
    r.name(kinds, what)
    got = (r.int(), r.int(), r.int(), r.int())
    padding = (r.int(), r.int())
    want_pad = _padding(size, stride)
    if got != (size, size, stride, stride) or padding != (want_pad, want_pad):
        r.fail(f"{what}: (rows, cols, stride y, stride x) = {got}, padding {padding}; expected "
               f"{(size, size, stride, stride)}, padding {(want_pad, want_pad)}")


def _layers_bottom_up() -> list[tuple]:
    """The network's serialized nodes from the input up: ("layer", kind, args) for each ``add_layer`` (what
    writes a header on the way down and its details on the way up) and ("wrap",) for the tag and skip
    layers, which write only a header."""
    nodes: list[tuple] = [("layer", "conv", (32, 7, 2, 3)), ("layer", "affine", (32,)), ("layer", "relu", ()),
                          ("layer", "max_pool", (3, 2))]
    channels = 32
    for filters, blocks, down in STAGES:
        for b in range(blocks):
            stride = 2 if down and b == 0 else 1
            nodes.append(("wrap",))  # tag1: the block's input
            nodes += [("layer", "conv", (filters, 3, stride, channels)), ("layer", "affine", (filters,)),
                      ("layer", "relu", ()), ("layer", "conv", (filters, 3, 1, filters)),
                      ("layer", "affine", (filters,))]
            if stride == 2:
                nodes += [("wrap",), ("wrap",), ("layer", "avg_pool", (2, 2))]  # tag2, skip1, the pooled input
            nodes += [("layer", "add_prev", ()), ("layer", "relu", ())]
            channels = filters
    nodes += [("layer", "avg_pool_everything", ()), ("layer", "fc", (EMBEDDING_DIM, channels))]
    return nodes


def read_dlib_resnet(path: str | Path) -> DlibResnetWeights:
    """Read ``dlib_face_recognition_resnet_model_v1.dat`` (or a file of the same network type)."""
    path = check_regular_file(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:  # before reading it into memory
            raise DataError(f"{size} bytes, more than any dlib face-recognition ResNet (22 MB)", path=path)
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read the dlib model file ({exc.strerror or exc})", path=path) from None
    r = _Reader(data, str(path))
    r.version(1, "the metric loss layer")
    loss = r.name(("loss_metric_", "loss_metric_2"), "the metric loss")
    margin, threshold = (r.float(), r.float()) if loss == "loss_metric_2" else (0.1, 0.75)  # dlib's old defaults
    nodes = _layers_bottom_up()
    # on the way down: a header per node, top first; the bottom convolution's add_layer is the one that
    # holds the input layer (its own version range)
    for i, node in enumerate(reversed(nodes)):
        if node[0] == "wrap":
            r.version(1, "a tag or skip layer")
        elif i == len(nodes) - 1:
            input_version = r.version((2, 3), "the input convolution")
        else:
            r.version((1, 2), f"the {node[1]} layer")
    r.name(("input_rgb_image_sized",), "the input layer")
    means = (r.float(), r.float(), r.float())
    if (r.int(), r.int()) != (INPUT_SIZE, INPUT_SIZE):
        r.fail(f"the input layer is not {INPUT_SIZE}x{INPUT_SIZE}")
    convs: list[Conv] = []
    fc = None
    for i, node in enumerate(n for n in nodes if n[0] == "layer"):
        kind, args = node[1], node[2]
        what = f"layer {i} ({kind})"
        if kind == "conv":
            convs.append(_conv(r, *args, what))
        elif kind == "affine":
            gamma, beta = _affine(r, *args, what)
            conv = convs[-1]  # every affine layer here follows a convolution: fold it in
            conv.weight = conv.weight * gamma[:, None, None, None]
            conv.bias = conv.bias * gamma + beta
        elif kind == "relu":
            _relu(r, what)
        elif kind == "max_pool":
            _pool(r, ("max_pool_2",), *args, what + ": a max pool")
        elif kind == "avg_pool":
            _pool(r, ("avg_pool_2",), *args, what + ": an average pool")
        elif kind == "avg_pool_everything":
            _pool(r, ("avg_pool_2",), 0, 1, what + ": the global average pool")
        elif kind == "add_prev":
            r.name(("add_prev_",), what)
        elif kind == "fc":
            fc = _fc(r, *args, what)
        r.flags_and_buffers(what, input_version if i == 0 else None)
    if r.pos != len(data):
        r.fail(f"{len(data) - r.pos} bytes after the network")
    return DlibResnetWeights(means, convs, fc, margin, threshold)


def _fc(r: _Reader, outputs: int, inputs: int, what: str) -> np.ndarray:
    version = r.name(("fc_2", "fc_3"), f"{what}: a fully connected layer")
    got = (r.int(), r.int())
    params = r.tensor(f"{what} params").ravel()
    r.alias(f"{what} weights"), r.alias(f"{what} biases")
    bias_mode = r.int()
    for _ in range(4):
        r.float()
    if version == "fc_3":
        r.bool()
    if got != (outputs, inputs) or bias_mode != 1 or params.size != outputs * inputs:
        r.fail(f"{what}: {got[1]} -> {got[0]}, bias mode {bias_mode}, {params.size} parameters; expected "
               f"{inputs} -> {outputs} without bias (mode 1)")
    return params.reshape(inputs, outputs)


def dlib_resnet_module(weights: DlibResnetWeights):
    """A ``torch.nn.Module``: (n, 150, 150, 3) uint8 RGB chips -> (n, 128) float32 descriptors, dlib's
    arithmetic (zero-padded sums, no padding at stride 2) with the affine layers folded into the convs."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def conv_layer(c: Conv) -> nn.Conv2d:
        m = nn.Conv2d(c.weight.shape[1], c.filters, c.size, c.stride, c.padding)
        m.weight.data = torch.from_numpy(np.ascontiguousarray(c.weight, np.float32))
        m.bias.data = torch.from_numpy(np.ascontiguousarray(c.bias, np.float32))
        return m

    class Block(nn.Module):
        def __init__(self, first: Conv, second: Conv, pad_sum: tuple[int, int, int] | None):
            super().__init__()
            self.conv1, self.conv2 = conv_layer(first), conv_layer(second)
            # down blocks: (extra rows/cols for the block's output, extra channels for the pooled input)
            self.pad_sum = pad_sum

        def forward(self, x):
            y = self.conv2(F.relu(self.conv1(x)))
            if self.pad_sum is None:
                return F.relu(y + x)
            pooled = F.avg_pool2d(x, 2, 2)
            grow_y, grow_pool_spatial, grow_pool_channels = self.pad_sum
            y = F.pad(y, (0, grow_y, 0, grow_y))
            pooled = F.pad(pooled, (0, grow_pool_spatial, 0, grow_pool_spatial, 0, grow_pool_channels))
            return F.relu(y + pooled)

    class DlibResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.tensor(weights.channel_means, dtype=torch.float32).view(1, 3, 1, 1))
            self.stem = conv_layer(weights.convs[0])
            blocks, side, channels = [], _after(_after(INPUT_SIZE, 7, 2, 0), 3, 2, 0), 32
            pairs = iter(weights.convs[1:])
            for first in pairs:
                second = next(pairs)
                pad = None
                if first.stride == 2:
                    conv_side, pool_side = _after(side, 3, 2, 0), _after(side, 2, 2, 0)
                    out = max(conv_side, pool_side)
                    pad = (out - conv_side, out - pool_side, first.filters - channels)
                    side = out
                blocks.append(Block(first, second, pad))
                channels = first.filters
            self.blocks = nn.Sequential(*blocks)
            self.fc = nn.Linear(weights.fc.shape[0], weights.fc.shape[1], bias=False)
            self.fc.weight.data = torch.from_numpy(np.ascontiguousarray(weights.fc.T, np.float32))

        def forward(self, chips):
            x = (chips.permute(0, 3, 1, 2).float() - self.mean) / 256.0
            x = F.max_pool2d(F.relu(self.stem(x)), 3, 2)
            x = self.blocks(x)
            return self.fc(x.mean(dim=(2, 3)))

    return DlibResNet().eval()


def _padding(size: int, stride: int) -> int:
    """dlib's default padding of a conv or pool window: half the window at stride 1, none otherwise."""
    return 0 if stride != 1 else size // 2


def _after(side: int, size: int, stride: int, padding: int) -> int:
    """dlib's (and torch's) output side of a window: 1 + (side + 2 padding - size) // stride."""
    return 1 + (side + 2 * padding - size) // stride

