"""The split protocol: three programs == one fused program == one device == eight, exact bytes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from split_kit import B, C, assert_trees_close, fresh_state, make_protocol

from adc_jax import compression_plan, split, vit
from adc_jax.link import Channel, awgn, link, uniform_quantize
from adc_jax.methods import ADC, Base, CutShape, step_cost


def run(step_fn, state, batch, steps=3):
    for _ in range(steps):
        state, metrics = step_fn(state, batch)
    return state, metrics


@pytest.fixture(scope="module")
def adc_protocol(model):
    return make_protocol(model, ADC(xi=0.25))


@pytest.fixture(scope="module")
def adc_programs(adc_protocol):
    return split.jit_programs(adc_protocol)


@pytest.fixture(scope="module")
def three_steps(adc_protocol, adc_programs, model, params, batch):
    """ADC ξ = 0.25 on one device: three split-protocol steps."""
    return run(adc_programs.split_step, fresh_state(adc_protocol, model, params), batch)


@pytest.mark.slow
def test_split_protocol_equals_fused_step(
    adc_protocol, adc_programs, model, params, batch, three_steps
):
    fused, fused_metrics = run(
        adc_programs.fused_step, fresh_state(adc_protocol, model, params), batch
    )
    separate, metrics = three_steps
    assert int(separate.step) == int(fused.step) == 3
    assert_trees_close(separate.client.params, fused.client.params)
    assert_trees_close(separate.server.params, fused.server.params)
    np.testing.assert_allclose(metrics["loss"], fused_metrics["loss"], rtol=1e-5)
    # Training moved the parameters (the comparison is not between two untouched copies).
    moved = jax.tree.map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))),
        separate.client.params["model"],
        params["client"],
    )
    assert max(jax.tree.leaves(moved)) > 1e-4


def _poison(tree):
    """``tree`` with one element of its first leaf set to NaN."""
    leaves, treedef = jax.tree.flatten(tree)
    leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(jnp.nan)
    return jax.tree.unflatten(treedef, leaves)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["split_step", "fused_step"])
@pytest.mark.parametrize("where", ["client params", "server params", "images"])
def test_the_first_non_finite_step_is_kept_on_the_device(
    adc_protocol, adc_programs, model, params, batch, path, where
):
    step_fn = getattr(adc_programs, path)
    state, metrics = step_fn(fresh_state(adc_protocol, model, params), batch)
    assert int(metrics["bad_step"]) == 0 and bool(metrics["finite"])
    bad_batch = batch
    if where == "client params":
        state = state._replace(client=state.client._replace(params=_poison(state.client.params)))
    elif where == "server params":
        state = state._replace(server=state.server._replace(params=_poison(state.server.params)))
    else:
        bad_batch = {**batch, "image": batch["image"].at[3, 0, 0, 0].set(jnp.inf)}
    state, metrics = step_fn(state, bad_batch)  # step 2
    assert int(metrics["bad_step"]) == 2 and not bool(metrics["finite"])
    for _ in range(2):  # later steps keep the first bad step
        state, metrics = step_fn(state, batch)
    assert int(metrics["bad_step"]) == int(state.bad_step) == 2 and int(state.step) == 4


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [16, 24])  # T = 8 shards over 8 devices; T = 12 does not
def test_one_device_equals_eight(model, params, batch_size):
    protocol = make_protocol(model, ADC(xi=0.25))
    images = jax.random.normal(jax.random.key(3), (batch_size, 16, 16, 3))
    data = {"image": images, "label": jnp.arange(batch_size, dtype=jnp.int32) % C}
    results = []
    for n in (1, 8):
        devices = jax.devices()[:n]
        programs = split.pmap_programs(protocol, devices)
        state = split.replicate(fresh_state(protocol, model, params, batch_size), devices)
        for _ in range(3):
            state, metrics = programs.split_step(state, split.shard_batch(data, devices))
        results.append((split.unreplicate(state), np.asarray(metrics["loss"])[0]))
    (one, loss_one), (eight, loss_eight) = results
    assert_trees_close(one.client.params, eight.client.params)
    assert_trees_close(one.server.params, eight.server.params)
    np.testing.assert_allclose(loss_one, loss_eight, rtol=1e-5)


@pytest.mark.slow
def test_per_client_mode_runs_and_accounting_sums_clients(model, params, batch):
    devices = jax.devices()[:4]
    method = ADC(xi=0.25)
    protocol = make_protocol(model, method, per_client=True)
    programs = split.pmap_programs(protocol, devices)
    state = split.replicate(fresh_state(protocol, model, params, B // 4), devices)
    state, metrics = programs.split_step(state, split.shard_batch(batch, devices))
    assert np.all(np.isfinite(np.asarray(metrics["loss"])))
    # Each device merged its own 4 samples into T = 2 clusters.
    one = step_cost(method, CutShape(B // 4, model.seq_len, model.width, C))
    four = step_cost(method, CutShape(B // 4, model.seq_len, model.width, C), clients=4)
    assert four.bytes_up == 4 * one.bytes_up and four.bytes_down == 4 * one.bytes_down
    k = compression_plan(4, model.seq_len, xi=0.25).num_tokens
    assert four.uplink["activations"] == 4 * 2 * k * model.width * 4


@pytest.mark.slow
@pytest.mark.parametrize("method", [Base(), ADC(xi=0.25)], ids=["base", "adc"])
def test_bfloat16_step_sends_a_bfloat16_payload(method, params, batch):
    """Mixed precision: bfloat16 tokens cross the cut (and their gradient comes back in
    bfloat16); parameters, optimiser state and the loss stay float32; bytes follow the dtype."""
    model = vit.make_model("vit_test_patch4_16", split_index=2, num_classes=C, dtype=jnp.bfloat16)
    protocol = make_protocol(model, method)
    programs = split.jit_programs(protocol)
    state = fresh_state(protocol, model, params)
    payload, vjp = programs.client_forward(state, batch)
    assert payload.activations.dtype == jnp.bfloat16
    _, grad, metrics = programs.server_step(state.server, state.method_state, payload)
    assert grad.dtype == jnp.bfloat16 and metrics["loss"].dtype == jnp.float32
    state, metrics = programs.fused_step(fresh_state(protocol, model, params), batch)
    assert np.isfinite(float(metrics["loss"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.client))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.server))
    cost = step_cost(method, CutShape(B, model.seq_len, model.width, C, jnp.bfloat16))
    assert cost.uplink["activations"] == payload.activations.size * 2
    assert cost.downlink["gradient"] == grad.size * 2


def test_batch_not_divisible_by_devices_is_a_clear_error(batch):
    with pytest.raises(ValueError, match=r"Batch size \(16\) must be divisible .* \(3\)"):
        split.shard_batch(batch, jax.devices()[:3])


# ---- Bytes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "b,n,d,c,xi,channel,bits",
    [
        (128, 197, 192, 100, 0.1, "identity", 32),
        (64, 197, 384, 101, 0.5, "bfloat16", 16),
        (32, 50, 64, 10, 0.25, "int8", 8),
        (16, 17, 32, 10, 0.05, "quantize", 4),
    ],
)
def test_bytes_equal_the_closed_form(b, n, d, c, xi, channel, bits):
    link_channel = Channel(channel, bits=bits)
    side = {"identity": 0, "bfloat16": 0, "int8": 4, "quantize": 8}[channel]
    plan = compression_plan(b, n, xi=xi)
    t, k = plan.num_clusters, plan.num_tokens
    cut = CutShape(b, n, d, c)

    adc = step_cost(ADC(xi=xi), cut, link_channel, link_channel)
    activations = math.ceil(t * k * d * bits / 8) + side
    assert adc.uplink == {"activations": activations, "labels": t * c * 4}  # soft labels f32
    assert adc.downlink == {"gradient": activations}  # downlink == activation uplink
    assert adc.samples_equivalent == pytest.approx(xi * b)

    base = step_cost(Base(), cut, link_channel, link_channel)
    dense = math.ceil(b * n * d * bits / 8) + side
    label_bytes = b * (1 if c <= 256 else 2)  # class indices as the smallest unsigned int
    assert base.uplink == {"activations": dense, "labels": label_bytes}
    assert base.downlink == {"gradient": dense}
    assert base.xi_paper == 1.0

    reference = b * n * d * 4
    expected_xi = 0.5 * (
        (activations + t * c * 4) / (reference + label_bytes) + activations / reference
    )
    assert adc.xi_measured == pytest.approx(expected_xi)


def test_bfloat16_payload_bytes_are_half_of_float32():
    """Activations and gradients are counted in the compute dtype: a bfloat16 model sends half
    the bytes of a float32 one (labels unchanged); the dense reference of ξ_measured is Base in
    the same dtype, so Base stays at 1 and ADC's ratio barely moves (its soft labels stay f32)."""
    f32 = CutShape(128, 197, 192, 100)
    bf16 = CutShape(128, 197, 192, 100, jnp.bfloat16)
    for method in (Base(), ADC(xi=0.1)):
        full, half = step_cost(method, f32), step_cost(method, bf16)
        assert half.uplink["activations"] * 2 == full.uplink["activations"]
        assert half.downlink["gradient"] * 2 == full.downlink["gradient"]
        assert half.uplink["labels"] == full.uplink["labels"]
    assert step_cost(Base(), bf16).xi_measured == 1.0
    assert step_cost(Base(), bf16, Channel("bfloat16"), Channel("bfloat16")).xi_measured == 1.0
    assert step_cost(Base(), f32, Channel("bfloat16"), Channel("bfloat16")).xi_measured < 0.51
    adc = step_cost(ADC(xi=0.1), bf16).xi_measured
    assert adc == pytest.approx(step_cost(ADC(xi=0.1), f32).xi_measured, rel=0.05)


