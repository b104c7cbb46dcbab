"""The ViT's hand-written kernels (written for XLA on CPU) equal their textbook forms, values and
gradients: LayerNorm, exact GELU, attention, and the flattened Dense."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adc_jax import vit


def grads(fn, *args):
    """Value and the vjp of a random cotangent, for comparing two implementations."""
    out, vjp = jax.vjp(fn, *args)
    cot = jax.tree.map(lambda o: jax.random.normal(jax.random.key(9), o.shape, o.dtype), out)
    return out, vjp(cot)


def assert_close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_layer_norm_equals_flax():
    x = 3 * jax.random.normal(jax.random.key(0), (4, 7, 16)) + 1.0
    scale = jax.random.normal(jax.random.key(1), (16,))
    bias = jax.random.normal(jax.random.key(2), (16,))

    def reference(x, scale, bias):  # nn.LayerNorm's formula
        return jax.nn.standardize(x, axis=-1, epsilon=vit.LN_EPS) * scale + bias

    assert_close(grads(vit.layer_norm, x, scale, bias), grads(reference, x, scale, bias))


def test_gelu_equals_jax_exact_gelu():
    x = jnp.linspace(-8.0, 8.0, 1001)
    ours = grads(vit.gelu, x)
    reference = grads(lambda x: jax.nn.gelu(x, approximate=False), x)
    assert_close(ours, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_queries", [9, 3])  # all rows; the selected-rows form
def test_attention_equals_softmax_einsum(num_queries):
    keys = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(keys[0], (2, 3, num_queries, 8))
    k, v = (2 * jax.random.normal(key, (2, 3, 9, 8)) for key in keys[1:])

    def reference(q, k, v):
        probs = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k), axis=-1)
        out = jnp.einsum("bhqk,bhkd->bhqd", probs, v)
        return out, jax.lax.stop_gradient(probs[:, :, 0, :])

    (out, first), g = grads(vit.attention, q, k, v)
    (ref_out, ref_first), ref_g = grads(reference, q, k, v)
    assert_close(out, ref_out)
    assert_close(first, ref_first)
    np.testing.assert_allclose(first.sum(-1), 1.0, rtol=1e-6)
    assert_close(g, ref_g, rtol=1e-4, atol=1e-5)


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
