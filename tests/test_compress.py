"""The ADC operator (docs/method.md §2): the ξ → (T, k) plan, exactness against a NumPy reference
of the method, no empty clusters, determinism, gradients, and jit / vmap / pmap.

Every new shape costs an XLA compilation, so the tests reuse a few shapes; hypothesis randomises
values freely and shapes within small sets.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from adc_reference import lloyd, merge, partition, sanitize, top_positions
from hypothesis import given, settings
from hypothesis import strategies as st

from adc_jax.compress import compress, compression_plan, select_tokens

_compress = jax.jit(
    compress, static_argnames=("num_clusters", "num_tokens", "max_iters", "axis_name")
)

# (B, N, D, T, k): the shapes the tests share, edge cases included.
MAIN = (16, 8, 3, 4, 3)
EDGE_SHAPES = {
    "T = B": (8, 6, 2, 8, 3),
    "T = 2": (16, 8, 3, 2, 3),
    "k = 1": (16, 8, 3, 4, 1),
    "k = N": (16, 8, 3, 4, 8),
    "B = 2": (2, 5, 2, 2, 2),
    "N = 1": (5, 1, 1, 3, 1),
}
SHAPES = [MAIN, *EDGE_SHAPES.values(), (11, 12, 4, 7, 5)]
NUM_CLASSES = 3
SCORE_MODES = ("random", "attention", "duplicated", "constant", "integer", "nonfinite", "huge")


def make_scores(rng, mode, batch, seq_len):
    if mode == "random":
        return rng.random((batch, seq_len))
    if mode == "attention":  # rows of a softmax, like the real CLS attention
        logits = 3 * rng.normal(size=(batch, seq_len))
        return np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    if mode == "duplicated":
        distinct = rng.random((max(1, batch // 3), seq_len))
        return distinct[rng.integers(len(distinct), size=batch)]
    if mode == "constant":
        return np.full((batch, seq_len), 1.0 / seq_len)
    if mode == "integer":  # many exact ties, in the scores and in the centroids
        return rng.integers(0, 3, size=(batch, seq_len)).astype(np.float64)
    if mode == "nonfinite":
        scores = rng.random((batch, seq_len))
        mask = rng.integers(0, 4, size=scores.shape)
        scores[mask == 1] = np.nan
        scores[mask == 2] = np.inf
        scores[(mask == 3) & (rng.random(scores.shape) < 0.5)] = -np.inf
        return scores
    if mode == "huge":
        return rng.normal(size=(batch, seq_len)) * 10.0 ** rng.integers(0, 40, size=(batch, 1))
    raise ValueError(mode)


def make_inputs(seed, shape, mode="random"):
    batch, seq_len, dim, _, _ = shape
    rng = np.random.default_rng(seed)
    tokens = rng.normal(size=(batch, seq_len, dim)).astype(np.float32)
    with np.errstate(over="ignore"):  # "huge" overflows to ±inf on purpose
        scores = make_scores(rng, mode, batch, seq_len).astype(np.float32)
    labels = np.eye(NUM_CLASSES, dtype=np.float32)[rng.integers(NUM_CLASSES, size=batch)]
    return tokens, scores, labels


def run(tokens, scores, shape, key=0, labels=None, **kwargs):
    _, _, _, num_clusters, num_tokens = shape
    if isinstance(key, int):
        key = jax.random.key(key)
    return _compress(
        jnp.asarray(tokens),
        jnp.asarray(scores),
        num_clusters=num_clusters,
        num_tokens=num_tokens,
        key=key,
        labels=None if labels is None else jnp.asarray(labels),
        **kwargs,
    )


def assert_matches_spec(out, tokens, scores, labels, shape):
    """The output is docs/method.md §2 steps 2–3 applied to ``out.assignment``, and well formed."""
    batch, seq_len, dim, num_clusters, num_tokens = shape
    assignment = np.asarray(out.assignment)
    size = np.asarray(out.cluster_size)
    index = np.asarray(out.token_index)
    # Shapes and dtypes.
    assert out.tokens.shape == (num_clusters, num_tokens, dim)
    assert out.tokens.dtype == tokens.dtype
    assert assignment.shape == (batch,) and assignment.dtype == np.int32
    assert size.dtype == np.int32 and index.dtype == np.int32
    assert out.centroids.shape == (num_clusters, seq_len)
    # Every cluster non-empty, every output finite.
    assert ((assignment >= 0) & (assignment < num_clusters)).all()
    np.testing.assert_array_equal(size, np.bincount(assignment, minlength=num_clusters))
    assert (size >= 1).all(), f"empty cluster: sizes {size}"
    for array in (out.tokens, out.centroids, out.labels):
        assert array is None or np.isfinite(np.asarray(array)).all()
    # Kept positions: CLS first, distinct, in range, in decreasing centroid score.
    assert (index[:, 0] == 0).all()
    assert ((index >= 0) & (index < seq_len)).all()
    assert all(len(set(row)) == num_tokens for row in index)
    # Against the NumPy reference given the assignment (positions chosen from the implementation's
    # centroids, checked equal to the reference's just before, so a float32 near-tie cannot flake).
    points = sanitize(scores)
    ref = merge(tokens, points, assignment, num_clusters, num_tokens, labels, out.centroids)
    atol = 1e-5 * (1.0 + np.abs(points).max())
    np.testing.assert_allclose(out.centroids, ref.centroids, rtol=1e-5, atol=atol)
    np.testing.assert_array_equal(index, ref.token_index)
    np.testing.assert_array_equal(size, ref.cluster_size)
    np.testing.assert_allclose(out.tokens, ref.tokens, rtol=1e-5, atol=1e-5)
    if labels is not None:
        np.testing.assert_allclose(out.labels, ref.labels, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(out.labels).sum(1), 1.0, rtol=1e-5)


# ---- compression_plan ------------------------------------------------------------------------


def test_plan_paper_example():
    plan = compression_plan(128, 197, 0.1)
    assert (plan.num_clusters, plan.num_tokens) == (40, 62)
    assert (plan.batch_size, plan.seq_len) == (128, 197)
    assert plan.xi == pytest.approx(40 * 62 / (128 * 197))
    assert plan.xi == pytest.approx(0.09835, abs=5e-6)
    assert plan.batch_ratio == pytest.approx(40 / 128)
    assert plan.token_ratio == pytest.approx(62 / 197)


@pytest.mark.parametrize("xi", [0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 1.0])
@pytest.mark.parametrize("split", ["sqrt", "fifth"])
def test_plan_splits(xi, split):
    batch, seq_len = 128, 197
    r_batch, r_tokens = (xi**0.5, xi**0.5) if split == "sqrt" else (xi**0.2, xi**0.8)
    plan = compression_plan(batch, seq_len, xi, split=split)
    assert plan.num_clusters == max(2, int(r_batch * batch + 1e-9))
    assert plan.num_tokens == max(1, int(r_tokens * seq_len + 1e-9))
    assert plan.xi <= xi + 1e-12  # rounding down never sends more than asked


def test_plan_fifth_example():
    plan = compression_plan(128, 197, 0.1, split="fifth")
    # ξ^(1/5)·128 = 80.76, ξ^(4/5)·197 = 31.22.
    assert (plan.num_clusters, plan.num_tokens) == (80, 31)


@pytest.mark.parametrize(
    "xi, sizes",
    # √ξ·128 and ξ^(1/4)·197, floored: the release code's sizes, which send ξ^(3/4), not ξ.
    [(0.01, (12, 62)), (0.05, (28, 93)), (0.1, (40, 110)), (0.5, (90, 165))],
)
def test_plan_release_sizes_send_three_quarters_power(xi, sizes):
    plan = compression_plan(128, 197, xi, split="release")
    assert (plan.num_clusters, plan.num_tokens) == sizes
    assert plan.xi == pytest.approx(xi**0.75, rel=0.07)  # floors of the two counts
    assert plan.xi > xi


def test_plan_full_ratio_is_identity():
    plan = compression_plan(16, 10, 1.0)
    assert (plan.num_clusters, plan.num_tokens, plan.xi) == (16, 10, 1.0)


def test_plan_floors_at_two_clusters_and_one_token():
    plan = compression_plan(4, 10, 1e-4)
    assert (plan.num_clusters, plan.num_tokens) == (2, 1)


def test_plan_explicit_ratios():
    plan = compression_plan(100, 100, batch_ratio=0.29, token_ratio=0.57)
    # 0.29 * 100 = 28.999999999999996 and 0.57 * 100 = 56.99999999999999 in floating point: the
    # plan must still say 29 and 57.
    assert (plan.num_clusters, plan.num_tokens) == (29, 57)
    plan = compression_plan(10, 197, batch_ratio=0.7, token_ratio=0.5)
    assert (plan.num_clusters, plan.num_tokens) == (7, 98)
    assert compression_plan(128, 197, batch_ratio=0.25, token_ratio=1.0).num_clusters == 32


def test_plan_explicit_counts():
    plan = compression_plan(128, 197, num_clusters=40, num_tokens=62)
    assert (plan.num_clusters, plan.num_tokens) == (40, 62)
    plan = compression_plan(2, 1, num_clusters=2, num_tokens=1)
    assert plan.xi == 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(xi=0.0), "xi"),
        (dict(xi=-0.1), "xi"),
        (dict(xi=1.5), "xi"),
        (dict(xi=float("nan")), "xi"),
        (dict(xi=0.1, split="cube"), "split"),
        (dict(xi=0.1, num_clusters=4, num_tokens=3), "exactly one"),
        (dict(xi=0.1, batch_ratio=0.5, token_ratio=0.5), "exactly one"),
        (dict(batch_ratio=0.5, token_ratio=0.5, num_clusters=4, num_tokens=3), "exactly one"),
        (dict(), "exactly one"),
        (dict(batch_ratio=0.5), "both"),
        (dict(token_ratio=0.5), "both"),
        (dict(num_clusters=4), "both"),
        (dict(num_tokens=4), "both"),
        (dict(batch_ratio=0.0, token_ratio=0.5), "batch_ratio"),
        (dict(batch_ratio=0.5, token_ratio=1.2), "token_ratio"),
        (dict(num_clusters=1, num_tokens=3), "num_clusters"),
        (dict(num_clusters=17, num_tokens=3), "num_clusters"),
        (dict(num_clusters=4, num_tokens=0), "num_tokens"),
        (dict(num_clusters=4, num_tokens=11), "num_tokens"),
    ],
)
def test_plan_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        compression_plan(16, 10, **kwargs)


def test_plan_batch_too_small():
    with pytest.raises(ValueError, match="batch_size"):
        compression_plan(1, 10, 0.5)
    with pytest.raises(ValueError, match="seq_len"):
        compression_plan(16, 0, 0.5)


def test_plan_feeds_compress():
    # The paper's sizes end to end, on attention-like scores.
    plan = compression_plan(128, 197, 0.1)
    shape = (128, 197, 2, plan.num_clusters, plan.num_tokens)
    tokens, scores, labels = make_inputs(0, shape, "attention")
    out = run(tokens, scores, shape, labels=labels)
    assert out.tokens.shape == (40, 62, 2) and out.labels.shape == (40, NUM_CLASSES)
    assert_matches_spec(out, tokens, scores, labels, shape)


# ---- Exact to the spec -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_matches_numpy_reference(seed):
    tokens, scores, labels = make_inputs(seed, MAIN)
    out = run(tokens, scores, MAIN, key=seed, labels=labels)
    assert_matches_spec(out, tokens, scores, labels, MAIN)


def test_clustering_is_plain_lloyd_on_the_scores():
    # Same initial rows as the implementation (T distinct rows from permutation(key, B)).
    compared = 0
    for seed in range(6):
        tokens, scores, _ = make_inputs(seed, MAIN, "attention")
        key = jax.random.key(seed)
        init = scores[np.asarray(jax.random.permutation(key, MAIN[0]))[: MAIN[3]]]
        ref = lloyd(scores, init)
        if ref.had_empty:
            continue
        out = run(tokens, scores, MAIN, key=key)
        np.testing.assert_array_equal(out.assignment, ref.assignment)
        np.testing.assert_allclose(out.centroids, ref.centroids, rtol=1e-5, atol=1e-6)
        compared += 1
    assert compared >= 4


def test_token_ties_go_to_the_lower_position_exactly():
    # Integer scores: member sums are exact, so the reference's own centroids (not the
    # implementation's) must give identical positions, ties included.
    for seed in range(4):
        tokens, scores, _ = make_inputs(seed, MAIN, "integer")
        out = run(tokens, scores, MAIN, key=seed)
        ref = merge(tokens, scores, out.assignment, MAIN[3], MAIN[4])
        np.testing.assert_array_equal(out.token_index, ref.token_index)
        # Not bitwise: XLA may divide by the size as a multiply by its reciprocal (1 ulp).
        np.testing.assert_allclose(out.centroids, ref.centroids, rtol=3e-7)


def test_select_tokens_order_and_ties():
    centroids = jnp.asarray([[9.0, 1.0, 3.0, 3.0, 2.0, 3.0], [0.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    np.testing.assert_array_equal(select_tokens(centroids, 4), [[0, 2, 3, 5], [0, 1, 2, 3]])
    np.testing.assert_array_equal(select_tokens(centroids, 1), [[0], [0]])
    # CLS is kept whatever its score; it never appears twice.
    np.testing.assert_array_equal(select_tokens(centroids, 6)[1], [0, 1, 2, 3, 4, 5])
    for row in np.asarray(centroids):
        np.testing.assert_array_equal(top_positions(row, 4), select_tokens(row[None], 4)[0])


def test_bfloat16_tokens_keep_their_dtype():
    tokens, scores, _ = make_inputs(0, MAIN)
    out = run(tokens.astype(jnp.bfloat16), scores, MAIN)
    assert out.tokens.dtype == jnp.bfloat16
    ref = merge(tokens.astype(jnp.bfloat16), scores, out.assignment, MAIN[3], MAIN[4])
    np.testing.assert_allclose(out.tokens.astype(np.float32), ref.tokens, atol=2e-2)


# ---- No empty cluster, finite output -------------------------------------------------------


@pytest.mark.parametrize("mode", SCORE_MODES)
@pytest.mark.parametrize("name", EDGE_SHAPES)
def test_adversarial_edges(name, mode):
    shape = EDGE_SHAPES[name]
    tokens, scores, labels = make_inputs(1, shape, mode)
    out = run(tokens, scores, shape, key=2, labels=labels)
    assert_matches_spec(out, tokens, scores, labels, shape)


@pytest.mark.parametrize("mode", SCORE_MODES)
def test_adversarial_scores_main_shape(mode):
    for seed in range(3):
        tokens, scores, labels = make_inputs(seed, MAIN, mode)
        out = run(tokens, scores, MAIN, key=seed, labels=labels)
        assert_matches_spec(out, tokens, scores, labels, MAIN)


def test_identical_rows_and_all_nan():
    for scores in (np.ones((16, 8), np.float32), np.full((16, 8), np.nan, np.float32)):
        tokens, _, labels = make_inputs(0, MAIN)
        out = run(tokens, scores, MAIN, labels=labels)
        assert_matches_spec(out, tokens, scores, labels, MAIN)


# ---- Determinism ---------------------------------------------------------------------------


@pytest.mark.slow
def test_deterministic_given_key():
    tokens, scores, labels = make_inputs(3, MAIN)
    first = run(tokens, scores, MAIN, key=5, labels=labels)
    second = run(tokens, scores, MAIN, key=5, labels=labels)
    eager = compress(
        jnp.asarray(tokens),
        jnp.asarray(scores),
        num_clusters=MAIN[3],
        num_tokens=MAIN[4],
        key=jax.random.key(5),
        labels=jnp.asarray(labels),
    )
    for a, b, c in zip(first, second, eager, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-7)  # jit vs op-by-op
    np.testing.assert_array_equal(first.assignment, eager.assignment)


def test_different_keys_can_give_different_clusterings():
    tokens, scores, _ = make_inputs(4, MAIN)
    found = {partition(run(tokens, scores, MAIN, key=s).assignment) for s in range(10)}
    assert len(found) > 1


# ---- Gradients -----------------------------------------------------------------------------


def expected_gradients(out, token_cot, label_cot, batch_shape):
    """The spec's backward: each member gets 1/|S_t| of its cluster's gradient at the kept
    positions; dropped positions get zero."""
    grad = np.zeros(batch_shape)
    grad_labels = np.zeros((batch_shape[0], label_cot.shape[1]))
    size = np.asarray(out.cluster_size)
    for b, t in enumerate(np.asarray(out.assignment)):
        grad[b, np.asarray(out.token_index)[t]] = token_cot[t] / size[t]
        grad_labels[b] = label_cot[t] / size[t]
    return grad, grad_labels


@pytest.mark.parametrize("mode", ["random", "duplicated"])
def test_gradient_is_scatter_over_cluster_size(mode):
    tokens, scores, labels = make_inputs(6, MAIN, mode)
    rng = np.random.default_rng(7)
    _, _, _, num_clusters, num_tokens = MAIN
    token_cot = rng.normal(size=(num_clusters, num_tokens, MAIN[2])).astype(np.float32)
    label_cot = rng.normal(size=(num_clusters, NUM_CLASSES)).astype(np.float32)
    key = jax.random.key(1)

    def loss(tokens, labels):
        out = compress(
            tokens, jnp.asarray(scores), num_clusters=4, num_tokens=3, key=key, labels=labels
        )
        return jnp.sum(out.tokens * token_cot) + jnp.sum(out.labels * label_cot)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(tokens), jnp.asarray(labels))
    out = run(tokens, scores, MAIN, key=key, labels=labels)
    want, want_labels = expected_gradients(out, token_cot, label_cot, tokens.shape)
    np.testing.assert_allclose(grads[0], want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grads[1], want_labels, rtol=1e-6, atol=1e-7)
    # Dropped tokens get exactly zero.
    assert (np.asarray(grads[0])[want == 0] == 0).all()


@pytest.mark.slow
def test_gradient_finite_differences():
    # float64 (tokens and a nonlinear loss), so central differences are accurate to ~eps².
    tokens, scores, _ = make_inputs(8, MAIN, "attention")
    rng = np.random.default_rng(9)
    weights = rng.normal(size=(MAIN[3], MAIN[4], MAIN[2]))
    key = jax.random.key(2)

    def loss(tokens):
        out = compress(tokens, jnp.asarray(scores), num_clusters=4, num_tokens=3, key=key)
        return jnp.sum(jnp.tanh(out.tokens.astype(jnp.float64)) * weights)

    with jax.enable_x64(True):
        x = jnp.asarray(tokens, jnp.float64)
        grad = np.asarray(jax.jit(jax.grad(loss))(x))
        loss = jax.jit(loss)
        assert np.abs(grad).max() > 0
        eps = 1e-4
        for _ in range(4):
            v = jnp.asarray(rng.normal(size=tokens.shape))
            numeric = (loss(x + eps * v) - loss(x - eps * v)) / (2 * eps)
            np.testing.assert_allclose(numeric, np.sum(grad * np.asarray(v)), rtol=1e-6)


def test_no_gradient_wrt_scores():
    tokens, scores, labels = make_inputs(10, MAIN)

    def loss(scores):
        out = compress(
            jnp.asarray(tokens), scores, num_clusters=4, num_tokens=3, key=jax.random.key(0),
            labels=jnp.asarray(labels),
        )  # fmt: skip
        return jnp.sum(out.tokens**2) + jnp.sum(out.centroids) + jnp.sum(out.labels**2)

    grad = jax.jit(jax.grad(loss))(jnp.asarray(scores))
    np.testing.assert_array_equal(grad, np.zeros_like(scores))


# ---- jit, vmap, pmap -------------------------------------------------------------------------


def test_vmap_over_clients_equals_separate_calls():
    num_clients = 3
    batches = [make_inputs(20 + c, MAIN) for c in range(num_clients)]
    tokens, scores, labels = (np.stack(parts) for parts in zip(*batches, strict=True))
    keys = jax.random.split(jax.random.key(0), num_clients)
    fn = functools.partial(compress, num_clusters=MAIN[3], num_tokens=MAIN[4])
    batched = jax.jit(jax.vmap(fn))(
        jnp.asarray(tokens), jnp.asarray(scores), key=keys, labels=jnp.asarray(labels)
    )
    for c in range(num_clients):
        single = run(tokens[c], scores[c], MAIN, key=keys[c], labels=labels[c])
        np.testing.assert_array_equal(batched.assignment[c], single.assignment)
        np.testing.assert_array_equal(batched.token_index[c], single.token_index)
        np.testing.assert_array_equal(batched.cluster_size[c], single.cluster_size)
        for field in ("tokens", "labels", "centroids"):
            np.testing.assert_allclose(
                getattr(batched, field)[c], getattr(single, field), rtol=1e-6, atol=1e-6
            )


# How each device uses the merged batch under pmap, and the factor that then relates a device's
# gradient to its slice of the one-device gradient. compress's contract: the gradient of a member
# sums the cotangents that all devices put on the merged output.
PMAP_USES = {
    "own share of the clusters": 1.0,  # device d serves clusters t with t % n == d
    "all clusters, loss / n": 1.0,  # replicated work, loss scaled as split.py does
    "all clusters, unscaled": 8.0,  # the sum of n identical losses: n times the gradient
}


@pytest.mark.parametrize(
    "shape, use",
    [(MAIN, use) for use in PMAP_USES] + [((32, 8, 3, 5, 4), "own share of the clusters")],
)
def test_pmap_equals_single_device_on_the_global_batch(shape, use):
    num_devices = jax.local_device_count()
    assert num_devices == 8, "tests/conftest.py should simulate 8 CPU devices"
    batch, seq_len, dim, num_clusters, num_tokens = shape
    local = batch // num_devices
    tokens, scores, labels = make_inputs(30, shape, "attention")
    key = jax.random.key(3)
    rng = np.random.default_rng(31)
    token_cot = rng.normal(size=(num_clusters, num_tokens, dim)).astype(np.float32)
    label_cot = rng.normal(size=(num_clusters, NUM_CLASSES)).astype(np.float32)
    fn = functools.partial(compress, num_clusters=num_clusters, num_tokens=num_tokens, key=key)

    def loss(tokens, scores, labels, axis_name=None):
        out = fn(tokens, scores, labels=labels, axis_name=axis_name)
        weight = jnp.ones((num_clusters,))
        if axis_name is not None and use.startswith("own share"):
            device = jax.lax.axis_index(axis_name)
            weight = (jnp.arange(num_clusters) % num_devices == device).astype(jnp.float32)
        elif axis_name is not None and use.endswith("loss / n"):
            weight = weight / num_devices
        value = jnp.sum(weight[:, None, None] * out.tokens * token_cot)
        return value + jnp.sum(weight[:, None] * out.labels * label_cot), out

    grad_fn = jax.grad(loss, argnums=(0, 2), has_aux=True)
    (single_grad, single_label_grad), single = jax.jit(grad_fn)(tokens, scores, labels)

    def per_device(tokens, scores, labels):
        return grad_fn(tokens, scores, labels, axis_name="data")

    def shard(x):
        return x.reshape(num_devices, local, *x.shape[1:])

    (grad, label_grad), out = jax.pmap(per_device, axis_name="data")(
        shard(tokens), shard(scores), shard(labels)
    )
    for d in range(num_devices):
        np.testing.assert_array_equal(out.assignment[d], single.assignment)
        np.testing.assert_array_equal(out.token_index[d], single.token_index)
        np.testing.assert_array_equal(out.cluster_size[d], single.cluster_size)
        for field in ("tokens", "labels", "centroids"):
            np.testing.assert_allclose(
                getattr(out, field)[d], getattr(single, field), rtol=1e-5, atol=1e-5
            )
    # Each device's gradient is (factor times) its slice of the one-device gradient.
    factor = PMAP_USES[use]
    assert np.abs(single_grad).max() > 0
    np.testing.assert_allclose(
        grad.reshape(tokens.shape), factor * single_grad, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        label_grad.reshape(labels.shape), factor * single_label_grad, rtol=1e-5, atol=1e-6
    )


def test_pmap_devices_agree_whatever_keys_they_pass():
    """The usual pmap pattern hands every device its own key; the clusters must still be shared
    (else the merged label rows would not sum to 1): all devices use the first device's key."""
    num_devices = jax.local_device_count()
    tokens, scores, labels = make_inputs(40, MAIN, "attention")
    _, _, _, num_clusters, num_tokens = MAIN
    keys = jax.random.split(jax.random.key(5), num_devices)
    shard = lambda x: x.reshape(num_devices, -1, *x.shape[1:])

    @functools.partial(jax.pmap, axis_name="data")
    def per_device(tokens, scores, labels, key):
        return compress(
            tokens,
            scores,
            labels=labels,
            num_clusters=num_clusters,
            num_tokens=num_tokens,
            key=key,
            axis_name="data",
        )

    single = run(tokens, scores, MAIN, key=keys[0], labels=labels)
    for device_keys in (keys, jax.random.key_data(keys)):  # typed and raw uint32 keys
        out = per_device(shard(tokens), shard(scores), shard(labels), device_keys)
        np.testing.assert_allclose(np.asarray(out.labels).sum(-1), 1.0, rtol=1e-5)
        for d in range(num_devices):
            np.testing.assert_array_equal(out.assignment[d], single.assignment)
            np.testing.assert_array_equal(out.token_index[d], single.token_index)
            np.testing.assert_allclose(out.tokens[d], single.tokens, rtol=1e-5, atol=1e-6)


