"""Lloyd's K-means in JAX with static shapes and no empty clusters.

The clustering step of ADC (docs/method.md §2, step 2): Euclidean distance, initial centroids
drawn from ``num_clusters`` distinct rows of the batch, Lloyd iterations until the squared total
centre shift ``(Σ_t ‖μ_t − μ_t^prev‖)²`` falls below ``tol`` or ``max_iters`` iterations ran.

Unlike the reference code, every cluster always has at least one member: after each assignment
step, each empty cluster takes the sample that lies farthest from its own centroid among the
samples whose cluster has more than one member (the pigeonhole principle guarantees one exists
while ``num_clusters <= num_points``). A sample is moved only to keep a cluster from being empty,
so on well-separated data the result is plain Lloyd. Centroids are therefore always means of
non-empty sets: the output is finite for any finite input.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Largest magnitude a coordinate keeps: (2e15)² summed over 1e5 features stays below float32's max.
_LIMIT = 1e15


class KMeansResult(NamedTuple):
    """Output of :func:`kmeans`.

    Attributes:
      assignment: ``[P] int32``, the cluster of each point.
      centroids: ``[T, F] float32``, the mean of each cluster's members under ``assignment``.
      cluster_size: ``[T] int32``, members per cluster, every entry ``>= 1``.
      num_iters: ``[] int32``, Lloyd iterations run.
    """

    assignment: jax.Array
    centroids: jax.Array
    cluster_size: jax.Array
    num_iters: jax.Array


def cluster_means(points: jax.Array, assignment: jax.Array, num_clusters: int):
    """Mean of the rows of ``points`` ``[P, F]`` in each cluster, and the cluster sizes."""
    one_hot = jax.nn.one_hot(assignment, num_clusters, dtype=points.dtype)  # [P, T]
    size = one_hot.sum(axis=0)
    sums = jnp.einsum("pt,pf->tf", one_hot, points, precision=jax.lax.Precision.HIGHEST)
    # `size` is >= 1 whenever the assignment came from `_assign`; the guard only keeps a
    # hand-made assignment from producing NaN.
    return sums / jnp.maximum(size, 1.0)[:, None], size.astype(jnp.int32)


def _squared_distances(points: jax.Array, centroids: jax.Array) -> jax.Array:
    # The direct form (not ‖x‖² − 2x·c + ‖c‖²): exact ties stay ties, so identical rows get
    # identical assignments, and no cancellation makes a distance negative.
    diff = points[:, None, :] - centroids[None, :, :]
    return jnp.sum(diff * diff, axis=-1)  # [P, T]


def _fill_empty(assignment: jax.Array, own_distance: jax.Array, num_clusters: int) -> jax.Array:
    """Give every empty cluster one sample, taken from a cluster that can spare it."""

    def fill_one(t, assignment):
        size = jnp.bincount(assignment, length=num_clusters)
        # Farthest sample (from its own centroid) among those whose cluster keeps a member.
        movable = size[assignment] > 1
        candidate = jnp.argmax(jnp.where(movable, own_distance, -jnp.inf))
        return jnp.where(size[t] == 0, assignment.at[candidate].set(t), assignment)

    def fill_all(assignment):
        return jax.lax.fori_loop(0, num_clusters, fill_one, assignment)

    any_empty = jnp.any(jnp.bincount(assignment, length=num_clusters) == 0)
    return jax.lax.cond(any_empty, fill_all, lambda a: a, assignment)


def _assign(points: jax.Array, centroids: jax.Array) -> jax.Array:
    distance = _squared_distances(points, centroids)
    assignment = jnp.argmin(distance, axis=1).astype(jnp.int32)
    own = jnp.take_along_axis(distance, assignment[:, None], axis=1)[:, 0]
    return _fill_empty(assignment, own, centroids.shape[0])


def static_int(name: str, value) -> int:
    """``value`` as an int, or a TypeError naming ``name``: sizes fix array shapes, so they must be
    Python (or NumPy) ints, not floats, bools or traced values."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(
            f"{name} must be a Python int (a static size); got {value!r} of type "
            f"{type(value).__name__}. Under jax.jit, pass it as a static argument."
        )
    return int(value)


def check_stopping(max_iters, tol) -> int:
    """Validates Lloyd's stopping rule; returns ``max_iters`` as an int.

    ``max_iters`` must be an int ``>= 1``; ``tol`` a number ``>= 0`` (``inf`` stops after one
    iteration). A traced ``tol`` cannot be checked here; :func:`kmeans` then still runs at least
    one iteration, so a NaN ``tol`` cannot leave clusters empty.
    """
    max_iters = static_int("max_iters", max_iters)
    if max_iters < 1:
        raise ValueError(f"max_iters ({max_iters}) must be at least 1.")
    if not isinstance(tol, jax.core.Tracer):
        try:
            value = float(tol)
        except TypeError:
            raise TypeError(f"tol must be a number; got {tol!r}.") from None
        if math.isnan(value) or value < 0:
            raise ValueError(
                f"tol ({value}) must be a number >= 0: Lloyd stops once the squared total centre "
                "shift is below it (0 runs all max_iters iterations)."
            )
    return max_iters


def kmeans(
    points: jax.Array,
    num_clusters: int,
    key: jax.Array,
    *,
    max_iters: int = 50,
    tol: float = 1e-4,
) -> KMeansResult:
    """Clusters the rows of ``points`` into ``num_clusters`` non-empty clusters.

    Args:
      points: ``[P, F]`` floats. Not differentiated. NaN becomes 0 and entries are clipped to
        ``±1e15`` before clustering, so squared distances cannot overflow float32.
      num_clusters: static int ``T`` with ``1 <= T <= P``.
      key: PRNG key; picks the ``T`` distinct rows that seed the centroids.
      max_iters: at most this many Lloyd iterations (static int, ``>= 1``); at least one runs.
      tol: stop once the squared total centre shift is below this (a number ``>= 0``).

    Returns:
      A :class:`KMeansResult`; ``centroids`` are exactly the member means of ``assignment``.

    Raises:
      TypeError: ``num_clusters`` or ``max_iters`` is not an int (e.g. ``2.5`` or a tracer).
      ValueError: either is out of range, or ``tol`` is NaN or negative.
    """
    num_points = points.shape[0]
    num_clusters = static_int("num_clusters", num_clusters)
    if not 1 <= num_clusters <= num_points:
        raise ValueError(
            f"num_clusters ({num_clusters}) must be between 1 and the number of points "
            f"({num_points})."
        )
    max_iters = check_stopping(max_iters, tol)
    points = jax.lax.stop_gradient(points).astype(jnp.float32)
    points = jnp.clip(jnp.nan_to_num(points), -_LIMIT, _LIMIT)
    seeds = jax.random.permutation(key, num_points)[:num_clusters]
    init = points[seeds]

    def cond(state):
        it, _, _, _, shift = state
        # The first iteration always runs: it is what makes every cluster non-empty.
        return (it == 0) | ((it < max_iters) & (shift >= tol))

    def body(state):
        it, centroids, _, _, _ = state
        assignment = _assign(points, centroids)
        new, size = cluster_means(points, assignment, num_clusters)
        shift = jnp.square(jnp.sum(jnp.linalg.norm(new - centroids, axis=-1)))
        return it + 1, new, assignment, size, shift

    state = (
        jnp.int32(0),
        init,
        jnp.zeros((num_points,), jnp.int32),
        jnp.zeros((num_clusters,), jnp.int32),
        jnp.float32(jnp.inf),
    )
    it, centroids, assignment, size, _ = jax.lax.while_loop(cond, body, state)
    return KMeansResult(assignment, centroids, size, it)
