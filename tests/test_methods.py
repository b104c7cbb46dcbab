"""The baseline methods (docs/method.md §4) behind the method interface: what each sends, how the
server reads it, what comes back, what it costs in bytes, and two steps of the real protocol each.

Every new shape is an XLA compilation, so the tests share one cut (B = 8, N = 5, D = 8, C = 10)
and one jitted encode → decode per method.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adc_jax import split
from adc_jax.defaults import default_config
from adc_jax.methods import (
    ADC,
    C3SL,
    METHODS,
    BottleNet,
    CutShape,
    FedLite,
    Method,
    Quantize,
    RandTopK,
    TopK,
    make_method,
    method_from_config,
    payload_shapes,
    step_cost,
)
from adc_jax.methods.c3sl import circular_conv, circular_corr, make_keys
from adc_jax.methods.fedlite import reconstruct
from adc_jax.methods.topk import DenseShape

B, N, D, C = 8, 5, 8, 10
CUT = CutShape(B, N, D, C)
SIZE = N * D

# One instance per method, with options that fit the shared cut.
METHOD_CASES = {
    "base": Method(),
    "c3sl": C3SL(ratio=4),
    "bottlenet": BottleNet(compression=0.5),
    "topk": TopK(rate=0.25),
    "randtopk": RandTopK(rate=0.25, alpha=0.1),
    "quantize": Quantize(bits=4),
    "fedlite": FedLite(num_subvectors=8, num_centroids=4, num_groups=2, correction=0.5),
}


def tokens_of(seed=0, batch=B):
    return jax.random.normal(jax.random.key(seed), (batch, N, D), jnp.float32)


LABELS = jnp.arange(B) % C
_make_keys = jax.jit(make_keys, static_argnums=(1, 2, 3))


@functools.cache
def jitted(method):
    """``(init, encode, decode)`` of ``method`` on the shared cut, jitted once per method."""

    @jax.jit
    def init(key):
        return method.init(key, CUT)

    @jax.jit
    def encode(params, state, tokens, labels, key):
        return method.encode(params, state, tokens, None, labels, key, num_classes=C)

    @jax.jit
    def decode(params, state, payload):
        return method.decode(params, state, payload)

    return init, encode, decode


def roundtrip(method, tokens, key=0):
    init, encode, decode = jitted(method)
    params, state = init(jax.random.key(100))
    payload = encode(params["client"], state, tokens, LABELS, jax.random.key(key))
    return payload, decode(params["server"], state, payload), params, state


def encode_vjp(method, tokens, cotangent, key=0):
    """``(activations, gradient w.r.t. tokens)`` for a cotangent on the payload's activations."""
    init, encode, _ = jitted(method)
    params, state = init(jax.random.key(100))
    out, vjp = jax.vjp(
        lambda t: encode(params["client"], state, t, LABELS, jax.random.key(key)).activations,
        tokens,
    )
    return out, vjp(cotangent)[0]


# ---- Registry and configs ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["c3sl", "bottlenet", "topk", "randtopk", "quantize", "fedlite"])
def test_registry_builds_every_method_from_the_default_config(name):
    cfg = default_config().method
    cfg.name = name
    method = method_from_config(cfg)
    assert type(method) is METHODS[name] and method.name == name
    expected = {
        "c3sl": {"ratio": cfg.ratio},
        "bottlenet": {"compression": cfg.compression, "relu_output": cfg.relu_output},
        "topk": {"rate": cfg.rate},
        "randtopk": {"rate": cfg.rate, "alpha": cfg.alpha},
        "quantize": {"bits": cfg.bits},
        "fedlite": {
            "num_subvectors": cfg.num_subvectors,
            "num_centroids": cfg.num_centroids,
            "num_groups": cfg.num_groups,
            "correction": cfg.correction,
        },
    }[name]
    assert {k: getattr(method, k) for k in expected} == expected
    hash(method)  # a static argument of jit
    with pytest.raises(ValueError, match="Bad options"):
        make_method(name, no_such_option=1)