def test_counts_and_stopping_rule_are_validated():
    tokens, scores, _ = make_inputs(0, MAIN)
    tokens, scores = jnp.asarray(tokens), jnp.asarray(scores)
    kw = dict(num_clusters=4, num_tokens=3, key=jax.random.key(0))
    for name, value in [("num_clusters", 2.5), ("num_tokens", 3.0), ("num_clusters", True)]:
        with pytest.raises(TypeError, match=f"{name} must be a Python int"):
            compress(tokens, scores, **{**kw, name: value})
    with pytest.raises(TypeError, match="max_iters must be a Python int"):
        compress(tokens, scores, **kw, max_iters=2.5)
    with pytest.raises(ValueError, match="max_iters"):
        compress(tokens, scores, **kw, max_iters=0)
    for tol in (float("nan"), -1.0):
        with pytest.raises(ValueError, match=r"tol \((nan|-1.0)\) must be a number >= 0"):
            compress(tokens, scores, **kw, tol=tol)
    with pytest.raises(TypeError, match="num_clusters must be a Python int"):
        compression_plan(16, 8, num_clusters=2.5, num_tokens=3)
    # A traced tol cannot be checked; a NaN one still leaves no cluster empty.
    out = jax.jit(lambda t: compress(tokens, scores, **kw, tol=t))(jnp.float32(jnp.nan))
    assert (np.asarray(out.cluster_size) >= 1).all()


