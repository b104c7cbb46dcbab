"""Matrix products, attention and LayerNorm on XLA's CPU backend (GitHub issue #8).

XLA's CPU backend computes matrix products with Eigen. For the products of a ViT training step
that contract over the rows of both operands, ``xᵀ @ g`` (the weight gradient of every linear
layer), Eigen runs at a half to two thirds of OpenBLAS's speed on the same cores; attention is a
chain of passes over ``[B, H, N, N]`` arrays in memory, with each head transposed in and out of
place; and LayerNorm is several full-size passes each way (``benchmarks/matmul.py``,
``benchmarks/profile_step.py``). This module holds XLA FFI custom calls (``cpu_kernels.cc``)
that run on XLA's own thread pool (the file says how they share the cores):

* :func:`matmul`: ``op(a) @ op(b)``, batched, differentiable, single-threaded OpenBLAS ``sgemm``
  parts (the model's weight gradients);
* :func:`attention_forward` / :func:`attention_backward`: softmax attention per (batch, head)
  item, its ``[n, N]`` matrix kept in cache between the products and the softmax, the products
  on register tiles (OpenBLAS is slow on matrices this small);
* :func:`attention_qkv_forward` / :func:`attention_qkv_backward`: the same, reading the heads
  straight from the fused ``qkv`` projection and writing them side by side;
  :func:`attention_select_forward` / :func:`attention_select_backward` from queries of some rows
  and the keys and values of all, each with its heads side by side (ADC's last client block);
* :func:`layer_norm_forward` / :func:`layer_norm_backward`: one pass over the rows each way.

They are used on a CPU only, for float32 operands, and only where they can be built: the first
call compiles ``cpu_kernels.cc`` with the system's C++ compiler against the FFI headers that
jaxlib ships (a few seconds, cached under ``$XDG_CACHE_HOME/adc_jax``, one build per jaxlib and
kind of CPU) and links it to the OpenBLAS that numpy's Linux wheels carry. Anywhere else (GPU,
TPU, bfloat16, no compiler, a numpy without its own OpenBLAS), or with ``ADC_JAX_CPU_KERNELS=0``
in the environment, :func:`use_kernel` is false and the model computes the same with XLA's
operations (same numbers up to float32 rounding). :func:`status` says which. The switch is read
when a function is traced: set it before the first call of a jitted step.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

ENV_VAR = "ADC_JAX_CPU_KERNELS"
TARGET = "adc_jax_cpu_matmul"
ATTENTION_TARGET = "adc_jax_cpu_attention"
ATTENTION_GRAD_TARGET = "adc_jax_cpu_attention_grad"
ATTENTION_QKV_TARGET = "adc_jax_cpu_attention_qkv"
ATTENTION_QKV_GRAD_TARGET = "adc_jax_cpu_attention_qkv_grad"
ATTENTION_SELECT_TARGET = "adc_jax_cpu_attention_select"
ATTENTION_SELECT_GRAD_TARGET = "adc_jax_cpu_attention_select_grad"
LAYER_NORM_TARGET = "adc_jax_cpu_layer_norm"
LAYER_NORM_GRAD_TARGET = "adc_jax_cpu_layer_norm_grad"
SOURCE = pathlib.Path(__file__).with_name("cpu_kernels.cc")
# Fortran sgemm with 64-bit integers, by the names numpy's bundled OpenBLAS gives it (numpy >= 2:
# scipy-openblas64; numpy 1.26: openblas64_), and the per-thread thread-count setter.
SGEMM_SYMBOLS = ("scipy_sgemm_64_", "sgemm_64_")
THREADS_SYMBOLS = ("openblas_set_num_threads_local",)


def matmul(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False):
    """``op(a) @ op(b)`` over the last two axes, ``op(x)`` = ``x`` or its transpose (``xᵀ``) by
    ``trans_a`` / ``trans_b``; leading axes are batch axes, equal in ``a`` and ``b``.

    The result is float32 (``preferred_element_type``). Differentiable and usable under ``jit``
    and ``vmap``; the gradient is computed by this function again.
    """
    if a.ndim < 2 or a.ndim != b.ndim or a.shape[:-2] != b.shape[:-2]:
        raise ValueError(
            f"matmul: operands of equal rank >= 2 and batch axes; got {a.shape}, {b.shape}"
        )
    k_a = a.shape[-2] if trans_a else a.shape[-1]
    k_b = b.shape[-1] if trans_b else b.shape[-2]
    if k_a != k_b:
        raise ValueError(
            f"matmul: contraction lengths differ ({k_a} vs {k_b}) for shapes "
            f"{a.shape}{'ᵀ' if trans_a else ''} @ {b.shape}{'ᵀ' if trans_b else ''}"
        )
    return _matmul(a, b, trans_a, trans_b)


def status() -> str:
    """``"openblas <version>"`` when the kernels run (float32 operands) on this machine's CPU,
    else ``"off: <why>"``."""
    off = _why_off()
    return f"off: {off}" if off else _load()[1]


def use_kernel(*dtypes) -> bool:
    """Whether operands of these dtypes go through the kernels: all float32, on a CPU, built."""
    return all(dtype == jnp.float32 for dtype in dtypes) and _why_off() is None


def _why_off() -> str | None:
    if os.environ.get(ENV_VAR, "1") == "0":
        return f"{ENV_VAR}=0"
    if jax.default_backend() != "cpu":
        return f"backend {jax.default_backend()}"
    loaded, message = _load()
    return None if loaded else message


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(a, b, trans_a, trans_b):
    if not use_kernel(a.dtype, b.dtype):
        return _dot(a, b, trans_a, trans_b)
    shape = (*a.shape[:-2], a.shape[-1] if trans_a else a.shape[-2])
    shape += (b.shape[-2] if trans_b else b.shape[-1],)
    call = jax.ffi.ffi_call(
        TARGET, jax.ShapeDtypeStruct(shape, jnp.float32), vmap_method="broadcast_all"
    )
    return call(a, b, trans_a=trans_a, trans_b=trans_b)


def _dot(a, b, trans_a, trans_b):
    """XLA's product, ``op(a) @ op(b)`` as one ``dot_general``."""
    batch = tuple(range(a.ndim - 2))
    contract_a = a.ndim - 2 if trans_a else a.ndim - 1
    contract_b = b.ndim - 1 if trans_b else b.ndim - 2
    return jax.lax.dot_general(
        a,
        b,
        (((contract_a,), (contract_b,)), (batch, batch)),
        preferred_element_type=jnp.float32,
    )


