"""The ViT's hand-written kernels (written for XLA on CPU) equal their textbook forms, values and
gradients: LayerNorm, exact GELU, attention, and the flattened Dense."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adc_jax import cpu_kernels, vit


def grads(fn, *args):
    """Value and the vjp of a random cotangent, for comparing two implementations."""
    out, vjp = jax.vjp(fn, *args)
    cot = jax.tree.map(lambda o: jax.random.normal(jax.random.key(9), o.shape, o.dtype), out)
    return out, vjp(cot)


def assert_close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_gelu_equals_jax_exact_gelu():
    x = jnp.linspace(-8.0, 8.0, 1001)
    ours = grads(vit.gelu, x)
    reference = grads(lambda x: jax.nn.gelu(x, approximate=False), x)
    assert_close(ours, reference, rtol=1e-5, atol=1e-6)


@pytest.fixture(params=["1", "0"], ids=["cpu_kernels", "xla"])
def kernels(request, monkeypatch):
    """Runs a test with adc_jax.cpu_kernels on (where this machine has them) and off."""
    monkeypatch.setenv(cpu_kernels.ENV_VAR, request.param)
    return request.param == "1" and cpu_kernels.status().startswith("openblas")


# 150 rows: more than one of the kernel's 64-row parts, the last one partial.
def test_layer_norm_equals_flax(kernels):
    x = 3 * jax.random.normal(jax.random.key(0), (3, 50, 16)) + 1.0
    scale = jax.random.normal(jax.random.key(1), (16,))
    bias = jax.random.normal(jax.random.key(2), (16,))

    def reference(x, scale, bias):  # nn.LayerNorm's formula
        return jax.nn.standardize(x, axis=-1, epsilon=vit.LN_EPS) * scale + bias

    layer_norm = jax.jit(lambda x, scale, bias: vit.layer_norm(x, scale, bias))
    lowered = jax.jit(lambda *a: grads(layer_norm, *a)).lower(x, scale, bias).as_text()
    assert (cpu_kernels.LAYER_NORM_TARGET in lowered) == kernels
    assert (cpu_kernels.LAYER_NORM_GRAD_TARGET in lowered) == kernels
    assert_close(grads(layer_norm, x, scale, bias), grads(reference, x, scale, bias))


def test_layer_norm_under_vmap(kernels):
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    scale = 1.0 + jax.random.normal(jax.random.key(1), (2, 16))  # batched parameters too
    bias = jax.random.normal(jax.random.key(2), (16,))
    batched = jax.jit(jax.vmap(vit.layer_norm, in_axes=(0, 0, None)))(x, scale, bias)
    assert_close(batched, jnp.stack([vit.layer_norm(x[i], scale[i], bias) for i in range(2)]))


def _softmax_attention(q, k, v):
    probs = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k), axis=-1)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs, v)
    return out, jax.lax.stop_gradient(probs[:, :, 0, :])


@pytest.mark.parametrize("num_queries", [9, 3, 1])  # all rows; the selected-rows form; CLS only
def test_attention_equals_softmax_einsum(num_queries, kernels):
    keys = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(keys[0], (2, 3, num_queries, 8))
    k, v = (2 * jax.random.normal(key, (2, 3, 9, 8)) for key in keys[1:])

    # A new function per switch: the switch is read when a function is traced, and jit caches
    # traces by function.
    attention = jax.jit(lambda q, k, v: vit.attention(q, k, v))
    (out, first), g = grads(attention, q, k, v)
    (ref_out, ref_first), ref_g = grads(_softmax_attention, q, k, v)
    lowered = attention.lower(q, k, v).as_text()
    assert (cpu_kernels.ATTENTION_TARGET in lowered) == kernels
    assert_close(out, ref_out)
    assert_close(first, ref_first)
    np.testing.assert_allclose(first.sum(-1), 1.0, rtol=1e-6)
    assert_close(g, ref_g, rtol=1e-4, atol=1e-5)


# The kernel's register tiles are 6 rows by 64 columns (AVX-512; 16 elsewhere), whole vectors of
# 16 (8) columns, or a zero-padded remainder: n = 70 is one whole tile of keys and a remainder,
# head width 64 one whole tile, 24 a vector and a remainder.
@pytest.mark.parametrize("n,hd", [(9, 16), (70, 64), (13, 24)])
def test_fused_attention_reads_heads_from_qkv(n, hd):
    if not cpu_kernels.status().startswith("openblas"):  # only the kernels have this path
        pytest.skip(f"cpu_kernels unavailable here: {cpu_kernels.status()}")
    b, h = 2, 3
    qkv = 2 * jax.random.normal(jax.random.key(6), (b, n, 3 * h * hd))

    def reference(qkv):
        q, k, v = (
            part.reshape(b, n, h, hd).transpose(0, 2, 1, 3) for part in jnp.split(qkv, 3, axis=2)
        )
        out, first = _softmax_attention(q * hd**-0.5, k, v)
        return out.transpose(0, 2, 1, 3).reshape(b, n, h * hd), first

    ours = grads(jax.jit(vit.fused_attention, static_argnums=1), qkv, h)
    theirs = grads(reference, qkv)
    assert_close(ours[0], theirs[0], atol=2e-5)  # outputs up to ~8: both ~1e-6 relative to that
    assert_close(ours[1][0], theirs[1][0], rtol=1e-4, atol=2e-5)


def test_select_attention_equals_softmax_einsum(kernels):
    # ADC's last client block: queries of 5 rows against keys and values of 70 (a whole tile and
    # a remainder), heads side by side.
    b, n, big_n, h, hd = 2, 5, 70, 3, 16
    q = jax.random.normal(jax.random.key(10), (b, n, h * hd))
    kv = 2 * jax.random.normal(jax.random.key(11), (b, big_n, 2 * h * hd))

    def reference(q, kv):
        def heads(x):
            return x.reshape(b, -1, h, hd).transpose(0, 2, 1, 3)

        out, first = _softmax_attention(*map(heads, (q, *jnp.split(kv, 2, axis=2))))
        return out.transpose(0, 2, 1, 3).reshape(b, n, h * hd), first

    select_attention = jax.jit(lambda q, kv: vit.select_attention(q, kv, h))
    lowered = select_attention.lower(q, kv).as_text()
    assert (cpu_kernels.ATTENTION_SELECT_TARGET in lowered) == kernels
    assert_close(grads(select_attention, q, kv), grads(reference, q, kv), rtol=1e-4, atol=2e-5)


def test_model_gradients_with_and_without_cpu_kernels(monkeypatch):
    """A whole split model's loss and gradients agree with the kernels on and off."""
    model = vit.make_model("vit_test_patch4_16", split_index=2, num_classes=10)
    params = model.init(jax.random.key(7))
    images = jax.random.normal(jax.random.key(8), (4, 16, 16, 3))

    def loss(params):
        return jnp.sum(jnp.sin(model.apply_full(params, images)))

    results = {}
    for switch in ("1", "0"):
        monkeypatch.setenv(cpu_kernels.ENV_VAR, switch)
        results[switch] = jax.jit(jax.value_and_grad(loss))(params)
    assert_close(results["1"], results["0"], rtol=1e-4, atol=1e-6)


def test_dense_equals_flax_dense():
    x = jax.random.normal(jax.random.key(4), (2, 5, 6))
    params = vit.Dense(4).init(jax.random.key(5), x)
    ours = grads(lambda p, x: vit.Dense(4).apply(p, x), params, x)
    reference = grads(lambda p, x: vit.nn.Dense(4).apply(p, x), params, x)
    assert_close(ours, reference)


def test_bfloat16_gradients_keep_the_input_dtype():
    """A bfloat16 model's gradients (what the server sends back) stay bfloat16."""
    model = vit.make_model("vit_test_patch4_16", split_index=2, dtype=jnp.bfloat16)
    params = model.init(jax.random.key(6))
    tokens = jnp.ones((2, 17, 32), jnp.bfloat16)
    grad = jax.grad(lambda t: model.apply_server(params["server"], t).sum())(tokens)
    assert grad.dtype == jnp.bfloat16
