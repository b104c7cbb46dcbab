"""The cut between client and server: channels, the ``custom_vjp`` link, byte accounting.

What crosses the cut travels through a :class:`Channel` in each direction. :func:`link` is the one
place where that happens: its forward pass applies the uplink channel to the activations the
client sends, its backward pass applies the downlink channel to the gradient the server returns.

Channels (docs/method.md §4, §5):

* ``identity`` – the values in their own dtype on the wire (the model's compute dtype: 4 bytes
  for float32, 2 for bfloat16), no change.
* ``bfloat16`` – the values are rounded to bfloat16 (2 bytes each).
* ``int8`` – symmetric int8 with one float32 scale per tensor: ``q = round(x / s)``,
  ``s = max|x| / 127``.
* ``quantize`` – n-bit uniform quantisation with a per-tensor float32 min/max range and ``2ⁿ``
  levels including both ends; a constant tensor is sent as it is (no division by zero).
* ``awgn`` – additive white Gaussian noise. Each transmission draws an SNR uniformly from
  ``[snr_min_db, snr_max_db]``; the noise variance is ``P / 10^(SNR/10)`` with the signal power
  ``P`` = the **mean square** of the transmitted values (the reference code used the norm, not
  its square). Values are counted in their own dtype (an analog link has no bit budget of its
  own).

Under a named axis (one client spread over devices), the per-tensor statistics (range, scale,
power) are reduced across the axis, so the channel sees one tensor whatever the device count.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

CHANNELS = ("identity", "bfloat16", "int8", "quantize", "awgn")


@dataclasses.dataclass(frozen=True)
class Channel:
    """One direction of the link. Hashable, so it can be a static argument."""

    kind: str = "identity"
    bits: int = 8  # quantize only
    snr_min_db: float = 10.0  # awgn only
    snr_max_db: float = 10.0  # awgn only

    def __post_init__(self):
        if self.kind not in CHANNELS:
            raise ValueError(f"Unknown channel {self.kind!r}; expected one of {CHANNELS}.")
        if self.kind == "quantize" and not 1 <= self.bits <= 16:
            raise ValueError(f"Quantisation bits ({self.bits}) must be in 1..16.")
        if self.kind == "awgn" and self.snr_min_db > self.snr_max_db:
            raise ValueError(
                f"snr_min_db ({self.snr_min_db}) must not exceed snr_max_db ({self.snr_max_db})."
            )

    # ---- Accounting --------------------------------------------------------------------------

    def value_bits(self, dtype) -> int:
        """Bits per value on the wire for an array of ``dtype``."""
        if self.kind == "bfloat16":
            return 16
        if self.kind == "int8":
            return 8
        if self.kind == "quantize":
            return self.bits
        return 8 * np.dtype(dtype).itemsize

    def side_bytes(self) -> int:
        """Bytes sent once per tensor besides the values (range or scale)."""
        return {"int8": 4, "quantize": 8}.get(self.kind, 0)

    def wire_bytes(self, shape, dtype) -> int:
        """Bytes that one tensor of ``shape`` and ``dtype`` costs on this channel."""
        return math.ceil(math.prod(shape) * self.value_bits(dtype) / 8) + self.side_bytes()

    # ---- Transmission ------------------------------------------------------------------------

    def apply(self, x: jax.Array, key: jax.Array, axis_name: str | None = None) -> jax.Array:
        """What the receiver gets when ``x`` is sent. Same shape and dtype as ``x``."""
        if self.kind == "identity":
            return x
        if self.kind == "bfloat16":
            return x.astype(jnp.bfloat16).astype(x.dtype)
        if self.kind == "int8":
            return int8_roundtrip(x, axis_name)
        if self.kind == "quantize":
            return uniform_quantize(x, self.bits, axis_name)
        return awgn(x, key, self.snr_min_db, self.snr_max_db, axis_name)


def _reduce(value, op, axis_name):
    return value if axis_name is None else op(value, axis_name)


def uniform_quantize(x: jax.Array, bits: int, axis_name: str | None = None) -> jax.Array:
    """n-bit uniform quantisation, per-tensor min/max, ``2ⁿ`` levels including both ends."""
    xf = x.astype(jnp.float32)
    lo = _reduce(jnp.min(xf), jax.lax.pmin, axis_name)
    hi = _reduce(jnp.max(xf), jax.lax.pmax, axis_name)
    levels = 2**bits - 1
    span = hi - lo
    step = jnp.where(span > 0, span / levels, 1.0)  # constant tensor: every value is `lo`
    q = jnp.clip(jnp.round((xf - lo) / step), 0, levels)
    # The top level is set to `hi` itself so both ends are exact, not lo + levels·step.
    out = jnp.where(q == levels, hi, lo + q * step)
    return out.astype(x.dtype)


def int8_roundtrip(x: jax.Array, axis_name: str | None = None) -> jax.Array:
    """Symmetric int8 with one per-tensor scale ``max|x| / 127``."""
    xf = x.astype(jnp.float32)
    peak = _reduce(jnp.max(jnp.abs(xf)), jax.lax.pmax, axis_name)
    scale = jnp.where(peak > 0, peak / 127.0, 1.0)
    return (jnp.clip(jnp.round(xf / scale), -127, 127) * scale).astype(x.dtype)


def awgn(
    x: jax.Array,
    key: jax.Array,
    snr_min_db: float,
    snr_max_db: float,
    axis_name: str | None = None,
) -> jax.Array:
    """Adds Gaussian noise at an SNR drawn uniformly in ``[snr_min_db, snr_max_db]`` dB."""
    snr_key, noise_key = jax.random.split(key)
    snr_db = jax.random.uniform(snr_key, (), minval=snr_min_db, maxval=snr_max_db)
    xf = x.astype(jnp.float32)
    power = _reduce(jnp.mean(jnp.square(xf)), jax.lax.pmean, axis_name)
    if axis_name is not None:  # each device adds its own noise to its own slice
        noise_key = jax.random.fold_in(noise_key, jax.lax.axis_index(axis_name))
    std = jnp.sqrt(power / 10.0 ** (snr_db / 10.0))
    return (xf + std * jax.random.normal(noise_key, x.shape)).astype(x.dtype)


# ---- The link ------------------------------------------------------------------------------


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _link(uplink: Channel, downlink: Channel, axis_name, x, up_key, down_key):
    return uplink.apply(x, up_key, axis_name)


def _link_fwd(uplink, downlink, axis_name, x, up_key, down_key):
    return uplink.apply(x, up_key, axis_name), down_key


def _link_bwd(uplink, downlink, axis_name, down_key, g):
    # Straight through the uplink channel; the gradient itself crosses the downlink channel.
    return downlink.apply(g, down_key, axis_name), None, None


_link.defvjp(_link_fwd, _link_bwd)


def link(
    x: jax.Array,
    key: jax.Array,
    *,
    uplink: Channel = Channel(),
    downlink: Channel = Channel(),
    axis_name: str | None = None,
) -> jax.Array:
    """Sends ``x`` over the cut: ``uplink`` forward, ``downlink`` on the gradient backward.

    The uplink channel is straight-through for the gradient (its rounding or noise is not
    differentiated); what the client receives is the downlink channel applied to the server's
    gradient. Both channels draw their randomness from ``key``.
    """
    up_key, down_key = jax.random.split(key)
    return _link(uplink, downlink, axis_name, x, up_key, down_key)


def nbytes(shape, dtype) -> int:
    """Bytes of a dense array sent as it is."""
    return math.prod(shape) * np.dtype(dtype).itemsize
