"""The ADC operator: merge similar samples, keep the most attended tokens (docs/method.md §2).

Public functions:

* :func:`compression_plan` turns a compression ratio ξ (or explicit ratios, or explicit counts)
  into the static ints ``T`` (clusters) and ``k`` (kept tokens, CLS included).
* :func:`compress` applies ADC to one batch of client activations.
* :func:`cluster` and :func:`merge` are its two halves: :func:`cluster` needs only the scores
  (K-means and token selection), :func:`merge` averages the tokens each sample keeps. A caller that
  can compute only the kept tokens (the ADC client's last block, see :mod:`adc_jax.vit`) runs
  :func:`cluster` first and :func:`merge` on ``[B, k, D]``; ``compress`` is exactly
  ``cluster → gather → merge``.

Neither knows about Flax, training or devices; :func:`compress` accepts an optional named axis so
that a batch spread over devices is compressed as one global batch.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from adc_jax.kmeans import check_stopping, kmeans, static_int

# Guards int(r·B) against float error such as 0.29 * 100 = 28.999999999999996.
_EPS = 1e-9

SPLITS = ("sqrt", "fifth", "release")


@dataclasses.dataclass(frozen=True)
class CompressionPlan:
    """Static sizes of one ADC step: ``T`` merged samples of ``k`` tokens each."""

    batch_size: int  # B
    seq_len: int  # N, CLS included
    num_clusters: int  # T
    num_tokens: int  # k, CLS included

    @property
    def batch_ratio(self) -> float:
        return self.num_clusters / self.batch_size

    @property
    def token_ratio(self) -> float:
        return self.num_tokens / self.seq_len

    @property
    def xi(self) -> float:
        """The actual compression ratio ``T·k / (B·N)``."""
        return self.batch_ratio * self.token_ratio


def compression_plan(
    batch_size: int,
    seq_len: int,
    xi: float | None = None,
    *,
    split: str = "sqrt",
    batch_ratio: float | None = None,
    token_ratio: float | None = None,
    num_clusters: int | None = None,
    num_tokens: int | None = None,
) -> CompressionPlan:
    """Chooses ``T`` and ``k`` for a batch of ``B`` samples of ``N`` tokens.

    Give exactly one of:

    * ``xi`` (with ``split``): ``split="sqrt"`` (default, the paper's EUSIPCO version) uses
      ``T/B = k/N = √ξ``; ``split="fifth"`` (the authors' 2025 research code) uses
      ``T/B = ξ^(1/5)`` and ``k/N = ξ^(4/5)``; ``split="release"`` (the authors' 2026 release
      code, which produced the paper's figures) uses ``T/B = √ξ`` and ``k/N = ξ^(1/4)``, so it
      sends ``ξ^(3/4)`` of the activations (0.178 at ξ = 0.1) while its budget counts ``ξ``;
    * ``batch_ratio`` and ``token_ratio``;
    * ``num_clusters`` and ``num_tokens``.

    Ratios become counts as ``T = max(2, int(r_B·B))`` and ``k = max(1, int(r_N·N))``.
    Example: ``B = 128, N = 197, ξ = 0.1`` gives ``T = 40, k = 62`` and an actual ξ of 0.0984.

    Raises:
      ValueError: for ``ξ`` or a ratio outside ``(0, 1]``, an unknown ``split``, a mix of the three
        ways, ``B < 2``, ``N < 1``, or counts outside ``2 <= T <= B``, ``1 <= k <= N``.
    """
    if batch_size < 2:
        raise ValueError(f"batch_size ({batch_size}) must be at least 2 to merge samples.")
    if seq_len < 1:
        raise ValueError(f"seq_len ({seq_len}) must be at least 1.")
    given = [
        xi is not None,
        batch_ratio is not None or token_ratio is not None,
        num_clusters is not None or num_tokens is not None,
    ]
    if sum(given) != 1:
        raise ValueError(
            "Give exactly one of: xi; batch_ratio and token_ratio; num_clusters and num_tokens."
        )
    if xi is not None:
        _check_ratio("xi", xi)
        if split == "sqrt":
            batch_ratio = token_ratio = math.sqrt(xi)
        elif split == "fifth":
            batch_ratio, token_ratio = xi ** (1 / 5), xi ** (4 / 5)
        elif split == "release":
            batch_ratio, token_ratio = math.sqrt(xi), xi ** (1 / 4)
        else:
            raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
    if num_clusters is None and num_tokens is None:
        if batch_ratio is None or token_ratio is None:
            raise ValueError("Give both batch_ratio and token_ratio.")
        _check_ratio("batch_ratio", batch_ratio)
        _check_ratio("token_ratio", token_ratio)
        num_clusters = max(2, int(batch_ratio * batch_size + _EPS))
        num_tokens = max(1, int(token_ratio * seq_len + _EPS))
    if num_clusters is None or num_tokens is None:
        raise ValueError("Give both num_clusters and num_tokens.")
    check_sizes(batch_size, seq_len, num_clusters, num_tokens)
    return CompressionPlan(batch_size, seq_len, int(num_clusters), int(num_tokens))


def _check_ratio(name: str, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} ({value}) must be in (0, 1].")


def check_sizes(batch_size: int, seq_len: int, num_clusters: int, num_tokens: int) -> None:
    """Raises a TypeError unless ``T`` and ``k`` are ints, a ValueError unless they are in range."""
    num_clusters = static_int("num_clusters", num_clusters)
    num_tokens = static_int("num_tokens", num_tokens)
    if not 2 <= num_clusters <= batch_size:
        raise ValueError(
            f"num_clusters ({num_clusters}) must satisfy 2 <= T <= batch size ({batch_size})."
        )
    if not 1 <= num_tokens <= seq_len:
        raise ValueError(
            f"num_tokens ({num_tokens}) must satisfy 1 <= k <= sequence length ({seq_len})."
        )


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _global_sum(x: jax.Array, axis_name: str) -> jax.Array:
    """``psum`` whose gradient sums every device's cotangent.

    Each device may use the merged batch differently (e.g. only its own share of the clusters),
    so a member's gradient must collect the cotangents of all devices. Spelled out because
    ``psum``'s own transpose does not sum device-varying cotangents under every JAX version.
    """
    return jax.lax.psum(x, axis_name)


def _global_sum_fwd(x, axis_name):
    return jax.lax.psum(x, axis_name), None


def _global_sum_bwd(axis_name, _, g):
    return (jax.lax.psum(g, axis_name),)


_global_sum.defvjp(_global_sum_fwd, _global_sum_bwd)


class Compressed(NamedTuple):
    """What :func:`compress` returns (a pytree).

    Attributes:
      tokens: ``[T, k, D]`` merged activations; CLS first, then the ``k−1`` patch tokens with the
        highest centroid score, in decreasing score order. Dtype of the input tokens.
      labels: ``[T, C] float32`` (float64 for float64 labels) mean of the member rows of
        ``labels``, or ``None``.
      assignment: ``[B] int32``, the cluster of each sample.
      cluster_size: ``[T] int32``, members per cluster; every entry is ``>= 1``.
      token_index: ``[T, k] int32`` positions kept; ``token_index[:, 0] == 0`` (CLS).
      centroids: ``[T, N] float32``, the mean score vector of each cluster.
    """

    tokens: jax.Array
    labels: jax.Array | None
    assignment: jax.Array
    cluster_size: jax.Array
    token_index: jax.Array
    centroids: jax.Array


def select_tokens(centroids: jax.Array, num_tokens: int) -> jax.Array:
    """CLS plus the ``k−1`` patch positions with the highest centroid score: ``[T, k] int32``.

    Ties go to the lower position (``lax.top_k``'s rule).
    """
    cls = jnp.zeros((centroids.shape[0], 1), jnp.int32)
    if num_tokens == 1:
        return cls
    _, top = jax.lax.top_k(centroids[:, 1:], num_tokens - 1)
    return jnp.concatenate([cls, top.astype(jnp.int32) + 1], axis=1)


def compress(
    tokens: jax.Array,
    scores: jax.Array,
    *,
    num_clusters: int,
    num_tokens: int,
    key: jax.Array,
    labels: jax.Array | None = None,
    max_iters: int = 50,
    tol: float = 1e-4,
    axis_name: str | None = None,
) -> Compressed:
    """Attention-based Double Compression of one batch (docs/method.md §2).

    1. K-means (Euclidean) on the score vectors into ``T = num_clusters`` clusters: initial
       centroids are ``T`` distinct rows of ``scores`` chosen with ``key``; Lloyd iterations until
       the squared total centre shift is below ``tol`` or ``max_iters`` ran. No cluster is ever
       empty: an empty cluster takes the sample farthest from its own centroid among the clusters
       that have more than one member (see :mod:`adc_jax.kmeans`).
    2. Each cluster's activations and labels are averaged (soft labels).
    3. Each merged sample keeps CLS plus the ``k−1`` patch tokens that its centroid scores highest.

    Args:
      tokens: ``[B, N, D]`` client output; index 0 of the token axis is CLS.
      scores: ``[B, N]`` head-averaged CLS attention row of the last client block (CLS→CLS
        included). Only used to cluster and rank; never differentiated.
      num_clusters: static ``T``, a Python int with ``2 <= T <= B``.
      num_tokens: static ``k``, a Python int with ``1 <= k <= N``, CLS included.
      key: PRNG key for the K-means initialisation. Same key, same inputs: same output.
      labels: optional ``[B, C]`` one-hot or probability rows.
      max_iters: static int cap on Lloyd iterations, ``>= 1`` (reference: 50).
      tol: convergence threshold on the squared total centre shift, ``>= 0`` (reference: 1e-4).
      axis_name: when set, the call runs under ``pmap``/``shard_map`` with this named axis and
        each device passes its own slice of one global batch (``B`` is then the global batch
        size). Scores are all-gathered, every device runs the same K-means, and per-cluster
        partial sums are summed across devices; every device returns the same full output and
        ``assignment`` covers the global batch. Gradients sum the cotangents that all devices
        put on the merged output (each device may use a different share of it). The K-means
        initialisation uses the key of the axis' first device on every device, so the devices
        agree whatever keys they pass (e.g. ``jax.random.split(key, n_devices)``).

    Returns:
      A :class:`Compressed`. Differentiable with respect to ``tokens`` (and ``labels``): the
      gradient of a merged token is divided by the cluster size and scattered back to its
      members' kept positions; dropped tokens get zero. K-means, the scores and the token indices
      carry no gradient. Works under ``jit`` (sizes static), ``vmap`` and ``pmap``.

    Raises:
      TypeError: ``num_clusters``, ``num_tokens`` or ``max_iters`` is not an int.
      ValueError: a shape does not match, a count is out of range, or ``tol`` is NaN or < 0.
    """
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be [B, N, D]; got shape {tokens.shape}.")
    if scores.shape != tokens.shape[:2]:
        raise ValueError(
            f"scores must be [B, N] = {tokens.shape[:2]} to match tokens; got {scores.shape}."
        )
    _check_labels(labels, tokens.shape[0])
    clusters = cluster(
        scores,
        num_clusters=num_clusters,
        num_tokens=num_tokens,
        key=key,
        max_iters=max_iters,
        tol=tol,
        axis_name=axis_name,
    )
    # Gathering before merging is exact (both are linear) and touches k, not N, tokens.
    kept = jnp.take_along_axis(tokens, clusters.positions[:, :, None], axis=1)  # [B, k, D]
    merged, merged_labels = merge(kept, clusters, labels=labels, axis_name=axis_name)
    return Compressed(
        tokens=merged,
        labels=merged_labels,
        assignment=clusters.assignment,
        cluster_size=clusters.cluster_size,
        token_index=clusters.token_index,
        centroids=clusters.centroids,
    )


def _check_labels(labels: jax.Array | None, batch: int) -> None:
    if labels is not None and (labels.ndim != 2 or labels.shape[0] != batch):
        raise ValueError(f"labels must be [B, C] with B = {batch}; got shape {labels.shape}.")


class Clusters(NamedTuple):
    """What :func:`cluster` returns (a pytree, no gradient).

    Attributes:
      assignment: ``[B] int32``, the cluster of each sample of the (global) batch.
      cluster_size: ``[T] int32``, members per cluster; every entry is ``>= 1``.
      token_index: ``[T, k] int32`` positions kept per cluster; ``token_index[:, 0] == 0`` (CLS).
      centroids: ``[T, N] float32``, the mean score vector of each cluster.
      positions: ``[B_local, k] int32``, the positions this caller's samples keep:
        ``token_index[assignment]`` for its own rows of the batch.
    """

    assignment: jax.Array
    cluster_size: jax.Array
    token_index: jax.Array
    centroids: jax.Array
    positions: jax.Array


def cluster(
    scores: jax.Array,
    *,
    num_clusters: int,
    num_tokens: int,
    key: jax.Array,
    max_iters: int = 50,
    tol: float = 1e-4,
    axis_name: str | None = None,
) -> Clusters:
    """Steps 1 and 3 of :func:`compress` (K-means on the scores, token selection), no tokens.

    Args:
      scores: ``[B, N]`` score vectors (this device's rows when ``axis_name`` is set); wrapped in
        ``stop_gradient``.
      num_clusters, num_tokens, key, max_iters, tol, axis_name: as in :func:`compress`.

    Returns:
      :class:`Clusters`, identical on every device of ``axis_name`` except ``positions``.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be [B, N]; got shape {scores.shape}.")
    local_batch, seq_len = scores.shape
    max_iters = check_stopping(max_iters, tol)

    # ---- Gather the global batch of scores (no-op on one device) -------------------------
    all_scores = jax.lax.stop_gradient(scores)
    if axis_name is not None:
        all_scores = jax.lax.all_gather(all_scores, axis_name, tiled=True)
        key = first_device_key(key, axis_name)
    check_sizes(all_scores.shape[0], seq_len, num_clusters, num_tokens)

    # ---- 1. K-means on the score vectors, 3. the tokens each centroid ranks highest ----------
    result = kmeans(all_scores, num_clusters, key, max_iters=max_iters, tol=tol)
    token_index = select_tokens(result.centroids, num_tokens)
    local = _local_rows(result.assignment, local_batch, axis_name)
    return Clusters(
        assignment=result.assignment,
        cluster_size=result.cluster_size,
        token_index=token_index,
        centroids=result.centroids,
        positions=token_index[local],
    )


def first_device_key(key: jax.Array, axis_name: str) -> jax.Array:
    """The key of the axis' first device, on every device (typed or raw ``uint32`` keys).

    Every device must make the same clustering decisions; keys that differ per device (the usual
    ``jax.random.split(key, n_devices)`` of a ``pmap``) would give each its own clusters.
    """
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    data = jax.random.key_data(key) if typed else key
    data = jax.lax.all_gather(data, axis_name)[0]
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(key)) if typed else data


def _local_rows(assignment: jax.Array, local_batch: int, axis_name: str | None) -> jax.Array:
    """This device's slice of the global ``assignment``."""
    if axis_name is None:
        return assignment
    start = jax.lax.axis_index(axis_name) * local_batch
    return jax.lax.dynamic_slice_in_dim(assignment, start, local_batch)


def merge(
    kept: jax.Array,
    clusters: Clusters,
    *,
    labels: jax.Array | None = None,
    axis_name: str | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Step 2 of :func:`compress` on tokens already selected: per-cluster means.

    Args:
      kept: ``[B, k, D]``, each sample's tokens at ``clusters.positions`` (in that order).
      clusters: from :func:`cluster` on the same batch (and the same ``axis_name``).
      labels: optional ``[B, C]`` one-hot or probability rows.
      axis_name: as in :func:`compress`.

    Returns:
      ``(tokens [T, k, D] in kept's dtype, labels [T, C] float32 or None)``, as the ``tokens`` and
      ``labels`` of :func:`compress`, with the same gradient (each member gets ``1/|S_t|`` of its
      cluster's cotangent; summed over devices under ``axis_name``).
    """
    if kept.ndim != 3 or kept.shape[:2] != clusters.positions.shape:
        raise ValueError(
            f"kept must be [B, k, D] with [B, k] = {clusters.positions.shape} "
            f"(clusters.positions); got shape {kept.shape}."
        )
    _check_labels(labels, kept.shape[0])
    num_clusters = clusters.cluster_size.shape[0]
    assignment = _local_rows(clusters.assignment, kept.shape[0], axis_name)
    members = jax.nn.one_hot(assignment, num_clusters, dtype=jnp.float32).T  # [T, B]

    def mean(x):
        # At least float32; float64 inputs (under x64) keep float64 precision.
        dtype = jnp.promote_types(x.dtype, jnp.float32)
        weights = members.astype(dtype) / clusters.cluster_size[:, None].astype(dtype)
        # One [T, B] × [B, rest] product: its input gradient weightsᵀ·g comes out [B, rest] as
        # x is laid out (the einsum "tb,bkd->tkd" got a [k·D, B] product and a transposed copy,
        # 2–4 ms of an ADC step on a CPU). HIGHEST: a mean, not a feature map; TPUs would
        # otherwise round the weights to bf16.
        rows = x.reshape(x.shape[0], -1)
        out = jnp.dot(weights, rows, preferred_element_type=dtype, precision="highest")
        out = out.reshape(-1, *x.shape[1:])
        if axis_name is not None:
            out = _global_sum(out, axis_name)
        return out

    merged = mean(kept).astype(kept.dtype)
    merged_labels = None if labels is None else mean(labels)
    return merged, merged_labels