def test_input_errors():
    tokens, scores, labels = make_inputs(0, MAIN)
    kw = dict(num_clusters=4, num_tokens=3, key=jax.random.key(0))
    with pytest.raises(ValueError, match="tokens"):
        compress(jnp.asarray(tokens[0]), jnp.asarray(scores), **kw)
    with pytest.raises(ValueError, match="scores"):
        compress(jnp.asarray(tokens), jnp.asarray(scores[:, :-1]), **kw)
    with pytest.raises(ValueError, match="labels"):
        compress(jnp.asarray(tokens), jnp.asarray(scores), labels=jnp.asarray(labels[:-1]), **kw)
    with pytest.raises(ValueError, match="num_clusters"):
        compress(jnp.asarray(tokens), jnp.asarray(scores), **{**kw, "num_clusters": 17})
    with pytest.raises(ValueError, match="num_clusters"):
        compress(jnp.asarray(tokens), jnp.asarray(scores), **{**kw, "num_clusters": 1})
    with pytest.raises(ValueError, match="num_tokens"):
        compress(jnp.asarray(tokens), jnp.asarray(scores), **{**kw, "num_tokens": 9})
    with pytest.raises(ValueError, match="num_tokens"):
        compress(jnp.asarray(tokens), jnp.asarray(scores), **{**kw, "num_tokens": 0})


# ---- Properties ----------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    shape=st.sampled_from(SHAPES),
    mode=st.sampled_from(SCORE_MODES),
    seed=st.integers(0, 2**32 - 1),
    key=st.integers(0, 2**31 - 1),
)
def test_property_shared_shapes(shape, mode, seed, key):
    tokens, scores, labels = make_inputs(seed, shape, mode)
    out = run(tokens, scores, shape, key=key, labels=labels)
    assert_matches_spec(out, tokens, scores, labels, shape)


@st.composite
def random_shapes(draw):
    batch = draw(st.integers(2, 16))
    seq_len = draw(st.integers(1, 12))
    return (
        batch,
        seq_len,
        draw(st.integers(1, 4)),
        draw(st.integers(2, batch)),
        draw(st.integers(1, seq_len)),
    )


@pytest.mark.slow
@settings(max_examples=8, deadline=None)
@given(
    shape=random_shapes(),
    mode=st.sampled_from(SCORE_MODES),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_random_shapes(shape, mode, seed):
    tokens, scores, labels = make_inputs(seed, shape, mode)
    out = run(tokens, scores, shape, key=seed % 1000, labels=labels)
    assert_matches_spec(out, tokens, scores, labels, shape)
