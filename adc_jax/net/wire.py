"""Explicit serialisation of the protocol's messages: a small header and raw array buffers.

Nothing is pickled. A message (a :class:`Frame`) is::

    header   "ADCN" | version u8 | kind u8 | arrays u16 | meta bytes u32       (12 bytes)
    meta     UTF-8 JSON object: small scalars (client index, step number, loss, ...)
    arrays   per array:
               name bytes u8 | name (ASCII)
               dtype u8 | codec u8 | ndim u8 | shape u32 × ndim
               codec parameters (a fixed size per codec, see below)
               data bytes u32 | data

All integers and array buffers are little-endian; arrays are C-ordered. ``dtype`` indexes
:data:`DTYPES`. The codec says how the values travel:

====== ============ ===================================================================
codec  parameters   data
====== ============ ===================================================================
raw    –            the array's own bytes
bf16   –            float32 values that are exactly bfloat16, sent as bfloat16
int8   scale f32    ``q`` int8 with ``x = q · scale`` (the int8 link channel)
uniform lo, hi f32, ``b``-bit codes, bit-packed; ``x = lo + q·(hi − lo)/(2ᵇ − 1)``, top
       variant u8   code ``hi`` (the quantize method and channel); the variant says how the
                    sender rounded that arithmetic (:func:`uniform_levels`)
omit   –            nothing: the receiver rebuilds the array from the others (FedLite)
====== ============ ===================================================================

The link's rounding (bfloat16, int8, n-bit) happens inside the training programs, exactly as in
one process, and a codec only packs the rounded values: :func:`encode_array` checks that the
packed form gives them back (``uniform``: to the bit when the sender's arithmetic is one of the
four variants of :func:`uniform_levels`, as on XLA's CPU backend under ``jit``, else within one
float rounding). An array that does not fit its codec (e.g. AWGN noise on top of a quantised
payload) travels ``raw`` instead: the wire format changes sizes, never values.

:func:`parse` checks the framing (magic, version, lengths, known dtypes and codecs, data sizes)
and raises :class:`WireError` on anything malformed; checking the arrays against what the
protocol expects is :func:`adc_jax.net.plan.Plan.check`'s job.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import sys
from typing import Any

import ml_dtypes
import numpy as np

MAGIC = b"ADCN"
VERSION = 1
_HEADER = struct.Struct("<4sBBHI")

# Message kinds.
HELLO, STEP, EVAL, SYNC, DONE, REPLY = range(6)
KINDS = ("hello", "step", "eval", "sync", "done", "reply")

DTYPES = (
    "bool",
    "uint8",
    "uint16",
    "uint32",
    "int8",
    "int16",
    "int32",
    "int64",
    "float16",
    "bfloat16",
    "float32",
    "float64",
)
_DTYPE_CODE = {name: i for i, name in enumerate(DTYPES)}

# Codecs and the bytes of their parameters.
RAW, BF16, INT8, UNIFORM, OMIT = range(5)
CODECS = ("raw", "bf16", "int8", "uniform", "omit")
_PARAM_BYTES = {RAW: 0, BF16: 0, INT8: 4, UNIFORM: 9, OMIT: 0}

if sys.byteorder != "little":  # buffers are sent as they lie in memory
    raise ImportError("adc_jax.net needs a little-endian machine.")


class WireError(ValueError):
    """A message that does not follow the wire format or the protocol's plan."""


def np_dtype(name: str) -> np.dtype:
    """The numpy dtype of a :data:`DTYPES` name (bfloat16 from ml_dtypes)."""
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def all_finite(array: np.ndarray) -> bool:
    """Every value of a floating-point array (bfloat16 included) is finite; True for others."""
    floating = np.issubdtype(array.dtype, np.floating) or array.dtype == np_dtype("bfloat16")
    return not floating or bool(np.all(np.isfinite(array.astype(np.float32))))


def dtype_name(dtype) -> str:
    name = np.dtype(dtype).name
    if name not in _DTYPE_CODE:
        raise WireError(f"dtype {name} cannot be sent; expected one of {DTYPES}.")
    return name


@dataclasses.dataclass(frozen=True)
class Codec:
    """How one array travels: ``kind`` in :data:`CODECS`; ``bits`` for ``uniform``."""

    kind: str = "raw"
    bits: int = 0

    def data_bytes(self, shape, dtype) -> int:
        """Bytes of the data section for an array of ``shape`` and ``dtype``."""
        size = math.prod(shape)
        if self.kind == "raw":
            return size * np_dtype(dtype).itemsize
        if self.kind == "bf16":
            return 2 * size
        if self.kind == "int8":
            return size
        if self.kind == "uniform":
            return math.ceil(size * self.bits / 8)
        return 0


RAW_CODEC = Codec()


# ---- Codecs ---------------------------------------------------------------------------------


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.tobytes() == b.tobytes()


def _pack_bits(codes: np.ndarray, bits: int) -> bytes:
    if bits in (8, 16):
        return codes.astype(np.uint8 if bits == 8 else "<u2").tobytes()
    # Little-endian bit order: bit j of code i is bit i·bits + j of the stream.
    planes = (codes.astype(np.uint32)[:, None] >> np.arange(bits, dtype=np.uint32)) & 1
    return np.packbits(planes.astype(np.uint8).reshape(-1), bitorder="little").tobytes()