# ---- Compute dtype -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*METHOD_CASES, "adc"])
def test_payload_keeps_the_tokens_dtype_and_bytes_follow_it(name):
    """Under mixed precision each method sends its activations (and gets the gradient) in the
    tokens' dtype; values in that dtype cost half as much in bfloat16 as in float32."""
    method = METHOD_CASES.get(name, ADC(xi=0.25))
    half = dataclasses.replace(CUT, dtype=jnp.bfloat16)
    assert payload_shapes(method, half).activations.dtype == jnp.bfloat16
    assert payload_shapes(method, CUT).activations.dtype == jnp.float32
    full_cost, half_cost = step_cost(method, CUT), step_cost(method, half)
    ratio = 1 if name == "quantize" else 2  # n-bit codes whatever the dtype
    assert full_cost.downlink["gradient"] == ratio * half_cost.downlink["gradient"]
    if "activations" in full_cost.uplink:  # FedLite sends a codebook and codes instead
        assert full_cost.uplink["activations"] == ratio * half_cost.uplink["activations"]


# ---- C3-SL -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_c3sl_ratio_one_decodes_exactly():
    x = tokens_of(1)
    payload, decoded, _, _ = roundtrip(C3SL(ratio=1), x)
    assert payload.activations.shape == (B, N, D)
    # Unitary keys: correlation inverts convolution; only the FFTs' float rounding is left.
    np.testing.assert_allclose(decoded, x, rtol=0, atol=2e-5)
    # The reference's Gaussian keys do not invert: the key's autocorrelation blurs even R = 1.
    _, blurred, _, _ = roundtrip(C3SL(ratio=1, key_kind="gaussian"), x)
    assert float(jnp.max(jnp.abs(blurred - x))) > 0.1