def _matmul_fwd(a, b, trans_a, trans_b):
    return _matmul(a, b, trans_a, trans_b), (a, b)


def _matmul_bwd(trans_a, trans_b, residuals, g):
    # c = op(a)·op(b): d op(a) = g·op(b)ᵀ, d op(b) = op(a)ᵀ·g, each written as one product of the
    # stored operands (no transposed copies).
    a, b = residuals
    da = _matmul(b, g, trans_b, True) if trans_a else _matmul(g, b, False, not trans_b)
    db = _matmul(g, a, True, trans_a) if trans_b else _matmul(a, g, not trans_a, False)
    return da.astype(a.dtype), db.astype(b.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _ffi_call(target: str, result_shape_dtypes, vmap_method: str):
    """``jax.ffi.ffi_call`` of one of this module's targets, built and registered first (a
    ``RuntimeError`` saying why where they cannot be: these callers have no fallback)."""
    loaded, message = _load()
    if not loaded:
        raise RuntimeError(f"adc_jax.cpu_kernels unavailable: {message}")
    return jax.ffi.ffi_call(target, result_shape_dtypes, vmap_method=vmap_method)


def attention_forward(q: jax.Array, k: jax.Array, v: jax.Array):
    """:func:`adc_jax.vit.attention`'s forward pass in one call, each (batch, head) item's
    products and softmax done while its ``[n, N]`` matrix is in cache: ``q [..., n, d]``
    (scaled), ``k, v [..., N, d]`` → ``(out [..., n, d], exp [..., n, N], inv_sum [..., n, 1])``,
    ``exp`` the softmax's numerators ``exp(logit - row max)`` and ``inv_sum`` their rows' inverse
    sums. Only where :func:`use_kernel` (no fallback, no gradient: the caller has both)."""
    n, big_n = q.shape[-2], k.shape[-2]
    shapes = (q.shape, (*q.shape[:-1], big_n), q.shape[:-1])
    call = _ffi_call(
        ATTENTION_TARGET,
        tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes),
        vmap_method="broadcast_all",
    )
    out, exp, inv_sum = call(q, k, v)
    return out, exp, inv_sum.reshape(*q.shape[:-2], n, 1)


