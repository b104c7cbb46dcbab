"""Plain NumPy reference for the ADC operator (docs/method.md §2), written from the method's
description, not from the code.

Used by tests only. Everything is float64 unless said otherwise, so comparisons against the JAX
float32 implementation use a tolerance; the exceptions are spelt out where exact equality is meant.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# kmeans.py's documented input sanitisation: NaN -> 0, then clip to ±1e15.
LIMIT = 1e15


def sanitize(scores: np.ndarray) -> np.ndarray:
    """What the implementation clusters on: NaN → 0, ±inf and huge values clipped to ±1e15."""
    scores = np.asarray(scores, np.float32)
    return np.clip(np.nan_to_num(scores), -LIMIT, LIMIT).astype(np.float32)


def top_positions(centroid: np.ndarray, num_tokens: int) -> np.ndarray:
    """``[0] ∪ 1 + top(k−1)`` of ``centroid[1:]``: descending, ties to the lower position."""
    order = np.argsort(-centroid[1:], kind="stable")[: num_tokens - 1]
    return np.concatenate([[0], 1 + order]).astype(np.int64)


class Merged(NamedTuple):
    tokens: np.ndarray  # [T, k, D]
    labels: np.ndarray | None  # [T, C]
    centroids: np.ndarray  # [T, N]
    token_index: np.ndarray  # [T, k]
    cluster_size: np.ndarray  # [T]


def merge(
    tokens: np.ndarray,
    scores: np.ndarray,
    assignment: np.ndarray,
    num_clusters: int,
    num_tokens: int,
    labels: np.ndarray | None = None,
    centroids_for_selection: np.ndarray | None = None,
) -> Merged:
    """Steps 2–3 of docs/method.md §2 for a given assignment.

    Merged tokens are the mean over members of all N tokens, then the gather of the kept positions;
    labels and centroids are member means. ``centroids_for_selection`` (default: the reference's
    own centroids) picks the kept positions, so that a float32 near-tie in the implementation's
    centroids cannot make the comparison flaky.
    """
    tokens = np.asarray(tokens, np.float64)
    scores = np.asarray(scores, np.float64)
    assignment = np.asarray(assignment)
    members = [np.flatnonzero(assignment == t) for t in range(num_clusters)]
    sizes = np.array([len(m) for m in members])
    assert (sizes >= 1).all(), f"empty cluster in reference merge: sizes {sizes}"
    centroids = np.stack([scores[m].mean(axis=0) for m in members])
    select = centroids if centroids_for_selection is None else centroids_for_selection
    index = np.stack([top_positions(np.asarray(c), num_tokens) for c in select])
    merged = np.stack([tokens[m].mean(axis=0)[index[t]] for t, m in enumerate(members)])
    merged_labels = None
    if labels is not None:
        labels = np.asarray(labels, np.float64)
        merged_labels = np.stack([labels[m].mean(axis=0) for m in members])
    return Merged(merged, merged_labels, centroids, index, sizes)


class Lloyd(NamedTuple):
    assignment: np.ndarray
    centroids: np.ndarray
    num_iters: int
    had_empty: bool  # an empty cluster arose: plain Lloyd is then undefined


def lloyd(points: np.ndarray, init: np.ndarray, max_iters: int = 50, tol: float = 1e-4) -> Lloyd:
    """Plain Lloyd iterations from ``init`` in float32, stopping as docs/method.md §2 says.

    One iteration: assign each point to its nearest centroid (ties to the lower cluster), replace
    each centroid by its members' mean, and stop once ``(Σ_t ‖μ_t − μ_t^prev‖)² < tol`` or after
    ``max_iters`` iterations. The returned assignment is the last one made, and the centroids are
    its member means.
    """
    points = np.asarray(points, np.float32)
    centroids = np.asarray(init, np.float32)
    num_clusters = centroids.shape[0]
    had_empty = False
    assignment = np.zeros(len(points), np.int64)
    num_iters = 0
    while num_iters < max_iters:
        num_iters += 1
        diff = points[:, None, :] - centroids[None, :, :]
        assignment = np.argmin((diff * diff).sum(-1), axis=1)
        new = centroids.copy()
        for t in range(num_clusters):
            member = assignment == t
            if member.any():
                new[t] = points[member].mean(axis=0)
            else:
                had_empty = True
        shift = np.square(np.linalg.norm(new - centroids, axis=-1).sum())
        centroids = new
        if shift < tol:
            break
    return Lloyd(assignment, centroids, num_iters, had_empty)


def partition(assignment) -> frozenset:
    """The clustering as a set of member sets, independent of the cluster numbering."""
    assignment = np.asarray(assignment)
    return frozenset(frozenset(np.flatnonzero(assignment == t).tolist()) for t in set(assignment))
