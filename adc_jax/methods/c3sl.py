"""C3-SL: batch-wise compression by circular convolution (Hsieh et al. 2022; docs/method.md §4).

Each group of R consecutive samples is superposed into one vector: with fixed random keys
``k_r ∈ R^{N·D}`` (drawn once from the method's init key, never trained), the client sends

    s = Σ_r k_r ⊛ x_r        (circular convolution over the flattened activation, via FFT)

and the server reads each sample back with a circular correlation, ``x̂_r = k_r ⋆ s``. Both maps
are linear, and correlation is the adjoint of convolution, so the gradient w.r.t. ``s`` (what
the server sends back) has the payload's shape ``[B/R, N, D]`` and the client's gradient w.r.t.
``x_r`` is ``k_r ⋆ g`` — automatic differentiation of the FFTs gives exactly that.

Keys. The reference code draws Gaussian keys and rescales them to unit norm (``key_kind="gaussian"``
here). Then ``k ⋆ (k ⊛ x) = x ⊛ (k ⋆ k)``: even a group of one sample comes back blurred by the
key's autocorrelation. The default ``key_kind="unitary"`` draws keys with a random phase and unit
magnitude at every frequency. Such a key is still random and unit-norm (Parseval:
``‖k‖² = (1/n)·Σ_f |K_f|² = 1``), but its autocorrelation is the delta, so correlation exactly
inverts convolution: with R = 1, ``decode(encode(x)) = x`` (to float rounding of the FFTs), and
with R > 1 the only error left is the cross-talk ``Σ_{j≠r} k_r ⋆ k_j ⊛ x_j`` that superposition
cannot avoid.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from adc_jax.methods.core import CutShape, Method, Payload, label_dtype

KEY_KINDS = ("unitary", "gaussian")


def make_keys(key: jax.Array, ratio: int, size: int, kind: str = "unitary") -> jax.Array:
    """``[ratio, size]`` float32 unit-norm keys, deterministic given ``key``.

    ``"unitary"``: ``|FFT(k)| = 1`` at every frequency with uniform random phases (the DC and,
    for even ``size``, Nyquist bins are real, so a random sign). ``"gaussian"``: i.i.d. normal
    entries rescaled to unit norm (the reference code).
    """
    if kind == "gaussian":
        keys = jax.random.normal(key, (ratio, size), jnp.float32)
        return keys / jnp.linalg.norm(keys, axis=-1, keepdims=True)
    if kind != "unitary":
        raise ValueError(f"Unknown C3-SL key kind {kind!r}; expected one of {KEY_KINDS}.")
    bins = size // 2 + 1
    phase_key, sign_key = jax.random.split(key)
    phase = jax.random.uniform(phase_key, (ratio, bins), minval=0.0, maxval=2 * jnp.pi)
    spectrum = jnp.exp(1j * phase)
    # A real signal's DC bin (and Nyquist bin, for even sizes) is real: unit magnitude = ±1.
    signs = jnp.where(jax.random.bernoulli(sign_key, 0.5, (ratio, 2)), 1.0, -1.0)
    spectrum = spectrum.at[:, 0].set(signs[:, 0])
    if size % 2 == 0:
        spectrum = spectrum.at[:, -1].set(signs[:, 1])
    return jnp.fft.irfft(spectrum.astype(jnp.complex64), n=size, axis=-1).astype(jnp.float32)


def circular_conv(keys: jax.Array, x: jax.Array) -> jax.Array:
    """``Σ_r k_r ⊛ x_r``: keys ``[R, n]``, x ``[G, R, n]`` → ``[G, n]`` (float32)."""
    n = keys.shape[-1]
    spectrum = jnp.fft.rfft(keys, axis=-1) * jnp.fft.rfft(x.astype(jnp.float32), axis=-1)
    return jnp.fft.irfft(spectrum.sum(axis=-2), n=n, axis=-1)


def circular_corr(keys: jax.Array, s: jax.Array) -> jax.Array:
    """``k_r ⋆ s`` for every key: keys ``[R, n]``, s ``[G, n]`` → ``[G, R, n]`` (float32).

    ``(k ⋆ s)[i] = Σ_j k[j]·s[i + j mod n]``, the adjoint of ``x ↦ k ⊛ x``.
    """
    n = keys.shape[-1]
    spectrum = (
        jnp.conj(jnp.fft.rfft(keys, axis=-1))
        * jnp.fft.rfft(s.astype(jnp.float32), axis=-1)[:, None, :]
    )
    return jnp.fft.irfft(spectrum, n=n, axis=-1)


@dataclasses.dataclass(frozen=True)
class C3SL(Method):
    """Superposes groups of ``ratio`` samples with fixed random keys; ξ = 1/R.

    State: ``{"keys": [R, N·D] float32}`` (fixed, checkpointed with the run). Payload:
    activations ``[B/R, N, D]`` (the superposed groups, in the tokens' dtype), labels ``[B]``
    class indices (every sample keeps its own label), no side information.
    """

    name: ClassVar[str] = "c3sl"

    ratio: int = 4  # R: samples superposed into one
    key_kind: str = "unitary"  # unitary (exact inverse for R = 1) | gaussian (reference code)

    def validate(self, cut: CutShape) -> None:
        if self.ratio < 1:
            raise ValueError(f"C3-SL's ratio R ({self.ratio}) must be a positive integer.")
        if self.key_kind not in KEY_KINDS:
            raise ValueError(
                f"Unknown C3-SL key kind {self.key_kind!r}; expected one of {KEY_KINDS}."
            )
        self._check_batch(cut.batch_size)

    def validate_device_batch(self, batch_size: int) -> None:
        self._check_batch(batch_size, " per device")

    def _check_batch(self, batch_size: int, where: str = "") -> None:
        if batch_size % self.ratio:
            raise ValueError(
                f"Batch size{where} ({batch_size}) must be divisible by C3-SL's ratio R "
                f"({self.ratio}); choose a batch size that is a multiple of {self.ratio}."
            )

    def init(self, key, cut):
        self.validate(cut)
        keys = make_keys(key, self.ratio, cut.seq_len * cut.width, self.key_kind)
        return {"client": {}, "server": {}}, {"keys": keys}

    def encode(self, params, state, tokens, scores, labels, key, *, num_classes, axis_name=None):
        del params, scores, key  # Groups never cross devices: no collective needed.
        batch, seq_len, width = tokens.shape
        self._check_batch(batch, "" if axis_name is None else " per device")
        groups = tokens.reshape(batch // self.ratio, self.ratio, seq_len * width)
        superposed = circular_conv(state["keys"], groups).astype(tokens.dtype)
        return Payload(
            superposed.reshape(-1, seq_len, width), labels.astype(label_dtype(num_classes)), {}
        )

    def decode(self, params, state, payload):
        del params
        s = payload.activations
        groups, seq_len, width = s.shape
        recovered = circular_corr(state["keys"], s.reshape(groups, seq_len * width))
        return recovered.reshape(groups * self.ratio, seq_len, width).astype(s.dtype)

    def xi_paper(self, cut: CutShape) -> float:
        del cut
        return 1.0 / self.ratio

    @classmethod
    def knobs_for_xi(cls, xi, cut):
        """The divisor ``R`` of the batch size closest to ``1/ξ`` (ties: the smaller ``R``)."""
        divisors = [r for r in range(1, cut.batch_size + 1) if cut.batch_size % r == 0]
        return {"ratio": min(divisors, key=lambda r: (abs(r - 1.0 / xi), r))}


__all__ = ["C3SL", "circular_conv", "circular_corr", "make_keys"]