# ---- The link ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_identity_link_delivers_the_true_gradient(adc_protocol, model, params, batch):
    """The gradient the client applies equals jax.grad of the end-to-end loss."""
    protocol = adc_protocol
    state = fresh_state(protocol, model, params)

    @jax.jit
    def received(state):
        payload, vjp = split.client_forward(protocol, state, batch)
        _, grad, _ = split.server_step(protocol, state.server, state.method_state, payload)
        return vjp(grad)[0]  # what client_backward applies

    client_grads = received(state)

    _, encode_key, _ = split.step_keys(state)

    def end_to_end(client_params):
        tokens, scores = model.apply_client(client_params["model"], batch["image"])
        sent = protocol.method.encode(
            {}, {}, tokens, scores, batch["label"], encode_key, num_classes=C
        )
        logits = model.apply_server(state.server.params["model"], sent.activations)
        return optax.softmax_cross_entropy(logits, sent.labels).mean()

    expected = jax.jit(jax.grad(end_to_end))(state.client.params)
    assert_trees_close(client_grads["model"], expected["model"], rtol=1e-4, atol=1e-7)


def test_awgn_noise_matches_the_drawn_snr():
    x = jax.random.normal(jax.random.key(4), (64, 50, 64)) * 3.0 + 1.0
    key = jax.random.key(5)
    received = awgn(x, key, 5.0, 15.0)
    snr_key, _ = jax.random.split(key)
    drawn = float(jax.random.uniform(snr_key, (), minval=5.0, maxval=15.0))
    measured = 10 * np.log10(np.mean(np.square(x)) / np.mean(np.square(received - x)))
    assert 5.0 <= drawn <= 15.0
    assert measured == pytest.approx(drawn, abs=0.05)  # 200k samples: ~0.01 dB of error