def test_c3sl_superposes_groups_and_keeps_every_label():
    x = tokens_of(2)
    method = METHOD_CASES["c3sl"]
    payload, decoded, _, state = roundtrip(method, x)
    assert payload.activations.shape == (B // 4, N, D) and payload.activations.dtype == jnp.float32
    np.testing.assert_array_equal(payload.labels, LABELS)
    assert payload.labels.dtype == jnp.uint8 and payload.side == {}
    assert decoded.shape == (B, N, D)
    # Group g is Σ_r k_r ⊛ x_{4g+r}, computed here without FFTs.
    keys = np.asarray(state["keys"], np.float64)
    flat = np.asarray(x, np.float64).reshape(B // 4, 4, SIZE)
    circulant = keys[:, (np.arange(SIZE)[:, None] - np.arange(SIZE)[None, :]) % SIZE]  # k[i-j]
    direct = np.einsum("rij,grj->gi", circulant, flat)
    np.testing.assert_allclose(payload.activations.reshape(B // 4, SIZE), direct, atol=1e-5)
    # Decoding applies each key's transposed circulant (correlation): every sample comes back
    # with the other members' cross-talk on top.
    sent = np.asarray(payload.activations, np.float64).reshape(B // 4, SIZE)
    read = np.einsum("rji,gj->gri", circulant, sent)
    np.testing.assert_allclose(decoded.reshape(B // 4, 4, SIZE), read, atol=1e-5)


@pytest.mark.slow
def test_c3sl_correlation_is_the_adjoint_of_convolution():
    @jax.jit
    def check(keys, x, y):
        conv, vjp = jax.vjp(functools.partial(circular_conv, keys), x)
        corr = circular_corr(keys, y)
        return jnp.vdot(conv, y), jnp.vdot(x, corr), vjp(y)[0], corr

    x, y = tokens_of(20, batch=6).reshape(2, 3, SIZE), tokens_of(21, batch=2).reshape(2, SIZE)
    for kind in ("unitary", "gaussian"):
        lhs, rhs, pulled_back, corr = check(_make_keys(jax.random.key(3), 3, SIZE, kind), x, y)
        np.testing.assert_allclose(lhs, rhs, rtol=1e-5)  # ⟨k ⊛ x, y⟩ = ⟨x, k ⋆ y⟩
        # So the gradient the client gets through its encoder is the correlation itself.
        np.testing.assert_allclose(pulled_back, corr, atol=1e-5)


@pytest.mark.parametrize("kind", ["unitary", "gaussian"])
@pytest.mark.parametrize("size", [SIZE, 35])  # even and odd lengths (Nyquist bin or none)
def test_c3sl_keys_are_unit_norm_and_fixed_by_the_seed(kind, size):
    keys = _make_keys(jax.random.key(7), 4, size, kind)
    assert keys.shape == (4, size) and keys.dtype == jnp.float32
    keys = np.asarray(keys, np.float64)
    np.testing.assert_allclose(np.linalg.norm(keys, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(keys, _make_keys(jax.random.key(7), 4, size, kind))
    assert not np.allclose(keys, _make_keys(jax.random.key(8), 4, size, kind))
    assert len({tuple(np.round(k, 6)) for k in keys}) == 4  # distinct keys
    if kind == "unitary":  # flat spectrum: |FFT(k)| = 1 at every frequency
        np.testing.assert_allclose(np.abs(np.fft.fft(keys, axis=-1)), 1.0, atol=1e-5)


def test_method_state_survives_an_orbax_checkpoint(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    _, _, _, c3sl_state = roundtrip(METHOD_CASES["c3sl"], tokens_of())
    _, _, _, topk_state = roundtrip(METHOD_CASES["topk"], tokens_of())
    state = {"c3sl": c3sl_state, "topk": topk_state}
    # As adc_jax.train.Checkpoints saves and restores the train state.
    manager = ocp.CheckpointManager(str(tmp_path))
    manager.save(3, args=ocp.args.StandardSave(jax.device_get(state)))
    manager.wait_until_finished()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored = manager.restore(3, args=ocp.args.StandardRestore(abstract))
    restored = jax.tree.unflatten(jax.tree.structure(state), jax.tree.leaves(restored))
    manager.close()
    np.testing.assert_array_equal(restored["c3sl"]["keys"], c3sl_state["keys"])
    assert restored["topk"] == DenseShape(N, D)
    # A re-init from the same key draws the same keys too.
    init, _, _ = jitted(METHOD_CASES["c3sl"])
    np.testing.assert_array_equal(init(jax.random.key(100))[1]["keys"], c3sl_state["keys"])


def test_c3sl_batch_not_divisible_by_ratio_is_a_clear_error():
    method = C3SL(ratio=3)
    with pytest.raises(ValueError, match=r"Batch size \(8\) must be divisible by C3-SL's ratio R"):
        method.validate(CUT)
    with pytest.raises(ValueError, match="multiple of 3"):
        method.init(jax.random.key(0), CUT)
    _, state = C3SL(ratio=3).init(jax.random.key(0), CutShape(9, N, D, C))
    with pytest.raises(ValueError, match="divisible"):
        method.encode({}, state, tokens_of(), None, LABELS, jax.random.key(0), num_classes=C)
    with pytest.raises(ValueError, match="positive"):
        C3SL(ratio=0).validate(CUT)


# ---- BottleNet++ -------------------------------------------------------------------------------


@pytest.mark.slow
def test_bottlenet_widths_and_parameters():
    method = METHOD_CASES["bottlenet"]
    assert method.widths(D) == (6, 4)  # D′ = round(0.5·8) = 4, h = round((8 + 4)/2) = 6
    assert BottleNet(compression=0.1).widths(192) == (106, 19)  # 19.2 → 19, 105.5 → 106
    assert BottleNet(compression=0.01).widths(8) == (5, 1)  # D′ is at least 1
    payload, decoded, params, _ = roundtrip(method, tokens_of(3))
    shapes = jax.tree.map(jnp.shape, params)
    assert shapes["client"] == {
        "fc1": {"kernel": (8, 6), "bias": (6,)},
        "fc2": {"kernel": (6, 4), "bias": (4,)},
    }
    assert shapes["server"] == {
        "fc1": {"kernel": (4, 6), "bias": (6,)},
        "fc2": {"kernel": (6, 8), "bias": (8,)},
    }
    assert payload.activations.shape == (B, N, 4) and decoded.shape == (B, N, D)
    assert method.xi_paper(CUT) == 0.5
    with pytest.raises(ValueError, match="compression"):
        BottleNet(compression=1.5).validate(CUT)


@pytest.mark.parametrize("relu_output", [False, True])
def test_bottlenet_output_variants_and_evaluation(relu_output):
    method = BottleNet(compression=0.5, relu_output=relu_output)
    assert method.active_at_eval
    x = tokens_of(4)
    payload, decoded, params, state = roundtrip(method, x)
    if relu_output:
        assert float(decoded.min()) >= 0.0
    else:
        assert float(decoded.min()) < 0.0  # a linear output keeps the residual stream's sign

    @jax.jit
    def evaluate(params):
        return method.eval_tokens(params["client"], params["server"], state, x)

    np.testing.assert_allclose(evaluate(params), decoded, atol=1e-6)
    # Trained jointly: the loss reaches both halves.
    grads = jax.jit(jax.grad(lambda p: jnp.sum(evaluate(p) ** 2)))(params)
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))


# ---- Top-K and Random Top-K --------------------------------------------------------------------

KK = 10  # round(0.25 · 40)


def kept_mask(indices):
    mask = np.zeros((indices.shape[0], SIZE), bool)
    np.put_along_axis(mask, np.asarray(indices), True, axis=1)
    return mask


def test_topk_keeps_exactly_the_largest_magnitudes():
    x = tokens_of(5)
    payload, decoded, _, _ = roundtrip(METHOD_CASES["topk"], x)
    assert payload.activations.shape == (B, KK) and payload.side["indices"].shape == (B, KK)
    assert payload.side["indices"].dtype == jnp.int32
    flat, dense = np.asarray(x).reshape(B, SIZE), np.asarray(decoded).reshape(B, SIZE)
    assert ((dense != 0).sum(axis=1) == KK).all()
    largest = np.argsort(-np.abs(flat), axis=1)[:, :KK]
    np.testing.assert_array_equal(dense != 0, kept_mask(largest))
    np.testing.assert_array_equal(dense[dense != 0], flat[dense != 0])  # values exact


@pytest.mark.parametrize("name", ["topk", "randtopk"])
def test_sparsified_gradient_lives_on_the_kept_support(name):
    method = METHOD_CASES[name]
    x, weight = tokens_of(6), tokens_of(7)
    init, encode, decode = jitted(method)
    params, state = init(jax.random.key(100))

    def loss(t):
        payload = encode(params["client"], state, t, LABELS, jax.random.key(1))
        return jnp.sum(decode(params["server"], state, payload) * weight)

    grad = np.asarray(jax.grad(loss)(x)).reshape(B, SIZE)
    payload, _, _, _ = roundtrip(method, x, key=1)
    mask = kept_mask(payload.side["indices"])
    np.testing.assert_array_equal(grad[mask], np.asarray(weight).reshape(B, SIZE)[mask])
    assert (grad[~mask] == 0).all()


def test_randtopk_draws_distinct_entries_deterministically():
    method, x = METHOD_CASES["randtopk"], tokens_of(8)
    first, decoded, _, _ = roundtrip(method, x, key=1)
    again, _, _, _ = roundtrip(method, x, key=1)
    other, _, _, _ = roundtrip(method, x, key=2)
    indices = np.asarray(first.side["indices"])
    assert all(len(set(row)) == KK for row in indices)
    assert ((np.asarray(decoded).reshape(B, SIZE) != 0).sum(1) == KK).all()
    np.testing.assert_array_equal(indices, again.side["indices"])
    assert not np.array_equal(indices, other.side["indices"])
    # Samples draw with their own keys, not one pattern for the batch.
    assert len({tuple(sorted(row)) for row in indices}) > 1
    # alpha = 0 puts no mass outside the top kk: plain Top-K.
    top, _, _, _ = roundtrip(METHOD_CASES["topk"], x)
    zero, _, _, _ = roundtrip(RandTopK(rate=0.25, alpha=0.0), x, key=1)
    np.testing.assert_array_equal(kept_mask(zero.side["indices"]), kept_mask(top.side["indices"]))


def test_randtopk_inclusion_frequencies_follow_the_weights():
    alpha, draws = 0.3, 4000
    method = RandTopK(rate=0.25, alpha=alpha)
    x = jnp.broadcast_to(tokens_of(9, batch=1), (draws, N, D))  # one sample, 4000 draws
    payload = jax.jit(
        lambda t, k: method.encode({}, None, t, None, jnp.zeros(draws, jnp.int32), k, num_classes=C)
    )(x, jax.random.key(5))
    indices = np.asarray(payload.side["indices"])
    top = set(np.argsort(-np.abs(np.asarray(x[0]).ravel()))[:KK].tolist())
    is_top = np.isin(indices, list(top))
    # The first draw follows the weights exactly: P(outside the top kk) = alpha.
    assert abs((~is_top[:, 0]).mean() - alpha) < 0.03
    # All kk draws: the law of sequential weighted sampling without replacement (NumPy's).
    weights = np.where(np.isin(np.arange(SIZE), list(top)), (1 - alpha) / KK, alpha / (SIZE - KK))
    rng = np.random.default_rng(0)
    reference = [
        np.isin(rng.choice(SIZE, KK, replace=False, p=weights), list(top)).sum()
        for _ in range(draws)
    ]
    assert abs(is_top.sum(1).mean() - np.mean(reference)) < 0.1
    # Within each class every entry is equally likely.
    counts = kept_mask(indices).mean(0)
    rest = np.array([i not in top for i in range(SIZE)])
    assert counts[rest].max() - counts[rest].min() < 0.06
    assert counts[~rest].max() - counts[~rest].min() < 0.06


# ---- Quantisation ------------------------------------------------------------------------------


def test_quantize_levels_endpoints_and_gradient_range():
    method = METHOD_CASES["quantize"]  # 4 bits: 16 levels
    x = tokens_of(10)
    g = 1e-3 * tokens_of(11) + 5.0  # a range unrelated to the activations'
    sent, back = encode_vjp(method, x, g)
    for original, quantised in ((x, sent), (g, back)):
        values = np.unique(np.asarray(quantised))
        assert len(values) <= 16
        assert values[0] == float(original.min()) and values[-1] == float(original.max())
        step = float(original.max() - original.min()) / 15
        assert float(jnp.max(jnp.abs(quantised - original))) <= step / 2 * (1 + 1e-5)
    assert len(np.unique(np.asarray(back))) > 8  # quantised with its own range, not x's


def test_quantize_constant_tensors_stay_finite():
    method = METHOD_CASES["quantize"]
    x = jnp.full((B, N, D), 0.25)
    sent, back = encode_vjp(method, x, jnp.zeros((B, N, D)))
    np.testing.assert_array_equal(sent, x)
    np.testing.assert_array_equal(back, 0.0)
    with pytest.raises(ValueError, match="bits"):
        Quantize(bits=0).validate(CUT)


# ---- FedLite -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_fedlite_codebook_and_codes_reproduce_the_payload():
    method = METHOD_CASES["fedlite"]  # q = 8 sub-vectors of d = 5, R = 2 groups, L = 4
    x = tokens_of(12)
    payload, decoded, _, _ = roundtrip(method, x)
    codebook, codes = payload.side["codebook"], payload.side["codes"]
    assert codebook.shape == (2, 4, 5) and codebook.dtype == jnp.float32
    assert codes.shape == (B, 8) and codes.dtype == jnp.uint8 and int(codes.max()) < 4
    np.testing.assert_array_equal(payload.activations, reconstruct(codebook, codes, N, D))
    np.testing.assert_array_equal(decoded, payload.activations)
    # Positions 0-3 form group 0 and 4-7 group 1; each centroid is its members' mean.
    sub = np.asarray(x).reshape(B, 8, 5)
    for group in range(2):
        members = sub[:, 4 * group : 4 * group + 4].reshape(-1, 5)
        assignment = np.asarray(codes[:, 4 * group : 4 * group + 4]).ravel()
        for centroid in range(4):
            np.testing.assert_allclose(
                codebook[group, centroid], members[assignment == centroid].mean(0), atol=1e-5
            )


def test_fedlite_backward_adds_the_correction():
    method = METHOD_CASES["fedlite"]  # λ = 0.5, large enough to see
    x, g = tokens_of(13), tokens_of(14)
    x_tilde, back = encode_vjp(method, x, g)
    np.testing.assert_allclose(back, g + 0.5 * (x - x_tilde), atol=1e-6)
    assert float(jnp.abs(x - x_tilde).max()) > 0.1  # the correction is not trivially zero


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_subvectors": 7}, "must divide the flattened activation size"),
        ({"num_subvectors": 8, "num_groups": 3}, "must divide num_subvectors"),
        ({"num_subvectors": 8, "num_groups": 2, "num_centroids": 33}, r"B·q/R = 8·8/2 = 32"),
    ],
)
def test_fedlite_rejects_shapes_it_cannot_split(options, message):
    with pytest.raises(ValueError, match=message):
        FedLite(**options).validate(CUT)


# ---- Accounting ------------------------------------------------------------------------------

DENSE = B * N * D * 4  # float32 activations of the whole batch: 1280 bytes
LABEL_BYTES = B  # uint8 class indices for C = 10


def expected_cost(name):
    """``(uplink parts, downlink parts, ξ_paper)`` worked out by hand for the shared cut."""
    if name == "base":
        return {"activations": DENSE, "labels": B}, {"gradient": DENSE}, 1.0
    if name == "c3sl":  # B/R = 2 superposed samples of N·D floats each way
        return {"activations": 2 * SIZE * 4, "labels": B}, {"gradient": 2 * SIZE * 4}, 0.25
    if name == "bottlenet":  # D′ = 4 floats per token each way
        return {"activations": B * N * 4 * 4, "labels": B}, {"gradient": B * N * 4 * 4}, 0.5
    if name in ("topk", "randtopk"):  # kk = 10 float values + int32 indices up, values down
        xi = 0.5 * (0.25 * (1 + math.ceil(math.log2(B * SIZE)) / 32) + 0.25)
        up = {"activations": B * KK * 4, "indices": B * KK * 4, "labels": B}
        return up, {"gradient": B * KK * 4}, xi
    if name == "quantize":  # 4 bits per value + two float32 range ends, each way
        values = B * SIZE * 4 // 8
        return (
            {"activations": values, "range": 8, "labels": B},
            {"gradient": values, "range": 8},
            4 / 32,
        )
    if name == "fedlite":  # R·L·d float32 codebook + B·q uint8 codes up, dense gradient down
        codebook, codes = 2 * 4 * 5 * 4, B * 8
        xi_up = (2 * 4 * 5 * 32 + B * 8 * 2) / (32 * B * SIZE)  # codes at ⌈log₂ 4⌉ = 2 bits
        return (
            {"codebook": codebook, "codes": codes, "labels": B},
            {"gradient": DENSE},
            (0.5 * (xi_up + 1)),
        )
    raise AssertionError(name)


@pytest.mark.parametrize("name", list(METHOD_CASES))
def test_step_cost_matches_the_closed_form(name):
    cost = step_cost(METHOD_CASES[name], CUT)
    uplink, downlink, xi = expected_cost(name)
    assert cost.uplink == uplink
    assert cost.downlink == downlink
    assert cost.xi_paper == pytest.approx(xi)
    assert cost.dense_uplink == DENSE + LABEL_BYTES and cost.dense_downlink == DENSE
    expected = 0.5 * (sum(uplink.values()) / (DENSE + B) + sum(downlink.values()) / DENSE)
    assert cost.xi_measured == pytest.approx(expected)
    doubled = step_cost(METHOD_CASES[name], CUT, clients=2)
    assert doubled.bytes_up == 2 * cost.bytes_up and doubled.xi_measured == cost.xi_measured


def test_fedlite_codes_widen_with_many_centroids():
    cut = CutShape(64, N, D, C)  # 64·8 = 512 sub-vectors: room for L = 300 centroids
    cost = step_cost(FedLite(num_subvectors=8, num_centroids=300), cut)
    assert cost.uplink == {"codebook": 300 * 5 * 4, "codes": 64 * 8 * 2, "labels": 64}


def test_quantize_counts_odd_bit_widths_in_whole_bytes():
    cost = step_cost(Quantize(bits=3), CutShape(3, N, D, 300))  # 120 values · 3 bits = 45 bytes
    assert cost.uplink == {"activations": 45, "range": 8, "labels": 3 * 2}
    assert cost.downlink == {"gradient": 45, "range": 8}


# ---- Device-parallel encoding ----------------------------------------------------------------

# The methods whose encoding couples samples (a shared range, a shared codebook) or depends on
# a sample's place in the batch (its key).
PMAP_CASES = {
    "randtopk": RandTopK(rate=0.25, alpha=0.3),
    "quantize": Quantize(bits=3),
    "fedlite": FedLite(num_subvectors=8, num_centroids=4, num_groups=2, correction=0.5),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PMAP_CASES))
def test_one_client_over_devices_encodes_as_on_one_device(name):
    """Under a named axis the payload and the client's gradient equal the one-device ones."""
    method, devices = PMAP_CASES[name], 4
    params, state = method.init(jax.random.key(100), CUT)
    x = tokens_of(15)

    def run(tokens, labels, axis_name):
        def enc(t):
            payload = method.encode(
                params["client"],
                state,
                t,
                None,
                labels,
                jax.random.key(3),
                num_classes=C,
                axis_name=axis_name,
            )
            return payload.activations, payload

        acts, vjp, payload = jax.vjp(enc, tokens, has_aux=True)
        # A cotangent that depends on the global row, so both runs send the same gradient.
        first = 0 if axis_name is None else jax.lax.axis_index(axis_name) * acts.shape[0]
        rows = (first + jnp.arange(acts.shape[0])).reshape(-1, *([1] * (acts.ndim - 1)))
        cotangent = jnp.sin(
            1.3 * rows + jnp.arange(math.prod(acts.shape[1:])).reshape(acts.shape[1:])
        )
        return payload, vjp(cotangent)[0]

    single, single_grad = jax.jit(lambda t, y: run(t, y, None))(x, LABELS)
    split_in = lambda v: v.reshape(devices, B // devices, *v.shape[1:])
    many, many_grad = jax.pmap(
        lambda t, y: run(t, y, "data"), axis_name="data", devices=jax.devices()[:devices]
    )(split_in(x), split_in(LABELS))
    merge = lambda v: np.asarray(v).reshape(-1, *v.shape[2:])
    np.testing.assert_allclose(merge(many.activations), single.activations, atol=1e-6)
    np.testing.assert_allclose(merge(many_grad), single_grad, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(merge(many.labels), single.labels)
    for key, value in single.side.items():
        if key == "codebook":  # the whole client's codebook, on every device
            for device in range(devices):
                np.testing.assert_array_equal(many.side[key][device], value)
        else:
            np.testing.assert_array_equal(merge(many.side[key]), value)


# ---- The real protocol -----------------------------------------------------------------------

IN_FEATURES = 3


def client_apply(params, images):
    """Toy client: ``images [B, N, 3]`` → ``tokens [B, N, D]``, softmax ``scores [B, N]``."""
    tokens = jnp.tanh(images @ params["w"] + params["b"])
    return tokens, jax.nn.softmax(tokens[..., 0], axis=-1)


def server_apply(params, tokens):
    """Toy server: mean token → logits ``[M, C]``."""
    return jnp.tanh(tokens @ params["w1"]).mean(axis=1) @ params["w2"]


def toy_params(key):
    k1, k2, k3 = jax.random.split(key, 3)
    client = {"w": jax.random.normal(k1, (IN_FEATURES, D)), "b": jnp.zeros(D)}
    server = {"w1": jax.random.normal(k2, (D, D)) / 3, "w2": jax.random.normal(k3, (D, C)) / 3}
    return client, server


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in METHOD_CASES if n != "base"])
def test_two_steps_of_the_protocol_split_and_fused(name):
    method = METHOD_CASES[name]
    tx = optax.adam(1e-2)
    protocol = split.Protocol(client_apply, server_apply, method, C, tx, tx)
    programs = split.jit_programs(protocol)
    client, server = toy_params(jax.random.key(0))
    images = jax.random.normal(jax.random.key(1), (B, N, IN_FEATURES))
    batch = {"image": images, "label": LABELS.astype(jnp.int32)}

    def fresh():  # each path gets its own buffers (the steps donate their inputs)
        copy = lambda tree: jax.tree.map(jnp.copy, tree)
        return split.init_state(protocol, jax.random.key(2), copy(client), copy(server), CUT)

    results = {}
    for path in ("split_step", "fused_step"):
        state, losses = fresh(), []
        for _ in range(2):
            state, metrics = getattr(programs, path)(state, batch)
            losses.append(float(metrics["loss"]))
        assert np.isfinite(losses).all(), (path, losses)
        assert int(state.step) == 2
        results[path] = state
    split_params = jax.tree.leaves(
        (results["split_step"].client.params, results["split_step"].server.params)
    )
    fused_params = jax.tree.leaves(
        (results["fused_step"].client.params, results["fused_step"].server.params)
    )
    for a, b in zip(split_params, fused_params, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # The client really trained: its parameters moved.
    assert not np.allclose(results["fused_step"].client.params["model"]["w"], client["w"])
    if method.active_at_eval:  # BottleNet++: evaluation runs encoder → decoder
        evaluation = programs.evaluate(results["fused_step"], {**batch, "mask": jnp.ones(B, bool)})
        assert int(evaluation["count"]) == B
