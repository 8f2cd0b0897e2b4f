"""A numpy reader for dlib's DNN serialisation (``dlib_face_recognition_resnet_model_v1.dat``).

Only used by the one-off conversion (``python -m tools.convert_dlib``); nothing
at run time reads ``.dat`` files. Reading never executes code: the format is plain data.

dlib's encoding (dlib/serialize.h, dlib/dnn/*.h):
- integers: one control byte (low nibble = number of bytes that follow, bit 0x80 = negative),
  then the magnitude in little-endian bytes;
- floating point: mantissa integer then exponent integer (value = m * 2**e);
- strings: length integer then the bytes; bools: ASCII ``'0'``/``'1'``;
- tensors: version 2, then four dims (n, k, nr, nc), then n*k*nr*nc little-endian float32;
- alias tensors (views into a layer's one params tensor, laid out one after the other):
  version 1, then (n, k, nr, nc).

A network is nested ``add_layer``s; each writes its version, then its sub-network, then its
layer details and a trailer, so the file holds every wrapper's version first (outermost
first), then the input layer, then the layers' details from the input up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class DlibFormatError(ValueError):
    """The file does not follow dlib's serialisation as this reader expects it."""


class DlibStream:
    """Sequential reader over the bytes of a dlib-serialised file."""

    def __init__(self, data: bytes, name: str = "<bytes>"):
        self.data = data
        self.pos = 0
        self.name = name

    def _fail(self, what: str) -> DlibFormatError:
        return DlibFormatError(f"{self.name}: {what} at byte {self.pos}")

    def read_bytes(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise self._fail(f"unexpected end of file reading {n} bytes")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def read_int(self) -> int:
        control = self.read_bytes(1)[0]
        size = control & 0x0F
        if size > 8:
            raise self._fail(f"bad integer control byte 0x{control:02x}")
        value = int.from_bytes(self.read_bytes(size), "little") if size else 0
        return -value if control & 0x80 else value

    def read_float(self) -> float:
        mantissa = self.read_int()
        exponent = self.read_int()
        return float(mantissa) * 2.0**exponent

    def read_string(self) -> str:
        length = self.read_int()
        if length < 0 or length > 1024:
            raise self._fail(f"implausible string length {length}")
        return self.read_bytes(length).decode("ascii")

    def read_bool(self) -> bool:
        ch = self.read_bytes(1)
        if ch not in (b"0", b"1"):
            raise self._fail(f"bad bool byte {ch!r}")
        return ch == b"1"

    def read_tensor(self) -> np.ndarray:
        version = self.read_int()
        if version != 2:
            raise self._fail(f"tensor version {version} (expected 2)")
        dims = tuple(self.read_int() for _ in range(4))
        count = int(np.prod(dims))
        raw = self.read_bytes(4 * count)
        return np.frombuffer(raw, dtype="<f4").reshape(dims).astype(np.float32)

    def read_alias_tensor(self) -> tuple[int, ...]:
        version = self.read_int()
        if version != 1:
            raise self._fail(f"alias tensor version {version} (expected 1)")
        return tuple(self.read_int() for _ in range(4))  # n, k, nr, nc

    def peek_string(self) -> str | None:
        """The string starting here, or None if the bytes here do not look like one."""
        saved = self.pos
        try:
            s = self.read_string()
            return s if s and all(c.isalnum() or c == "_" for c in s) else None
        except (DlibFormatError, UnicodeDecodeError):
            return None
        finally:
            self.pos = saved


@dataclass
class DlibLayer:
    """One layer's details: ``kind`` (e.g. ``con``, ``affine``), its fields and tensors."""

    kind: str
    fields: dict = field(default_factory=dict)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class DlibNetwork:
    """A parsed dlib metric-learning network: loss settings, input settings, layers input-up."""

    loss: dict
    input: dict
    wrapper_versions: list[int]
    layers: list[DlibLayer]


def _read_trailer(s: DlibStream) -> None:
    """The add_layer trailer: 3 bools and 3 (normally empty) tensors; discarded."""
    for _ in range(3):
        s.read_bool()
    for _ in range(3):
        s.read_tensor()


def _read_layer_details(s: DlibStream) -> DlibLayer:
    tag = s.read_string()
    if tag in ("con_4", "con_5"):
        params = s.read_tensor().reshape(-1)
        layer = DlibLayer("con")
        f = layer.fields
        f["num_filters"] = s.read_int()
        f["nr"], f["nc"] = s.read_int(), s.read_int()
        f["stride_y"], f["stride_x"] = s.read_int(), s.read_int()
        f["padding_y"], f["padding_x"] = s.read_int(), s.read_int()
        filters_alias = s.read_alias_tensor()
        biases_alias = s.read_alias_tensor()
        for name in ("lr_mult", "wd_mult", "bias_lr_mult", "bias_wd_mult"):
            f[name] = s.read_float()
        if tag == "con_5":
            f["use_bias"] = s.read_bool()
        n, k, nr, nc = filters_alias
        size = n * k * nr * nc
        layer.tensors["weight"] = params[:size].reshape(n, k, nr, nc)
        bsize = int(np.prod(biases_alias))
        if bsize and f.get("use_bias", True):
            layer.tensors["bias"] = params[size : size + bsize].copy()
        if params.size not in (size, size + bsize):
            raise s._fail(f"con params hold {params.size} values, expected {size + bsize}")
        return layer
    if tag == "affine_":
        params = s.read_tensor().reshape(-1)
        gamma_alias = s.read_alias_tensor()
        beta_alias = s.read_alias_tensor()
        layer = DlibLayer("affine")
        layer.fields["mode"] = s.read_int()
        offset = 0
        for name, alias in (("gamma", gamma_alias), ("beta", beta_alias)):
            n, k, nr, nc = alias
            size = n * k * nr * nc
            layer.tensors[name] = params[offset : offset + size].reshape(k, nr, nc)
            offset += size
        return layer
    if tag == "relu_":
        return DlibLayer("relu")
    if tag in ("add_prev", "add_prev_"):
        return DlibLayer("add_prev")
    if tag in ("max_pool_2", "avg_pool_2"):
        layer = DlibLayer(tag[:-2])
        f = layer.fields
        f["nr"], f["nc"] = s.read_int(), s.read_int()
        f["stride_y"], f["stride_x"] = s.read_int(), s.read_int()
        f["padding_y"], f["padding_x"] = s.read_int(), s.read_int()
        return layer
    if tag == "fc_2":
        layer = DlibLayer("fc")
        f = layer.fields
        f["num_outputs"] = s.read_int()
        f["num_inputs"] = s.read_int()
        params = s.read_tensor().reshape(-1)
        weights_alias = s.read_alias_tensor()
        biases_alias = s.read_alias_tensor()
        f["bias_mode"] = s.read_int()
        for name in ("lr_mult", "wd_mult", "bias_lr_mult", "bias_wd_mult"):
            f[name] = s.read_float()
        n, k, nr, nc = weights_alias
        size = n * k * nr * nc
        layer.tensors["weight_in_out"] = params[:size].reshape(n, k * nr * nc)
        if f["bias_mode"] == 0:  # FC_HAS_BIAS
            layer.tensors["bias"] = params[size : size + int(np.prod(biases_alias))].copy()
        return layer
    raise DlibFormatError(f"{s.name}: unsupported dlib layer '{tag}' at byte {s.pos}")


def read_dlib_metric_network(path: str | Path) -> DlibNetwork:
    """Parse a dlib ``loss_metric`` network file into numpy arrays (no code is executed).

    Returns the layers in order from the input up; tag and skip wrappers carry no data and
    do not appear (the architecture that uses them is fixed in :mod:`dlib_resnet`).
    """
    path = Path(path)
    s = DlibStream(path.read_bytes(), str(path))
    if s.read_int() != 1:
        raise s._fail("unexpected loss-layer version")
    loss_name = s.read_string()
    if loss_name != "loss_metric_2":
        raise s._fail(f"loss layer '{loss_name}' (expected loss_metric_2)")
    loss = {"name": loss_name, "margin": s.read_float(), "distance_threshold": s.read_float()}

    versions: list[int] = []
    while s.peek_string() is None:
        versions.append(s.read_int())
        if len(versions) > 10_000:
            raise s._fail("no input layer found")
    input_name = s.read_string()
    if input_name != "input_rgb_image_sized":
        raise s._fail(f"input layer '{input_name}' (expected input_rgb_image_sized)")
    means = (s.read_float(), s.read_float(), s.read_float())
    size = (s.read_int(), s.read_int())
    inp = {"name": input_name, "mean_rgb": means, "size": size}

    layers: list[DlibLayer] = []
    first = True
    while s.pos < len(s.data):
        layers.append(_read_layer_details(s))
        _read_trailer(s)
        if first:  # the layer directly over the input stores its sample expansion factor
            inp["sample_expansion_factor"] = s.read_int()
            first = False
    return DlibNetwork(loss=loss, input=inp, wrapper_versions=versions, layers=layers)

