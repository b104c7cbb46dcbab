"""K-means (docs/method.md §2, step 2): plain Lloyd from the keyed initial rows, the stopping
rule, and the rule that keeps every cluster non-empty."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from adc_reference import lloyd, partition

from adc_jax.kmeans import cluster_means, kmeans

# The package re-exports the function under the module's name, so fetch the module itself.
kmeans_lib = importlib.import_module("adc_jax.kmeans")

_kmeans = jax.jit(kmeans, static_argnames=("num_clusters", "max_iters"))

# Every new shape is an XLA compilation, so most tests share P = 24 points of F = 3 features and
# T = 4 clusters.
P, F, T = 24, 3, 4


def initial_rows(points, num_clusters, key):
    """The implementation's documented initialisation: T distinct rows chosen with the key."""
    return np.asarray(points)[
        np.asarray(jax.random.permutation(key, points.shape[0]))[:num_clusters]
    ]


def blobs(rng, num_blobs, per_blob, dim, spread=0.05, separation=10.0):
    centres = rng.normal(size=(num_blobs, dim)) * separation
    labels = np.repeat(np.arange(num_blobs), per_blob)
    points = centres[labels] + spread * rng.normal(size=(len(labels), dim))
    perm = rng.permutation(len(labels))
    return points[perm].astype(np.float32), labels[perm]


def assert_valid(result, num_points, num_clusters):
    assignment = np.asarray(result.assignment)
    size = np.asarray(result.cluster_size)
    assert assignment.shape == (num_points,) and assignment.dtype == np.int32
    assert size.shape == (num_clusters,) and size.dtype == np.int32
    assert ((assignment >= 0) & (assignment < num_clusters)).all()
    np.testing.assert_array_equal(size, np.bincount(assignment, minlength=num_clusters))
    assert (size >= 1).all(), f"empty cluster: sizes {size}"
    assert np.isfinite(np.asarray(result.centroids)).all()


# ---- Plain Lloyd, exactly ----------------------------------------------------------------------


@pytest.mark.slow
def test_reproduces_numpy_lloyd_from_the_same_initial_rows():
    rng = np.random.default_rng(0)
    compared = 0
    for trial in range(12):
        num_points, dim, num_clusters = [(P, F, T), (40, F, 7)][trial % 2]
        points = rng.normal(size=(num_points, dim)).astype(np.float32)
        key = jax.random.key(trial)
        ref = lloyd(points, initial_rows(points, num_clusters, key))
        if ref.had_empty:  # plain Lloyd is undefined there; covered by other tests
            continue
        result = _kmeans(jnp.asarray(points), num_clusters=num_clusters, key=key)
        np.testing.assert_array_equal(result.assignment, ref.assignment)
        np.testing.assert_allclose(result.centroids, ref.centroids, rtol=1e-5, atol=1e-6)
        assert int(result.num_iters) == ref.num_iters
        compared += 1
    assert compared >= 8  # the check must actually have run