def _unpack_bits(data: bytes, bits: int, size: int) -> np.ndarray:
    if bits in (8, 16):
        return np.frombuffer(data, np.uint8 if bits == 8 else "<u2").astype(np.int64)
    stream = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
    planes = stream[: size * bits].reshape(size, bits).astype(np.int64)
    return (planes << np.arange(bits, dtype=np.int64)).sum(axis=1)


def uniform_levels(lo: np.float32, hi: np.float32, bits: int, variant: int = 0) -> np.ndarray:
    """The ``2ᵇ`` float32 values of :func:`adc_jax.link.uniform_quantize`'s grid.

    ``lo + q·step`` with ``step = (hi − lo)/(2ᵇ − 1)``; the top level is ``hi`` itself and a
    constant tensor is all ``lo``. How the sender's compiler rounded that arithmetic is the
    ``variant``: bit 0 set = ``step`` by a true division (else, as XLA compiles a division by a
    constant, a product with the float32 reciprocal); bit 1 set = product and sum rounded
    separately (else one fused multiply-add, computed here in float64, which holds ``q·step``
    exactly).
    """
    levels = 2**bits - 1
    span = np.float32(np.float32(hi) - np.float32(lo))
    if span <= 0:
        step = np.float32(1.0)
    elif variant & 1:
        step = np.float32(span / np.float32(levels))
    else:
        step = np.float32(span * np.float32(1.0 / levels))
    q = np.arange(levels + 1, dtype=np.float32)
    if variant & 2:
        grid = np.float32(lo) + q * step
    else:
        grid = (q.astype(np.float64) * np.float64(step) + np.float64(lo)).astype(np.float32)
    grid[-1] = hi
    return grid


def _encode_uniform(x: np.ndarray, bits: int) -> tuple[bytes, bytes] | None:
    flat = x.reshape(-1)
    lo, hi = np.float32(flat.min()), np.float32(flat.max())
    levels = 2**bits - 1
    span = np.float64(hi) - np.float64(lo)
    if span == 0:
        codes = np.zeros(flat.shape, np.int64)
    else:
        codes = np.clip(np.rint((flat - np.float64(lo)) * levels / span), 0, levels)
        codes = codes.astype(np.int64)
    # On the grid to within a quarter step: the codes are exact.
    tolerance = 0.25 * span / levels if span > 0 else 0.0
    grids = [uniform_levels(lo, hi, bits, v) for v in range(4)]
    if np.max(np.abs(grids[0][codes].astype(np.float64) - flat)) > tolerance:
        return None
    # The variant whose arithmetic gives the values to the bit (else the first: the values
    # then come back within one rounding of the sender's).
    variant = next((v for v, g in enumerate(grids) if _same_bits(g[codes], flat)), 0)
    return struct.pack("<ffB", lo, hi, variant), _pack_bits(codes, bits)


def _encode_int8(x: np.ndarray) -> tuple[bytes, bytes] | None:
    peak = np.float32(np.max(np.abs(x))) if x.size else np.float32(0)
    if peak == 0:
        return struct.pack("<f", 1.0), np.zeros(x.size, np.int8).tobytes()
    # The sender's scale was max|x₀|/127 of the values before rounding; the peak of the rounded
    # values is 127·scale rounded, so the scale is one of the floats next to peak/127.
    guess = np.array(peak / np.float32(127), np.float32).view(np.int32)
    for delta in (0, -1, 1, -2, 2, -3, 3):
        scale = (guess + np.int32(delta)).view(np.float32)
        q = np.clip(np.rint(x / scale), -127, 127).astype(np.int8)
        if _same_bits(q.astype(np.float32) * scale, x):
            return struct.pack("<f", scale), q.tobytes()
    return None


def encode_array(x: np.ndarray, codec: Codec) -> tuple[Codec, bytes, bytes]:
    """``(codec used, parameters, data)`` for ``x``; ``raw`` when ``x`` does not fit ``codec``."""
    x = np.ascontiguousarray(x)
    if codec.kind == "omit":
        return codec, b"", b""
    if codec.kind != "raw" and x.dtype == np.float32 and np.all(np.isfinite(x)):
        packed = None
        if codec.kind == "bf16":
            low = x.astype(ml_dtypes.bfloat16)
            if _same_bits(low.astype(np.float32), x):
                packed = b"", low.tobytes()
        elif codec.kind == "int8":
            packed = _encode_int8(x)
        elif codec.kind == "uniform":
            packed = _encode_uniform(x, codec.bits)
        if packed is not None:
            return codec, *packed
    return RAW_CODEC, b"", x.tobytes()