def test_awgn_on_the_downlink_matches_the_snr():
    g = jax.random.normal(jax.random.key(6), (32, 40, 64))
    down = Channel("awgn", snr_min_db=20.0, snr_max_db=20.0)
    _, vjp = jax.vjp(lambda x: link(x, jax.random.key(7), downlink=down), jnp.zeros_like(g))
    (received,) = vjp(g)
    measured = 10 * np.log10(np.mean(np.square(g)) / np.mean(np.square(received - g)))
    assert measured == pytest.approx(20.0, abs=0.05)


def test_quantised_links_reproduce_the_quantiser():
    x = jax.random.normal(jax.random.key(8), (8, 5, 6))
    g = jax.random.normal(jax.random.key(9), (8, 5, 6)) * 1e-3
    up, down = Channel("quantize", bits=4), Channel("quantize", bits=3)
    sent, vjp = jax.vjp(lambda v: link(v, jax.random.key(0), uplink=up, downlink=down), x)
    np.testing.assert_array_equal(sent, uniform_quantize(x, 4))
    np.testing.assert_array_equal(vjp(g)[0], uniform_quantize(g, 3))
    assert len(np.unique(np.asarray(sent))) <= 16
    assert float(sent.min()) == float(x.min()) and float(sent.max()) == float(x.max())


def test_step_needs_no_host_transfer_and_compiles_once(
    adc_protocol, adc_programs, model, params, batch
):
    programs = adc_programs
    state = fresh_state(adc_protocol, model, params)
    device_batch = jax.device_put(batch)
    state, _ = programs.split_step(state, device_batch)  # compile
    jax.block_until_ready(state)
    counts = [
        f._cache_size()
        for f in (programs.client_forward, programs.server_step, programs.client_backward)
    ]
    with jax.transfer_guard("disallow"):
        for _ in range(2):
            state, metrics = programs.split_step(state, device_batch)
        jax.block_until_ready(metrics)
    after = [
        f._cache_size()
        for f in (programs.client_forward, programs.server_step, programs.client_backward)
    ]
    assert after == counts