def test_initial_centroids_are_the_keyed_rows():
    # With one iteration the assignment is the nearest of the initial rows.
    rng = np.random.default_rng(1)
    points = rng.normal(size=(P, F)).astype(np.float32)
    key = jax.random.key(3)
    init = initial_rows(points, T, key)
    result = _kmeans(jnp.asarray(points), num_clusters=T, key=key, max_iters=1)
    nearest = np.argmin(((points[:, None] - init[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(result.assignment, nearest)
    assert int(result.num_iters) == 1


# ---- Stopping rule -----------------------------------------------------------------------------


def test_max_iters_one_runs_exactly_one_iteration():
    points = jnp.asarray(np.random.default_rng(2).normal(size=(P, F)), jnp.float32)
    result = _kmeans(points, num_clusters=T, key=jax.random.key(0), max_iters=1)
    assert int(result.num_iters) == 1
    assert_valid(result, P, T)


def test_stops_early_once_converged():
    rng = np.random.default_rng(3)
    points, _ = blobs(rng, num_blobs=T, per_blob=P // T, dim=F, spread=0.5)
    result = _kmeans(jnp.asarray(points), num_clusters=T, key=jax.random.key(0), max_iters=50)
    ref = lloyd(points, initial_rows(points, T, jax.random.key(0)))
    assert 2 <= int(result.num_iters) < 50
    assert int(result.num_iters) == ref.num_iters
    # Converged: one more Lloyd step changes nothing.
    again = cluster_means(jnp.asarray(points), kmeans_lib._assign(points, result.centroids), T)
    np.testing.assert_array_equal(again[0], result.centroids)


def test_tolerance_controls_the_stop():
    points = jnp.asarray(np.random.default_rng(4).normal(size=(P, F)), jnp.float32)
    key = jax.random.key(1)
    # The first shift (from the initial rows) is finite, so any huge tol stops after one step;
    # tol = 0 can never be undershot (shift >= 0), so all 50 iterations run.
    assert int(_kmeans(points, num_clusters=T, key=key, tol=1e30).num_iters) == 1
    assert int(_kmeans(points, num_clusters=T, key=key, tol=0.0).num_iters) == 50


def test_stopping_rule_is_the_squared_total_centre_shift():
    # docs/method.md §2, step 2: stop once (Σ_t ‖μ_t − μ_t^prev‖)² < tol. The first shift is
    # measured from the initial rows; a tol just above its square stops after one iteration, just
    # below does not.
    rng = np.random.default_rng(5)
    points = rng.normal(size=(P, F)).astype(np.float32)
    key = jax.random.key(2)
    init = initial_rows(points, T, key)
    first = lloyd(points, init, max_iters=1)
    shift = np.linalg.norm(first.centroids - init, axis=-1).sum()
    assert 1.5 < shift < 10  # away from 1, so the squared and unsquared rules differ clearly
    for factor, want_one in [(1.01, True), (0.99, False)]:
        tol = float(shift**2 * factor)
        result = _kmeans(jnp.asarray(points), num_clusters=T, key=key, tol=tol)
        assert (int(result.num_iters) == 1) == want_one, (factor, int(result.num_iters))


# ---- Lloyd fixed point on separated data ---------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_well_separated_blobs_every_sample_in_its_nearest_cluster(seed):
    rng = np.random.default_rng(10 + seed)
    num_blobs = T
    points, _ = blobs(rng, num_blobs=num_blobs, per_blob=P // T, dim=F)
    result = _kmeans(jnp.asarray(points), num_clusters=num_blobs, key=jax.random.key(seed))
    assert_valid(result, len(points), num_blobs)
    centroids = np.asarray(result.centroids)
    nearest = np.argmin(((points[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(result.assignment, nearest)
    # Centroids are the member means.
    for t in range(num_blobs):
        np.testing.assert_allclose(
            centroids[t], points[np.asarray(result.assignment) == t].mean(0), rtol=1e-5, atol=1e-5
        )


def test_some_key_recovers_the_blobs_exactly():
    rng = np.random.default_rng(20)
    points, truth = blobs(rng, num_blobs=T, per_blob=P // T, dim=F)
    found = [
        partition(_kmeans(jnp.asarray(points), num_clusters=T, key=jax.random.key(s)).assignment)
        for s in range(10)
    ]
    assert partition(truth) in found


# ---- Empty clusters ----------------------------------------------------------------------


def test_empty_cluster_takes_the_farthest_movable_sample_and_nothing_else_moves():
    points = jnp.asarray([[0.0], [0.1], [9.0], [11.0], [12.0]])
    centroids = jnp.asarray([[0.0], [10.0], [1000.0]])  # cluster 2 would be empty
    assignment = np.asarray(kmeans_lib._assign(points, centroids))
    # Plain nearest: [0, 0, 1, 1, 1]; own squared distances [0, .01, 1, 1, 4]: sample 4 moves.
    np.testing.assert_array_equal(assignment, [0, 0, 1, 1, 2])


def test_singleton_clusters_are_never_robbed():
    # Sample 3 is farthest from its centroid, but it is alone in cluster 1: it must stay.
    points = jnp.asarray([[0.0], [0.5], [1.0], [100.0]])
    centroids = jnp.asarray([[0.0], [90.0], [-1000.0]])
    assignment = np.asarray(kmeans_lib._assign(points, centroids))
    np.testing.assert_array_equal(assignment, [0, 0, 2, 1])


def test_several_empty_clusters_are_all_filled():
    points = jnp.zeros((6, 2))
    centroids = jnp.zeros((6, 2))  # all ties: argmin sends everything to cluster 0
    assignment = np.asarray(kmeans_lib._assign(points, centroids))
    np.testing.assert_array_equal(np.sort(assignment), np.arange(6))


NON_FINITE = np.random.default_rng(1).normal(size=(P, F))
NON_FINITE[::3, 0] = np.nan
NON_FINITE[1::3, 1] = np.inf
NON_FINITE[2::5, 2] = -np.inf
NON_FINITE[3] = 1e30  # beyond the ±1e15 clip


@pytest.mark.parametrize(
    "name, points, num_clusters",
    [
        ("identical rows", np.ones((P, F)), T),
        ("constant, T = P", np.full((P, F), 0.2), P),
        ("two distinct rows", np.repeat([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], P // 2, axis=0), T),
        ("three distinct rows, T = P", np.tile(np.eye(F), (P // F, 1)), P),
        ("random, T = P", np.random.default_rng(0).normal(size=(P, F)), P),
        ("one cluster", np.random.default_rng(0).normal(size=(P, F)), 1),
        ("two equal points", np.ones((2, F)), 2),
        ("nan and inf", NON_FINITE, T),
        ("all nan", np.full((P, F), np.nan), T),
        ("all +inf", np.full((P, F), np.inf), T),
    ],
)
def test_every_cluster_non_empty(name, points, num_clusters):
    points = jnp.asarray(points, jnp.float32)
    for seed in range(3):
        result = _kmeans(points, num_clusters=num_clusters, key=jax.random.key(seed))
        assert_valid(result, points.shape[0], num_clusters)
        # Centroids are exactly the member means of the returned assignment.
        means, size = cluster_means(
            jnp.clip(jnp.nan_to_num(points), -1e15, 1e15), result.assignment, num_clusters
        )
        np.testing.assert_allclose(result.centroids, means, rtol=1e-6)
        np.testing.assert_array_equal(result.cluster_size, size)


# ---- Determinism, gradients, errors --------------------------------------------------------


def test_deterministic_given_key():
    points = jnp.asarray(np.random.default_rng(5).normal(size=(P, F)), jnp.float32)
    a = _kmeans(points, num_clusters=T, key=jax.random.key(7))
    b = kmeans(points, T, jax.random.key(7))  # not jitted, same key
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_different_keys_give_different_clusterings():
    points = jnp.asarray(np.random.default_rng(6).random((P, F)), jnp.float32)
    found = {
        partition(_kmeans(points, num_clusters=T, key=jax.random.key(s)).assignment)
        for s in range(10)
    }
    assert len(found) > 1


def test_not_differentiated():
    points = jnp.asarray(np.random.default_rng(7).normal(size=(P, F)), jnp.float32)

    def loss(p):
        return jnp.sum(kmeans(p, T, jax.random.key(0)).centroids ** 2)

    np.testing.assert_array_equal(jax.jit(jax.grad(loss))(points), jnp.zeros_like(points))


def test_argument_errors():
    points = jnp.zeros((4, 2))
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans(points, 5, jax.random.key(0))
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans(points, 0, jax.random.key(0))
    with pytest.raises(ValueError, match="max_iters"):
        kmeans(points, 2, jax.random.key(0), max_iters=0)


def test_vmap_matches_separate_calls():
    rng = np.random.default_rng(8)
    points = jnp.asarray(rng.normal(size=(3, P, F)), jnp.float32)
    keys = jax.random.split(jax.random.key(0), 3)
    batched = jax.jit(jax.vmap(functools.partial(kmeans, num_clusters=T)))(points, key=keys)
    for c in range(3):
        single = _kmeans(points[c], num_clusters=T, key=keys[c])
        np.testing.assert_array_equal(batched.assignment[c], single.assignment)
        np.testing.assert_allclose(batched.centroids[c], single.centroids, rtol=1e-6)
        assert int(batched.num_iters[c]) == int(single.num_iters)