def decode_array(codec: Codec, params: bytes, data: bytes, shape, dtype: str) -> np.ndarray:
    """The array that :func:`encode_array` packed (a read-only view for ``raw``)."""
    dt = np_dtype(dtype)
    if codec.kind == "raw":
        return np.frombuffer(data, dt).reshape(shape)
    if codec.kind == "bf16":
        return np.frombuffer(data, ml_dtypes.bfloat16).astype(dt).reshape(shape)
    if codec.kind == "int8":
        (scale,) = struct.unpack("<f", params)
        q = np.frombuffer(data, np.int8).astype(np.float32)
        return (q * np.float32(scale)).astype(dt).reshape(shape)
    if codec.kind == "uniform":
        lo, hi, variant = struct.unpack("<ffB", params)
        if variant > 3:
            raise WireError(f"Unknown uniform variant {variant}.")
        codes = _unpack_bits(data, codec.bits, math.prod(shape))
        grid = uniform_levels(np.float32(lo), np.float32(hi), codec.bits, variant)
        return grid[codes].reshape(shape)
    raise WireError(f"Codec {codec.kind} carries no data to decode.")


# ---- Frames ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Array:
    """One array of a parsed frame, still packed: decode with :meth:`value`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    codec: Codec
    params: bytes
    data: memoryview

    def value(self) -> np.ndarray:
        return decode_array(self.codec, self.params, self.data, self.shape, self.dtype)


@dataclasses.dataclass
class Frame:
    """A parsed message: its kind, its JSON meta and its arrays in order."""

    kind: int
    meta: dict[str, Any]
    arrays: list[Array]


def encode(
    kind: int,
    meta: dict[str, Any],
    arrays: list[tuple[str, np.ndarray, Codec]] = (),
) -> bytes:
    """One message: ``arrays`` are ``(name, value, codec)``; see the module docstring."""
    meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
    parts = [_HEADER.pack(MAGIC, VERSION, kind, len(arrays), len(meta_bytes)), meta_bytes]
    for name, value, codec in arrays:
        value = np.asarray(value)
        used, params, data = encode_array(value, codec)
        raw_name = name.encode("ascii")
        parts += [
            struct.pack("<B", len(raw_name)),
            raw_name,
            struct.pack(
                f"<BBB{value.ndim}I",
                _DTYPE_CODE[dtype_name(value.dtype)],
                CODECS.index(used.kind),
                value.ndim,
                *value.shape,
            ),
            params,
            struct.pack("<I", len(data)),
            data,
        ]
    return b"".join(parts)


class _Reader:
    def __init__(self, buf: bytes):
        self.view = memoryview(buf)
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.view):
            raise WireError(
                f"The message is truncated: {n} bytes wanted at offset {self.pos} of "
                f"{len(self.view)}."
            )
        out = self.view[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        s = struct.Struct(fmt)
        return s.unpack(self.take(s.size))


def parse(buf: bytes, codec_bits: dict[str, int] | None = None) -> Frame:
    """Parses a message; :class:`WireError` on anything that does not follow the format.

    ``codec_bits`` gives the bit width of each ``uniform`` array by name (the plan's; the
    frame does not repeat it).
    """
    r = _Reader(buf)
    magic, version, kind, count, meta_len = r.unpack(_HEADER.format)
    if magic != MAGIC:
        raise WireError("Not an adc_jax.net message (bad magic bytes).")
    if version != VERSION:
        raise WireError(f"Wire format version {version}; this side speaks {VERSION}.")
    if kind >= len(KINDS):
        raise WireError(f"Unknown message kind {kind}.")
    try:
        meta = json.loads(bytes(r.take(meta_len)))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireError(f"The message's meta is not JSON: {e}.") from None
    if not isinstance(meta, dict):
        raise WireError("The message's meta must be a JSON object.")
    arrays = []
    for _ in range(count):
        (name_len,) = r.unpack("<B")
        try:
            name = bytes(r.take(name_len)).decode("ascii")
        except UnicodeDecodeError:
            raise WireError("An array name is not ASCII.") from None
        dtype_code, codec_code, ndim = r.unpack("<BBB")
        if dtype_code >= len(DTYPES) or codec_code >= len(CODECS):
            raise WireError(f"Array {name!r} has an unknown dtype or codec code.")
        shape = tuple(r.unpack(f"<{ndim}I"))
        kind_name = CODECS[codec_code]
        bits = (codec_bits or {}).get(name, 0) if kind_name == "uniform" else 0
        if kind_name == "uniform" and not 1 <= bits <= 16:
            raise WireError(f"Array {name!r} is not expected as uniform codes.")
        codec = Codec(kind_name, bits)
        params = bytes(r.take(_PARAM_BYTES[codec_code]))
        (data_len,) = r.unpack("<I")
        expected = codec.data_bytes(shape, DTYPES[dtype_code])
        if data_len != expected:
            raise WireError(
                f"Array {name!r} ({DTYPES[dtype_code]} {list(shape)}, {kind_name}) carries "
                f"{data_len} bytes; its shape needs {expected}."
            )
        arrays.append(Array(name, DTYPES[dtype_code], shape, codec, params, r.take(data_len)))
    if r.pos != len(r.view):
        raise WireError(f"{len(r.view) - r.pos} unexpected bytes after the last array.")
    return Frame(kind, meta, arrays)
