"""adc_jax.cpu_kernels: the OpenBLAS products XLA's CPU backend calls (issue #8)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adc_jax import cpu_kernels

TRANS = list(itertools.product((False, True), repeat=2))
# Reasons the kernel may be off on a machine without failing anything: the fallback is XLA's.
ACCEPTED_OFF = ("no C++ compiler", "numpy carries no OpenBLAS")


@pytest.fixture(scope="module")
def kernel_on():
    """Skips where the machine cannot have the kernel; fails where it should and does not."""
    status = cpu_kernels.status()
    if any(reason in status for reason in ACCEPTED_OFF):
        pytest.skip(f"cpu_kernels unavailable here: {status}")
    assert status.startswith("openblas"), status


def _operands(shape_a, shape_b, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.standard_normal(shape_a).astype(dtype)),
        jnp.asarray(rng.standard_normal(shape_b).astype(dtype)),
    )


def _shapes(batch, m, n, k, trans_a, trans_b):
    return (*batch, *((k, m) if trans_a else (m, k))), (*batch, *((n, k) if trans_b else (k, n)))


def _reference(a, b, trans_a, trans_b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a = np.swapaxes(a, -1, -2) if trans_a else a
    b = np.swapaxes(b, -1, -2) if trans_b else b
    return a @ b


def _lowered(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


@pytest.mark.parametrize("trans_a,trans_b", TRANS)
@pytest.mark.parametrize("batch", [(), (2, 3)])
def test_products_match_float64(kernel_on, batch, trans_a, trans_b):
    # Odd sizes, and m = 37 rows cut into row blocks (one product) or items in runs (a batch).
    a, b = _operands(*_shapes(batch, 37, 29, 53, trans_a, trans_b))
    out = jax.jit(lambda a, b: cpu_kernels.matmul(a, b, trans_a=trans_a, trans_b=trans_b))(a, b)
    assert out.shape == (*batch, 37, 29) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, _reference(a, b, trans_a, trans_b), rtol=1e-5, atol=1e-4)
    assert cpu_kernels.TARGET in _lowered(
        lambda a, b: cpu_kernels.matmul(a, b, trans_a=trans_a, trans_b=trans_b), a, b
    )


@pytest.mark.parametrize("trans_a,trans_b", TRANS)
def test_gradients_match_xla(kernel_on, trans_a, trans_b):
    a, b = _operands(*_shapes((3,), 7, 5, 6, trans_a, trans_b), seed=1)

    def loss(matmul, a, b):
        return jnp.sum(jnp.sin(matmul(a, b, trans_a, trans_b)))

    ours = jax.jit(
        jax.grad(
            lambda a, b: loss(
                lambda a, b, ta, tb: cpu_kernels.matmul(a, b, trans_a=ta, trans_b=tb), a, b
            ),
            (0, 1),
        )
    )(a, b)
    xla = jax.grad(lambda a, b: loss(cpu_kernels._dot, a, b), (0, 1))(a, b)
    for got, want in zip(ours, xla, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_weight_gradient_in_contraction_chunks(kernel_on):
    # xᵀ·g over more rows than one chunk: cut into chunks, summed in order.
    x, g = _operands((2 * 4096 + 7, 5), (2 * 4096 + 7, 3), seed=4)
    out = cpu_kernels.matmul(x, g, trans_a=True)
    np.testing.assert_allclose(out, _reference(x, g, True, False), rtol=1e-5, atol=1e-3)


def test_vmap_and_determinism(kernel_on):
    a, b = _operands((4, 9, 6), (4, 6, 5), seed=2)  # vmapped over the leading axis of 4
    fn = jax.jit(jax.vmap(lambda a, b: cpu_kernels.matmul(a, b)))
    out = fn(a, b)
    np.testing.assert_allclose(out, _reference(a, b, False, False), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out, fn(a, b))  # same inputs, same bits


def test_empty_contraction_and_rows(kernel_on):
    a, b = _operands((3, 0), (0, 4))
    np.testing.assert_array_equal(cpu_kernels.matmul(a, b), np.zeros((3, 4), np.float32))
    a, b = _operands((0, 5), (5, 4))
    assert cpu_kernels.matmul(a, b).shape == (0, 4)


def test_falls_back_to_xla(kernel_on, monkeypatch):
    # bfloat16 operands, or the switch off: XLA's dot_general, float32 out.
    a, b = _operands((6, 5), (5, 4), seed=3)
    bf16 = _lowered(cpu_kernels.matmul, a.astype(jnp.bfloat16), b.astype(jnp.bfloat16))
    assert cpu_kernels.TARGET not in bf16 and "dot_general" in bf16
    assert cpu_kernels.matmul(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)).dtype == jnp.float32
    monkeypatch.setenv(cpu_kernels.ENV_VAR, "0")
    assert cpu_kernels.status() == f"off: {cpu_kernels.ENV_VAR}=0"
    assert cpu_kernels.TARGET not in _lowered(lambda a, b: cpu_kernels.matmul(a, b) * 1.0, a, b)
    np.testing.assert_allclose(cpu_kernels.matmul(a, b), _reference(a, b, False, False), rtol=1e-5)


def test_rejects_shapes_that_do_not_multiply():
    a, b = _operands((4, 5), (6, 3))
    with pytest.raises(ValueError, match="contraction lengths differ"):
        cpu_kernels.matmul(a, b)
    with pytest.raises(ValueError, match="equal rank"):
        cpu_kernels.matmul(a, b[None])
    with pytest.raises(ValueError, match="equal rank"):
        cpu_kernels.matmul(a[0], b[0])


def test_layer_norm_matches_float64(kernel_on):
    # 1000 rows: 16 parts of 64 rows, their dscale and dbias terms added in order.
    rng = np.random.default_rng(5)
    x = (2 * rng.standard_normal((10, 100, 24)) + 0.5).astype(np.float32)
    scale, bias = (rng.standard_normal(24).astype(np.float32) for _ in range(2))
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y, mean, rstd = jax.jit(cpu_kernels.layer_norm_forward, static_argnums=3)(x, scale, bias, 1e-6)
    dx, dscale, dbias = jax.jit(cpu_kernels.layer_norm_backward)(x, mean, rstd, scale, dy)

    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    mu = x64.mean(-1, keepdims=True)
    inv = 1 / np.sqrt(((x64 - mu) ** 2).mean(-1, keepdims=True) + 1e-6)
    n = (x64 - mu) * inv
    g = dy64 * scale
    ref_dx = inv * (g - g.mean(-1, keepdims=True) - n * (g * n).mean(-1, keepdims=True))
    np.testing.assert_allclose(y, n * scale + bias, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mean, mu[..., 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rstd, inv[..., 0], rtol=1e-5)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dscale, (dy64 * n).sum((0, 1)), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(dbias, dy64.sum((0, 1)), rtol=1e-4, atol=1e-3)
    with pytest.raises(Exception, match="scale and bias"):
        jax.block_until_ready(cpu_kernels.layer_norm_forward(x, scale[:5], bias, 1e-6))


def test_direct_kernel_calls_say_why_they_cannot_run(monkeypatch):
    # The attention and LayerNorm kernels have no XLA fallback of their own (their callers do).
    monkeypatch.setattr(cpu_kernels, "_load", lambda: (False, "no C++ compiler (test)"))
    x = jnp.ones((2, 4, 6))
    with pytest.raises(RuntimeError, match=r"unavailable: no C\+\+ compiler \(test\)"):
        cpu_kernels.attention_qkv_forward(x, 1, 1.0)
    with pytest.raises(RuntimeError, match="unavailable"):
        cpu_kernels.layer_norm_forward(x, jnp.ones(6), jnp.zeros(6), 1e-6)


def test_builds_into_an_empty_cache_and_reports_a_failed_build(kernel_on, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    built = cpu_kernels._build()
    assert built.parent == tmp_path / "adc_jax" and built.stat().st_size > 0
    assert cpu_kernels._build() == built  # the second call finds it
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other"))
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(RuntimeError, match="building cpu_kernels.cc failed"):
        cpu_kernels._build()
