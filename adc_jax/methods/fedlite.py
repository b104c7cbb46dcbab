"""FedLite: product quantisation of the activations with a corrected gradient (Wang et al. 2022).

Each flattened activation (``N·D`` values) is split into ``q`` consecutive sub-vectors of
``d = N·D/q`` values. The ``q`` sub-vector positions form ``R`` groups of ``q/R`` consecutive
positions; per group, K-means (:func:`adc_jax.kmeans.kmeans`) clusters all ``B·q/R`` sub-vectors
of the batch into ``L`` centroids. The client sends the codebooks ``[R, L, d]`` float32 and one
code per sub-vector ``[B, q]`` (smallest unsigned dtype); the server rebuilds

    x̃[b, p] = codebook[group(p), codes[b, p]]        group(p) = p // (q/R)

and differentiates its loss w.r.t. ``x̃``. So the payload's ``activations`` are ``x̃`` itself
(dense ``[B, N, D]``: the downlink is the dense gradient), the codebook and codes travel in
``side`` (they reproduce ``x̃`` exactly), and :meth:`FedLite.uplink_bytes` counts codebook +
codes + labels instead of the dense activations.

Backward, the client receives ``g = ∂L/∂x̃`` and uses ``g + λ(x − x̃)`` (docs/method.md §4, λ = 5e-5):
the gradient of ``L + (λ/2)‖x − sg(x̃)‖²``, which pulls the activations towards their codes.

Under a named axis (one client spread over devices) the sub-vectors are gathered and every device
runs the same K-means (same key), so the codebook is the whole batch's, as on one device; each
device keeps the codes of its own samples.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import ClassVar

import jax
import jax.numpy as jnp

from adc_jax.kmeans import kmeans
from adc_jax.link import Channel, nbytes
from adc_jax.methods.core import CutShape, Method, Payload, Unreachable, axis_size, label_dtype


def reconstruct(codebook: jax.Array, codes: jax.Array, seq_len: int, width: int) -> jax.Array:
    """``x̃ [B, N, D]`` from ``codebook [R, L, d]`` and ``codes [B, q]`` (any int dtype)."""
    groups = codebook.shape[0]
    batch, q = codes.shape
    group = jnp.arange(q) // (q // groups)  # [q]: the group of each sub-vector position
    vectors = codebook[group[None, :], codes.astype(jnp.int32)]  # [B, q, d]
    return vectors.reshape(batch, seq_len, width)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def corrected(x: jax.Array, x_tilde: jax.Array, correction: float) -> jax.Array:
    """Returns ``x̃``; its vjp sends ``g + λ(x − x̃)`` to ``x`` and nothing to ``x̃``."""
    return x_tilde


def _corrected_fwd(x, x_tilde, correction):
    return x_tilde, x - x_tilde


def _corrected_bwd(correction, residual, g):
    return (g + correction * residual).astype(g.dtype), jnp.zeros_like(residual)


corrected.defvjp(_corrected_fwd, _corrected_bwd)


@dataclasses.dataclass(frozen=True)
class FedLite(Method):
    """Product-quantises each activation into ``q`` sub-vectors, ``L`` centroids per group.

    Payload: activations ``x̃ [B, N, D]`` (tokens' dtype), labels ``[B]`` indices, side
    ``{"codebook": [R, L, d] float32, "codes": [B, q] uint8/uint16}``.
    """

    name: ClassVar[str] = "fedlite"

    num_subvectors: int = 64  # q: sub-vectors per flattened activation
    num_centroids: int = 16  # L: centroids per group
    num_groups: int = 1  # R: groups of sub-vector positions, each with its own codebook
    correction: float = 5e-5  # λ of the gradient correction λ(x − x̃)
    max_iters: int = 50  # Lloyd iterations at most
    tol: float = 1e-4  # stop once the squared total centre shift is below this

    def _check(self, batch_size: int, seq_len: int, width: int) -> None:
        q, groups, L = self.num_subvectors, self.num_groups, self.num_centroids
        size = seq_len * width
        if q < 1 or size % q:
            raise ValueError(
                f"FedLite's num_subvectors q ({q}) must divide the flattened activation size "
                f"N·D = {seq_len}·{width} = {size}."
            )
        if groups < 1 or q % groups:
            raise ValueError(
                f"FedLite's num_groups R ({groups}) must divide num_subvectors q ({q})."
            )
        points = batch_size * q // groups
        if not 1 <= L <= points:
            raise ValueError(
                f"FedLite's num_centroids L ({L}) must be between 1 and the sub-vectors per group "
                f"B·q/R = {batch_size}·{q}/{groups} = {points}; lower L or raise B or q/R."
            )
        if self.correction < 0:
            raise ValueError(f"FedLite's correction λ ({self.correction}) must be >= 0.")

    def validate(self, cut: CutShape) -> None:
        self._check(cut.batch_size, cut.seq_len, cut.width)

    def encode(self, params, state, tokens, scores, labels, key, *, num_classes, axis_name=None):
        del params, state, scores
        batch, seq_len, width = tokens.shape
        devices = axis_size(axis_name)
        self._check(batch * devices, seq_len, width)
        q, groups, L = self.num_subvectors, self.num_groups, self.num_centroids
        per_group = q // groups
        x = tokens.astype(jnp.float32)
        sub = jax.lax.stop_gradient(x).reshape(batch, groups, per_group, -1)  # [B, R, q/R, d]
        if axis_name is not None:  # cluster the whole client's batch on every device
            sub = jax.lax.all_gather(sub, axis_name, axis=0, tiled=True)
        total = sub.shape[0]
        points = sub.transpose(1, 0, 2, 3).reshape(groups, total * per_group, -1)

        def cluster(points, key):
            return kmeans(points, L, key, max_iters=self.max_iters, tol=self.tol)

        result = jax.vmap(cluster)(points, jax.random.split(key, groups))
        codebook = result.centroids  # [R, L, d]
        codes = result.assignment.reshape(groups, total, per_group).transpose(1, 0, 2)
        codes = codes.reshape(total, q)
        if axis_name is not None:  # this device's own samples
            start = jax.lax.axis_index(axis_name) * batch
            codes = jax.lax.dynamic_slice_in_dim(codes, start, batch)
        codes = codes.astype(label_dtype(L))
        x_tilde = reconstruct(codebook, codes, seq_len, width)
        sent = corrected(x, x_tilde, self.correction).astype(tokens.dtype)
        labels = labels.astype(label_dtype(num_classes))
        return Payload(sent, labels, {"codebook": codebook, "codes": codes})

    def uplink_bytes(self, payload: Payload, channel: Channel) -> dict[str, int]:
        # The dense x̃ is rebuilt by the server from what is counted here; it is not sent.
        codebook, codes = payload.side["codebook"], payload.side["codes"]
        return {
            "codebook": channel.wire_bytes(codebook.shape, codebook.dtype),
            "codes": nbytes(codes.shape, codes.dtype),
            "labels": nbytes(payload.labels.shape, payload.labels.dtype),
        }

    def xi_paper(self, cut: CutShape) -> float:
        """``½(ξ_up + 1)``: codebook floats and ``⌈log₂ L⌉``-bit codes up, dense gradient down."""
        q, groups, L = self.num_subvectors, self.num_groups, self.num_centroids
        size = cut.seq_len * cut.width
        code_bits = math.ceil(math.log2(L)) if L > 1 else 0
        up = (groups * L * (size // q) * 32 + cut.batch_size * q * code_bits) / (
            32 * cut.batch_size * size
        )
        return 0.5 * (up + 1.0)

    @classmethod
    def knobs_for_xi(cls, xi, cut):
        """The ``(q, L)`` (one group) whose paper ξ is closest to ``xi``.

        ``ξ = ½(ξ_up + 1)``: the downlink is the dense gradient, so only targets ≥ 0.5 are
        reachable. Candidates stay in the range FedLite was designed for, so that a target near
        0.5 does not pick a degenerate 2-centroid codebook: sub-vectors of 8 to D values (``q``
        dividing ``N·D``) and ``L`` a power of two from 16 to 256 (4- to 8-bit codes); ties go
        to the smaller codebook.
        """
        if xi < 0.5:
            raise Unreachable(f"FedLite sends the dense gradient back, so its ξ ≥ 0.5; got {xi}.")
        size = cut.seq_len * cut.width
        best = None
        for q in range(1, size + 1):
            if size % q or not 8 <= size // q <= cut.width:
                continue
            for L in (16, 32, 64, 128, 256):
                if L > cut.batch_size * q:
                    break
                knobs = {"num_subvectors": q, "num_centroids": L, "num_groups": 1}
                rank = (abs(cls(**knobs).xi_paper(cut) - xi), L * size // q, q)
                if best is None or rank < best[0]:
                    best = (rank, knobs)
        if best is None or best[0][0] > 0.1 * xi:
            raise Unreachable(
                f"FedLite cannot get within 10% of ξ = {xi} with 4- to 8-bit codes on sub-vectors "
                f"of 8..D values (N·D = {size})."
            )
        return best[1]


__all__ = ["FedLite", "corrected", "reconstruct"]
