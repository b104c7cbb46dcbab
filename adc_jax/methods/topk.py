"""Top-K and Random Top-K sparsification of the cut (Zheng et al. 2023; docs/method.md §4).

Per sample, over the flattened ``N·D`` activation, ``kk = round(r·N·D)`` entries are sent as
values plus their flat positions; the server scatters them into zeros. The gradient w.r.t. the
values is the server's gradient gathered on the same support, so the downlink carries ``kk``
values per sample and no indices (the client already knows them).

* **Top-K** keeps the ``kk`` entries of largest ``|x|``.
* **Random Top-K** samples ``kk`` distinct entries without replacement with weight
  ``(1−α)/kk`` on each top-``kk`` entry and ``α/(N·D−kk)`` on every other one, by Gumbel-top-k:
  the ``kk`` largest ``log w + Gumbel`` — the same law as drawing one entry at a time in
  proportion to its weight among those left. The indices come in draw order.

Paper-compatible ratio: ``ξ = ½[r(1 + ⌈log₂(B·N·D)⌉/32) + r]`` (values plus indices up, values
down, with the nominal rate ``r``). Exact bytes: float values and int32 indices uplink (plus the
labels), float values downlink.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from adc_jax.methods.core import CutShape, Method, Payload, Unreachable, label_dtype


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class DenseShape:
    """The dense token shape ``(N, D)`` the server scatters into.

    A static pytree node (no leaves): it rides in the method state through ``jit``, ``pmap``
    and checkpoints at no cost, so the server knows its model's shape without the payload
    carrying it.
    """

    seq_len: int
    width: int


def scatter_rows(values: jax.Array, indices: jax.Array, size: int) -> jax.Array:
    """``[B, size]`` zeros with ``values [B, kk]`` written at ``indices [B, kk]`` (distinct)."""
    rows = jnp.arange(values.shape[0])[:, None]
    return jnp.zeros((values.shape[0], size), values.dtype).at[rows, indices].set(values)


@dataclasses.dataclass(frozen=True)
class TopK(Method):
    """Keeps the ``kk = round(rate·N·D)`` largest-magnitude entries of each sample.

    State: :class:`DenseShape`. Payload: activations ``[B, kk]`` kept values (tokens' dtype),
    labels ``[B]`` indices, side ``{"indices": [B, kk] int32}`` flat positions in ``N·D``.
    """

    name: ClassVar[str] = "topk"

    rate: float = 0.1  # r: fraction of the N·D values kept per sample

    def num_kept(self, size: int) -> int:
        """``kk = round(r·size)``, at least 1 and at most ``size``."""
        return min(size, max(1, math.floor(self.rate * size + 0.5)))

    def validate(self, cut: CutShape) -> None:
        if not 0 < self.rate <= 1:
            raise ValueError(f"The Top-K rate r ({self.rate}) must be in (0, 1].")

    def init(self, key, cut):
        del key
        self.validate(cut)
        return {"client": {}, "server": {}}, DenseShape(cut.seq_len, cut.width)

    def select(self, magnitude: jax.Array, key: jax.Array, offset) -> jax.Array:
        """Kept positions ``[B, kk] int32`` from ``|x| [B, N·D]``; ``offset`` = global row 0."""
        del key, offset
        return jax.lax.top_k(magnitude, self.num_kept(magnitude.shape[-1]))[1].astype(jnp.int32)

    def encode(self, params, state, tokens, scores, labels, key, *, num_classes, axis_name=None):
        del params, state, scores
        flat = tokens.reshape(tokens.shape[0], -1)
        # Rows are independent; the offset only gives each sample the key it would get on one
        # device, so Random Top-K draws the same entries whatever the device count.
        offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * tokens.shape[0]
        indices = self.select(jax.lax.stop_gradient(jnp.abs(flat)), key, offset)
        values = jnp.take_along_axis(flat, indices, axis=1)
        labels = labels.astype(label_dtype(num_classes))
        return Payload(values, labels, {"indices": indices})

    def decode(self, params, state, payload):
        del params
        size = state.seq_len * state.width
        dense = scatter_rows(payload.activations, payload.side["indices"], size)
        return dense.reshape(-1, state.seq_len, state.width)

    def xi_paper(self, cut: CutShape) -> float:
        return 0.5 * (self.rate * (1 + _index_bits(cut) / 32) + self.rate)

    @classmethod
    def knobs_for_xi(cls, xi, cut):
        """``r`` solving ``ξ = ½[r(1 + ⌈log₂(B·N·D)⌉/32) + r]``."""
        index_bits = _index_bits(cut)
        rate = 2.0 * xi / (2.0 + index_bits / 32)
        if rate > 1.0:
            raise Unreachable(f"Top-K tops out at ξ = {1 + index_bits / 64:.3f} (r = 1); got {xi}.")
        return {"rate": rate}


def _index_bits(cut: CutShape) -> int:
    """Bits of one flat index into the batch, ``⌈log₂(B·N·D)⌉``, as the paper counts them."""
    return math.ceil(math.log2(cut.batch_size * cut.seq_len * cut.width))


@dataclasses.dataclass(frozen=True)
class RandTopK(TopK):
    """Samples ``kk`` distinct entries, favouring the top ``kk`` (mass ``1 − alpha``).

    Deterministic given the encoder's key; each sample draws with ``fold_in(key, row)`` where
    ``row`` is its index in the client's whole batch.
    """

    name: ClassVar[str] = "randtopk"

    alpha: float = 0.1  # probability mass spread over the entries outside the top kk

    def validate(self, cut: CutShape) -> None:
        super().validate(cut)
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"Random Top-K's alpha ({self.alpha}) must be in [0, 1].")

    def select(self, magnitude, key, offset):
        batch, size = magnitude.shape
        kk = self.num_kept(size)
        top = super().select(magnitude, key, offset)
        if kk == size:  # everything is sent; nothing to sample
            return top
        # log-weights (constants; log 0 = -inf excludes a class when alpha is 0 or 1)
        log_top = math.log((1 - self.alpha) / kk) if self.alpha < 1 else -math.inf
        log_rest = math.log(self.alpha / (size - kk)) if self.alpha > 0 else -math.inf
        is_top = scatter_rows(jnp.ones((batch, kk), bool), top, size)
        log_weight = jnp.where(is_top, log_top, log_rest)
        rows = offset + jnp.arange(batch)
        gumbel = jax.vmap(lambda r: jax.random.gumbel(jax.random.fold_in(key, r), (size,)))(rows)
        return jax.lax.top_k(log_weight + gumbel, kk)[1].astype(jnp.int32)


__all__ = ["DenseShape", "RandTopK", "TopK", "scatter_rows"]
