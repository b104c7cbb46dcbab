"""Uniform n-bit quantisation of the activations and of the gradient (docs/method.md §4).

Forward, the client sends its activations quantised with their own per-tensor min/max range:
``2ⁿ`` levels including both ends (:func:`adc_jax.link.uniform_quantize`; a constant tensor is
sent exactly). Backward, the gradient the server returns is quantised the same way with its own
range. The rounding itself is not differentiated (straight-through). Under a named axis (one
client spread over devices) both ranges are the global ones, so the result does not depend on
the device count.

Wire format: n bits per value plus the two float32 ends of the range, per tensor and direction.
The method fixes that format itself; a non-identity link channel only adds its own distortion
on top and does not change the count. ξ = n/32.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import ClassVar

import jax

from adc_jax.link import Channel, nbytes, uniform_quantize
from adc_jax.methods.core import CutShape, Method, Payload, label_dtype

RANGE_BYTES = 8  # min and max as two float32


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def quantize_both_ways(x: jax.Array, bits: int, axis_name: str | None = None) -> jax.Array:
    """``x`` quantised to ``bits`` forward; the cotangent quantised with its own range backward."""
    return uniform_quantize(x, bits, axis_name)


def _forward(x, bits, axis_name):
    return uniform_quantize(x, bits, axis_name), None


def _backward(bits, axis_name, _, g):
    return (uniform_quantize(g, bits, axis_name),)


quantize_both_ways.defvjp(_forward, _backward)


@dataclasses.dataclass(frozen=True)
class Quantize(Method):
    """Per-tensor min/max uniform quantisation with ``2**bits`` levels, both ways.

    Payload: activations ``[B, N, D]`` (the dequantised values, tokens' dtype: what the server
    reconstructs from the codes and the range), labels ``[B]`` indices, no side information.
    """

    name: ClassVar[str] = "quantize"

    bits: int = 8  # n: bits per value

    def validate(self, cut: CutShape) -> None:
        if not 1 <= self.bits <= 16:
            raise ValueError(f"Quantisation bits ({self.bits}) must be in 1..16.")

    def encode(self, params, state, tokens, scores, labels, key, *, num_classes, axis_name=None):
        del params, state, scores, key
        sent = quantize_both_ways(tokens, self.bits, axis_name)
        return Payload(sent, labels.astype(label_dtype(num_classes)), {})

    def _values_bytes(self, shape) -> int:
        return math.ceil(math.prod(shape) * self.bits / 8)

    def uplink_bytes(self, payload: Payload, channel: Channel) -> dict[str, int]:
        del channel  # the method's own wire format (module docstring)
        return {
            "activations": self._values_bytes(payload.activations.shape),
            "range": RANGE_BYTES,
            "labels": nbytes(payload.labels.shape, payload.labels.dtype),
        }

    def downlink_bytes(self, payload: Payload, channel: Channel) -> dict[str, int]:
        del channel
        return {"gradient": self._values_bytes(payload.activations.shape), "range": RANGE_BYTES}

    def xi_paper(self, cut: CutShape) -> float:
        del cut
        return self.bits / 32

    @classmethod
    def knobs_for_xi(cls, xi, cut):
        """``round(32ξ)`` bits (half up), clipped to the 1..16 the method accepts."""
        del cut
        return {"bits": min(16, max(1, math.floor(32 * xi + 0.5)))}


__all__ = ["Quantize", "quantize_both_ways"]