def attention_qkv_forward(qkv: jax.Array, heads: int, scale: float):
    """:func:`attention_forward` reading ``q, k, v`` from one fused projection ``qkv [B, N, 3·D]``
    (columns: ``H`` query heads, then key heads, then value heads; ``D = H·d``) and writing
    ``out [B, N, D]`` with the heads side by side, so that no head is transposed in or out of
    place; the logits are ``scale · q·kᵀ``. Returns ``(out, exp [B, H, N, N], inv_sum [B, H, N,
    1])``."""
    b, n, three_d = qkv.shape
    shapes = ((b, n, three_d // 3), (b, heads, n, n), (b, heads, n))
    call = _ffi_call(
        ATTENTION_QKV_TARGET,
        tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes),
        vmap_method="sequential",
    )
    # "sequential" under vmap: the kernel reads exactly [B, N, 3·D] (the heads' columns).
    out, exp, inv_sum = call(qkv, heads=np.int64(heads), scale=np.float32(scale))
    return out, exp, inv_sum[..., None]


def attention_qkv_backward(qkv, out, exp, inv_sum, d_out, heads: int, scale: float):
    """The backward pass of :func:`attention_qkv_forward`: the gradient of ``qkv``."""
    call = _ffi_call(
        ATTENTION_QKV_GRAD_TARGET,
        jax.ShapeDtypeStruct(qkv.shape, jnp.float32),
        vmap_method="sequential",
    )
    return call(
        qkv, out, exp, inv_sum[..., 0], d_out, heads=np.int64(heads), scale=np.float32(scale)
    )


def attention_select_forward(q: jax.Array, kv: jax.Array, heads: int):
    """:func:`attention_forward` for queries of some rows ``q [B, n, D]`` (scaled; heads side by
    side, ``D = H·d``) against keys and values of all ``kv [B, N, 2·D]`` (``H`` key heads, then
    ``H`` value heads): ``(out [B, n, D], exp [B, H, n, N], inv_sum [B, H, n, 1])``, no head
    transposed in or out of place (the last client block under ADC, ``vit.Attention``'s
    ``select``)."""
    b, n, width = q.shape
    shapes = ((b, n, width), (b, heads, n, kv.shape[1]), (b, heads, n))
    call = _ffi_call(
        ATTENTION_SELECT_TARGET,
        tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes),
        vmap_method="sequential",
    )
    out, exp, inv_sum = call(q, kv, heads=np.int64(heads))
    return out, exp, inv_sum[..., None]


def attention_select_backward(q, kv, out, exp, inv_sum, d_out, heads: int):
    """The backward pass of :func:`attention_select_forward`: ``(dq, dkv)``."""
    call = _ffi_call(
        ATTENTION_SELECT_GRAD_TARGET,
        (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(kv.shape, jnp.float32)),
        vmap_method="sequential",
    )
    return call(q, kv, out, exp, inv_sum[..., 0], d_out, heads=np.int64(heads))


def attention_backward(q, k, v, out, exp, inv_sum, d_out):
    """The backward pass of :func:`attention_forward`'s softmax attention: ``(dq, dk, dv)``."""
    call = _ffi_call(
        ATTENTION_GRAD_TARGET,
        tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v)),
        vmap_method="broadcast_all",
    )
    return call(q, k, v, out, exp, inv_sum.reshape(inv_sum.shape[:-1]), d_out)


def layer_norm_forward(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float):
    """:func:`adc_jax.vit.layer_norm`'s forward pass in one pass over ``x [..., D]``: ``(y [..., D],
    mean [...], rstd [...])``, ``rstd = 1/√(var + eps)``. float32; only where :func:`use_kernel`
    (no fallback, no gradient: the caller has both)."""
    stats = jax.ShapeDtypeStruct(x.shape[:-1], jnp.float32)
    call = _ffi_call(
        LAYER_NORM_TARGET,
        (jax.ShapeDtypeStruct(x.shape, jnp.float32), stats, stats),
        vmap_method="sequential",  # scale and bias are [D]: one call per vmapped item
    )
    return call(x, scale, bias, eps=np.float32(eps))


def layer_norm_backward(x, mean, rstd, scale, dy):
    """The backward pass of :func:`layer_norm_forward`: ``(dx, dscale, dbias)``."""
    call = _ffi_call(
        LAYER_NORM_GRAD_TARGET,
        tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in (x.shape, scale.shape, scale.shape)),
        vmap_method="sequential",
    )
    return call(x, mean, rstd, scale, dy)


