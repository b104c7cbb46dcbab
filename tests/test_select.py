"""The ADC client that computes only the kept tokens: same payload, same gradients as the full path.

With a selector (ADC), the client's last block computes attention output, proj, residual and MLP
only at each sample's ``k`` kept positions. Everything downstream must be unchanged: the merged
tokens and soft labels, the gradient each client parameter receives, and the training trajectory,
on one device under ``jit`` and on eight under ``pmap`` with one client spread over the devices.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from split_kit import B, C, assert_trees_close, fresh_state, make_protocol

from adc_jax import split
from adc_jax.compress import cluster, compress, merge
from adc_jax.methods import ADC, Base

RTOL, ATOL = 1e-5, 1e-6


def protocol(model, method, select_in_client, **kwargs):
    return make_protocol(model, method, select_in_client=select_in_client, **kwargs)


# ---- The model: selected rows of the last block == the same rows of the full block ------------


@pytest.mark.slow
def test_client_with_select_equals_the_gathered_full_output(model, params, batch):
    images = batch["image"]
    k = 5
    # Arbitrary distinct positions per sample (CLS first), from the scores as ADC would.
    select = lambda s: (jnp.argsort(-s, axis=1)[:, :k].astype(jnp.int32), s.sum())

    @jax.jit
    def both(client_params, cotangent):
        def full(p):
            tokens, scores = model.apply_client(p, images)
            positions = select(scores)[0]
            return jnp.take_along_axis(tokens, positions[:, :, None], axis=1), scores

        def selected(p):
            tokens, scores, _ = model.apply_client(p, images, select=select)
            return tokens, scores

        (kept_full, scores_full), vjp_full = jax.vjp(full, client_params)
        (kept_sel, scores_sel), vjp_sel = jax.vjp(selected, client_params)
        zero = jnp.zeros_like(scores_full)
        return (
            kept_full,
            kept_sel,
            scores_full,
            scores_sel,
            vjp_full((cotangent, zero)),
            vjp_sel((cotangent, zero)),
        )

    cotangent = jax.random.normal(jax.random.key(3), (B, k, model.width))
    kept_full, kept_sel, scores_full, scores_sel, g_full, g_sel = both(params["client"], cotangent)
    assert kept_sel.shape == (B, k, model.width)
    np.testing.assert_allclose(kept_sel, kept_full, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(scores_sel, scores_full, rtol=RTOL, atol=1e-7)
    assert_trees_close(g_sel, g_full, rtol=1e-4, atol=1e-5)  # sums of O(10) terms
    # The gradient reached every client block (the comparison is not between zeros).
    assert float(jnp.abs(g_sel[0]["blocks_0"]["attn"]["qkv"]["kernel"]).max()) > 1e-6


@pytest.mark.slow
def test_compress_is_cluster_then_merge(batch):
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.normal(size=(B, 9, 4)), jnp.float32)
    scores = jax.nn.softmax(jnp.asarray(3 * rng.normal(size=(B, 9)), jnp.float32))
    labels = jax.nn.one_hot(batch["label"], C)
    sizes = dict(num_clusters=5, num_tokens=4, key=jax.random.key(4))
    out = compress(tokens, scores, labels=labels, **sizes)
    clusters = cluster(scores, **sizes)
    kept = jnp.take_along_axis(tokens, clusters.positions[:, :, None], axis=1)
    merged, merged_labels = merge(kept, clusters, labels=labels)
    np.testing.assert_array_equal(clusters.positions, out.token_index[out.assignment])
    np.testing.assert_array_equal(merged, out.tokens)
    np.testing.assert_array_equal(merged_labels, out.labels)
    with pytest.raises(ValueError, match=r"kept must be \[B, k, D\]"):
        merge(tokens, clusters)


# ---- The protocol: payload, gradients and trajectory are those of the full path -------------


@pytest.mark.slow
@pytest.mark.parametrize("xi", [0.25, 1.0])  # 1.0: k = N, every position kept
def test_selected_path_gives_the_same_payload_and_gradients(model, params, batch, xi):
    results = []
    for select_in_client in (False, True):
        proto = protocol(model, ADC(xi=xi), select_in_client)
        state = fresh_state(proto, model, params)

        @jax.jit
        def message(state, proto=proto):
            payload, vjp = split.client_forward(proto, state, batch)
            _, grad, _ = split.server_step(proto, state.server, state.method_state, payload)
            return payload, grad, vjp(grad)[0]

        results.append(message(state))
    (payload_full, grad_full, client_full), (payload_sel, grad_sel, client_sel) = results
    np.testing.assert_allclose(payload_sel.activations, payload_full.activations, RTOL, ATOL)
    np.testing.assert_allclose(payload_sel.labels, payload_full.labels, RTOL, ATOL)
    np.testing.assert_allclose(grad_sel, grad_full, RTOL, ATOL)
    assert_trees_close(client_sel, client_full, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_selected_path_trains_like_the_full_path_under_jit(model, params, batch):
    states = []
    for select_in_client in (False, True):
        proto = protocol(model, ADC(xi=0.25), select_in_client)
        programs = split.jit_programs(proto)
        state = fresh_state(proto, model, params)
        for _ in range(3):
            state, _ = programs.split_step(state, batch)
        states.append(state)
    full, selected = states
    assert_trees_close(selected.client.params, full.client.params, rtol=1e-4, atol=1e-6)
    assert_trees_close(selected.server.params, full.server.params, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("per_client", [False, True])
def test_selected_path_under_pmap_equals_the_full_path(model, params, per_client):
    """Global ADC: full path on one device == selected path on eight. Per-client ADC (each of
    four devices compresses its own 4 samples): full path == selected path, both on four."""
    batch_size = 16
    images = jax.random.normal(jax.random.key(5), (batch_size, 16, 16, 3))
    data = {"image": images, "label": jnp.arange(batch_size, dtype=jnp.int32) % C}
    runs = ((4, False), (4, True)) if per_client else ((1, False), (8, True))
    results = []
    for n, select_in_client in runs:
        devices = jax.devices()[:n]
        proto = protocol(model, ADC(xi=0.25), select_in_client, per_client=per_client)
        programs = split.pmap_programs(proto, devices)
        local = batch_size // n if per_client else batch_size
        state = split.replicate(fresh_state(proto, model, params, local), devices)
        for _ in range(2):
            state, metrics = programs.split_step(state, split.shard_batch(data, devices))
        results.append((split.unreplicate(state), np.asarray(metrics["loss"])[0]))
    (ref, loss_ref), (sel, loss_sel) = results
    assert_trees_close(sel.client.params, ref.client.params, rtol=1e-4, atol=1e-6)
    assert_trees_close(sel.server.params, ref.server.params, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(loss_sel, loss_ref, rtol=1e-5)


def test_methods_without_a_selector_see_full_tokens(model):
    assert Base().selector({}, {}, jax.random.key(0)) is None
    assert ADC(xi=0.1).selector({}, {}, jax.random.key(0)) is not None
