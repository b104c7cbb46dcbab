"""ADC: Attention-based Double Compression (docs/method.md §2) as a split-learning method."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from adc_jax.compress import CompressionPlan, cluster, compress, compression_plan, merge
from adc_jax.methods.core import CutShape, Method, Payload, axis_size


@dataclasses.dataclass(frozen=True)
class ADC(Method):
    """Merge similar samples (K-means on CLS attention) and keep the most attended tokens.

    Sizes come from ``xi`` with ``split`` (``"sqrt"``: ``T/B = k/N = √ξ``; ``"fifth"``:
    ``T/B = ξ^(1/5)``, ``k/N = ξ^(4/5)``; ``"release"``: ``T/B = √ξ``, ``k/N = ξ^(1/4)``, which
    sends ``ξ^(3/4)``), or from explicit ratios, or explicit counts; see
    :func:`adc_jax.compression_plan`. With ``xi`` given, the budget counts the nominal ``ξ``
    whatever the split (as the authors' code does); the exact bytes show what was sent. A ratio
    or count of 0 means "not given" (config files cannot hold ``None``).
    """

    name: ClassVar[str] = "adc"

    xi: float | None = 0.1
    split: str = "sqrt"
    batch_ratio: float | None = None
    token_ratio: float | None = None
    num_clusters: int | None = None
    num_tokens: int | None = None
    max_iters: int = 50
    tol: float = 1e-4

    def plan(self, batch_size: int, seq_len: int) -> CompressionPlan:
        given = lambda value: value or None  # 0 (a config's "unset") or None
        ratios = given(self.batch_ratio) or given(self.token_ratio)
        counts = given(self.num_clusters) or given(self.num_tokens)
        return compression_plan(
            batch_size,
            seq_len,
            None if ratios or counts else self.xi,
            split=self.split,
            batch_ratio=given(self.batch_ratio),
            token_ratio=given(self.token_ratio),
            num_clusters=given(self.num_clusters),
            num_tokens=given(self.num_tokens),
        )

    def validate(self, cut: CutShape) -> None:
        self.plan(cut.batch_size, cut.seq_len)

    def selector(self, params, state, key, *, axis_name=None):
        """K-means and token selection from the scores alone (:func:`adc_jax.compress.cluster`).

        The client's last block then computes only each sample's ``k`` kept tokens and
        :meth:`encode` merges them; same payload, same gradients as the full path.
        """
        del params, state

        def select(scores):
            plan = self.plan(scores.shape[0] * axis_size(axis_name), scores.shape[1])
            clusters = cluster(
                scores,
                num_clusters=plan.num_clusters,
                num_tokens=plan.num_tokens,
                key=key,
                max_iters=self.max_iters,
                tol=self.tol,
                axis_name=axis_name,
            )
            return clusters.positions, clusters

        return select

    def encode(
        self,
        params,
        state,
        tokens,
        scores,
        labels,
        key,
        *,
        num_classes,
        axis_name=None,
        selection=None,
    ):
        """``tokens [B, N, D]``, or ``[B, k, D]`` kept tokens with ``selection`` (the
        :class:`~adc_jax.compress.Clusters` of :meth:`selector`)."""
        del params, state
        devices = axis_size(axis_name)
        plan = self.plan(scores.shape[0] * devices, scores.shape[1])
        one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
        if selection is None:
            out = compress(
                tokens,
                scores,
                num_clusters=plan.num_clusters,
                num_tokens=plan.num_tokens,
                key=key,
                labels=one_hot,
                max_iters=self.max_iters,
                tol=self.tol,
                axis_name=axis_name,
            )
            merged, soft_labels = out.tokens, out.labels
        else:
            merged, soft_labels = merge(tokens, selection, labels=one_hot, axis_name=axis_name)
        if devices > 1 and plan.num_clusters % devices == 0:
            # Every device holds all T merged samples; each serves its own T/n of them. The
            # gradient of the slice flows back through compress's psum to every member.
            share = plan.num_clusters // devices
            start = jax.lax.axis_index(axis_name) * share
            merged = jax.lax.dynamic_slice_in_dim(merged, start, share)
            soft_labels = jax.lax.dynamic_slice_in_dim(soft_labels, start, share)
        # Otherwise every device serves all T (identical work); the protocol's 1/n loss scale
        # keeps the summed gradients equal to one device's.
        return Payload(merged, soft_labels, {})

    @classmethod
    def knobs_for_xi(cls, xi, cut):
        del cut
        return {"xi": float(xi)}

    def xi_paper(self, cut: CutShape) -> float:
        # The reference budgets ADC at its nominal ξ when one is given.
        if self.xi is not None and not (self.batch_ratio or self.token_ratio or self.num_clusters):
            return float(self.xi)
        return self.plan(cut.batch_size, cut.seq_len).xi