# ------------------------------------------------------------------------------------------------
# Building and loading the kernel
# ------------------------------------------------------------------------------------------------


@functools.cache
def _load() -> tuple[bool, str]:
    """Builds (or finds in the cache) the kernel, hands it OpenBLAS, registers it with XLA.
    ``(True, "openblas <version>")``, or ``(False, why not)``; logged once either way."""
    if not hasattr(jax, "ffi"):
        return False, f"jax {jax.__version__} has no jax.ffi"
    try:
        blas, version = _numpy_openblas()
        library = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        log.info("adc_jax.cpu_kernels off (XLA's products instead): %s", error)
        return False, str(error)
    library.adc_cpu_kernels_set_blas.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    library.adc_cpu_kernels_set_blas(*(ctypes.cast(f, ctypes.c_void_p) for f in blas))
    for target, handler in (
        (TARGET, library.AdcCpuMatmul),
        (ATTENTION_TARGET, library.AdcCpuAttention),
        (ATTENTION_GRAD_TARGET, library.AdcCpuAttentionGrad),
        (ATTENTION_QKV_TARGET, library.AdcCpuAttentionQkv),
        (ATTENTION_QKV_GRAD_TARGET, library.AdcCpuAttentionQkvGrad),
        (ATTENTION_SELECT_TARGET, library.AdcCpuAttentionSelect),
        (ATTENTION_SELECT_GRAD_TARGET, library.AdcCpuAttentionSelectGrad),
        (LAYER_NORM_TARGET, library.AdcCpuLayerNorm),
        (LAYER_NORM_GRAD_TARGET, library.AdcCpuLayerNormGrad),
    ):
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
    log.info("adc_jax.cpu_kernels on: %s", version)
    return True, version


def _numpy_openblas():
    """``((sgemm, set_num_threads_local), "openblas <version>")`` from the OpenBLAS that numpy's
    wheel carries (``numpy.libs``); ``OSError`` where numpy has none (conda's, macOS's)."""
    root = pathlib.Path(np.__file__).parent
    paths = sorted(glob.glob(str(root.parent / "numpy.libs" / "lib*openblas*.so*")))
    paths += sorted(glob.glob(str(root / ".libs" / "lib*openblas*.so*")))
    for path in paths:
        library = ctypes.CDLL(path)
        sgemm = next((getattr(library, s) for s in SGEMM_SYMBOLS if hasattr(library, s)), None)
        local = next((getattr(library, s) for s in THREADS_SYMBOLS if hasattr(library, s)), None)
        if sgemm is None or local is None:
            continue
        version = "openblas"
        for name in ("scipy_openblas_get_config64_", "openblas_get_config64_"):
            if hasattr(library, name):
                getattr(library, name).restype = ctypes.c_char_p
                version = " ".join(getattr(library, name)().decode().split()[:2]).lower()
                break
        return (sgemm, local), version
    raise OSError("numpy carries no OpenBLAS with 64-bit sgemm and per-thread threads")


def _build() -> pathlib.Path:
    """The compiled kernel: from the cache if this source was built for this jaxlib, else built
    now with ``$CXX`` (else ``c++``/``g++``). ``RuntimeError`` if no compiler is there or it
    fails."""
    import jaxlib

    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (set CXX or install g++)")
    include = jax.ffi.include_dir()
    key = hashlib.sha256(SOURCE.read_bytes())
    key.update(f"{jaxlib.__version__} {compiler} {include} {_cpu_flags()}".encode())
    cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
    target = cache / "adc_jax" / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = pathlib.Path(tmp) / target.name
        command = [compiler, "-O3", *_ARCH_FLAGS, "-std=c++17", "-shared", "-fPIC", f"-I{include}"]
        command += [str(SOURCE), "-o", str(built)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"building {SOURCE.name} failed: {result.stderr[-2000:]}")
        os.replace(built, target)  # atomic: a concurrent build replaces it with the same file
    return target


# The kernel is built on the machine that runs it, for its CPU (the softmax loops vectorise to
# its widest registers); the cache key holds the CPU's flags, so a cache shared between machines
# keeps one build per kind of CPU.
_ARCH_FLAGS = ("-march=native",)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.machine()
