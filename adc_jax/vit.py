"""ViT / DeiT in Flax Linen, cut in two for split learning (ADC_SPEC §1, ARCHITECTURE decision 2).

The model is timm's ``VisionTransformer`` as used by DeiT v1 (class token, learned absolute position
embedding added after the class token is prepended, pre-norm blocks, classification on token 0),
split after block ``l = split_index``:

* :class:`Client`: patch embedding, CLS token, position embedding, blocks ``0..l-1``. Returns the
  tokens ``[B, N, D]`` and the last client block's head-averaged CLS attention row ``[B, N]`` (the
  ADC scores, computed in the same forward pass).
* :class:`Server`: blocks ``l..L-1``, final LayerNorm, linear head on token 0. Accepts any token
  count ``1 <= n <= N`` (the ADC payload keeps ``k < N`` tokens, CLS first).
* :class:`SplitViT`: a plain (non-Module) holder of both halves with ``init`` and ``apply_full``.

Numerics follow timm so that converted checkpoints agree to ≤ 1e-4 in float32: LayerNorm eps 1e-6,
exact (erf) GELU, one fused ``qkv`` projection laid out ``[q heads…, k heads…, v heads…]``.

Parameter tree (block indices are global, so a converter maps ``blocks.{i}`` to ``blocks_{i}`` on
whichever side holds it)::

    client: patch_embed/{kernel [p, p, C, D] (HWIO, like nn.Conv), bias [D]}
            cls_token [1, 1, D]
            pos_embed [1, N, D]
            blocks_{i}  for i in 0..l-1
    server: blocks_{i}  for i in l..L-1
            norm/{scale [D], bias [D]}
            head/{kernel [D, num_classes], bias [num_classes]}
    blocks_{i}: norm1/{scale, bias}, attn/qkv/{kernel [D, 3D], bias [3D]},
                attn/proj/{kernel [D, D], bias [D]}, norm2/{scale, bias},
                mlp/fc1/{kernel [D, M], bias [M]}, mlp/fc2/{kernel [M, D], bias [D]}

Parameters are float32; ``dtype`` sets the compute dtype (bfloat16 on TPU), while attention logits,
softmax, LayerNorm statistics, scores and logits stay float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adc_jax import cpu_kernels

Dtype = Any
Params = Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)

LN_EPS = 1e-6

# timm's ``init_weights_vit_timm``: trunc-normal(0.02) linear weights and pos_embed, zero biases,
# cls_token normal(1e-6). The patch embedding (a conv in timm, PyTorch default init there) uses
# LeCun normal, as big_vision does.
_DENSE_INIT = nn.initializers.truncated_normal(stddev=0.02)
_POS_INIT = nn.initializers.truncated_normal(stddev=0.02)
_CLS_INIT = nn.initializers.normal(stddev=1e-6)
_PATCH_INIT = nn.initializers.lecun_normal()


# ------------------------------------------------------------------------------------------------
# Configs and registry
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Static architecture of a ViT/DeiT and the input normalisation of its checkpoint.

    Images are square, ``image_size × image_size × in_chans``, NHWC, already normalised with
    ``(x - mean) / std`` (per channel, on [0, 1] pixel values).
    """

    name: str
    image_size: int
    patch_size: int
    in_chans: int
    width: int  # D
    depth: int  # L
    num_heads: int
    mlp_dim: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(
                f"{self.name}: image size {self.image_size} is not divisible by the patch size "
                f"{self.patch_size}; use a multiple of {self.patch_size} "
                f"(e.g. {self.image_size - self.image_size % self.patch_size})."
            )
        if self.width % self.num_heads:
            raise ValueError(
                f"{self.name}: width {self.width} is not divisible by num_heads {self.num_heads}."
            )
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(
                f"{self.name}: mean/std need one entry per input channel ({self.in_chans}); "
                f"got {len(self.mean)} and {len(self.std)}."
            )
        if self.num_classes < 1:
            raise ValueError(f"{self.name}: num_classes must be >= 1, got {self.num_classes}.")

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def seq_len(self) -> int:
        """N: tokens entering the blocks, CLS included."""
        return self.num_patches + 1

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


def _imagenet(name, width, depth, num_heads, mlp_dim) -> ViTConfig:
    return ViTConfig(
        name=name,
        image_size=224,
        patch_size=16,
        in_chans=3,
        width=width,
        depth=depth,
        num_heads=num_heads,
        mlp_dim=mlp_dim,
        num_classes=1000,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )


MODELS: dict[str, ViTConfig] = {
    c.name: c
    for c in (
        # timm deit_*_patch16_224.fb_in1k: ImageNet-1k, ImageNet mean/std.
        _imagenet("deit_tiny_patch16_224", 192, 12, 3, 768),
        _imagenet("deit_small_patch16_224", 384, 12, 6, 1536),
        _imagenet("deit_base_patch16_224", 768, 12, 12, 3072),
        # A small ViT for Fashion-MNIST (the project's real-data check on a CPU).
        ViTConfig(
            name="vit_mini_patch4_28",
            image_size=28,
            patch_size=4,
            in_chans=1,
            width=64,
            depth=4,
            num_heads=2,
            mlp_dim=256,
            num_classes=10,
            mean=FASHION_MNIST_MEAN,
            std=FASHION_MNIST_STD,
        ),
        # Tiny variant for fast CPU tests (N = 17 tokens).
        ViTConfig(
            name="vit_test_patch4_16",
            image_size=16,
            patch_size=4,
            in_chans=3,
            width=32,
            depth=4,
            num_heads=2,
            mlp_dim=64,
            num_classes=10,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
        ),
    )
}


def get_model_config(
    name: str, *, num_classes: int | None = None, image_size: int | None = None
) -> ViTConfig:
    """The registered config ``name``, optionally with another head size or image size.

    Raises:
      ValueError: unknown ``name`` (the message lists the known ones), or an ``image_size`` not
        divisible by the patch size.
    """
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; known models: {', '.join(sorted(MODELS))}.")
    config = MODELS[name]
    changes = {}
    if num_classes is not None:
        changes["num_classes"] = num_classes
    if image_size is not None:
        changes["image_size"] = image_size
    return dataclasses.replace(config, **changes) if changes else config


# ------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------


@jax.custom_vjp
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """LayerNorm over the last axis (eps 1e-6, statistics in float32), output in ``x.dtype``.

    Written out with its own backward pass, which keeps the normalised input and the
    ``[..., 1]`` inverse deviation as residuals. Autodiff of the textbook form saves the inverse
    deviation broadcast to the full ``[..., D]`` shape, and XLA on CPU then materialises it.
    On a CPU in float32 each pass is one call of :mod:`adc_jax.cpu_kernels` (one pass over the
    rows; residuals ``x`` and the row statistics), where XLA makes several full-size passes.
    """
    return _layer_norm_fwd(x, scale, bias)[0]


def _layer_norm_fwd(x, scale, bias):
    if cpu_kernels.use_kernel(x.dtype, scale.dtype, bias.dtype):
        y, mean, rstd = cpu_kernels.layer_norm_forward(x, scale, bias, LN_EPS)
        return y, (x, mean, rstd, scale)
    xf = x.astype(jnp.float32)
    centered = xf - jnp.mean(xf, axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + LN_EPS)
    normed = centered * rstd
    return (normed * scale + bias).astype(x.dtype), (normed, rstd, scale)


def _layer_norm_bwd(residuals, dy):
    if cpu_kernels.use_kernel(dy.dtype, *(r.dtype for r in residuals)):
        return cpu_kernels.layer_norm_backward(*residuals, dy)
    normed, rstd, scale = residuals
    dtype, dy = dy.dtype, dy.astype(jnp.float32)  # the input's dtype is the output's
    d = dy.shape[-1]
    dscale = jnp.sum((dy * normed).reshape(-1, d), axis=0)
    dbias = jnp.sum(dy.reshape(-1, d), axis=0)
    g = dy * scale
    mean_g = jnp.mean(g, axis=-1, keepdims=True)
    mean_gn = jnp.mean(g * normed, axis=-1, keepdims=True)
    dx = rstd * (g - mean_g - normed * mean_gn)
    return dx.astype(dtype), dscale, dbias


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
    """``nn.LayerNorm``'s parameters (``scale``, ``bias``) with :func:`layer_norm`'s kernels."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
        return layer_norm(x.astype(self.dtype), scale, bias)


def _layer_norm(name: str, dtype: Dtype) -> LayerNorm:
    return LayerNorm(dtype, name=name)


class Dense(nn.Module):
    """``x @ kernel + bias`` over the last axis, computed as one 2-D matmul.

    Same parameters as ``nn.Dense`` (``kernel [in, out]``, ``bias [out]``, float32). The input is
    flattened to ``[rows, in]`` first: the weight gradient is then a plain ``[in, rows] × [rows,
    out]`` contraction, while a contraction over two leading axes (``nn.Dense`` on ``[B, N, D]``)
    makes XLA on CPU materialise a transposed copy of an activation-sized operand for every
    layer in the backward pass. On a CPU in float32 that weight gradient is an OpenBLAS call
    (:func:`adc_jax.cpu_kernels.matmul`).
    """

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, columns: slice | None = None) -> jax.Array:
        """``x [..., in] → [..., out]``; with ``columns``, only those output features."""
        kernel = self.param("kernel", _DENSE_INIT, (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        if columns is not None:
            kernel, bias = kernel[:, columns], bias[columns]
        rows = x.reshape(-1, x.shape[-1]).astype(self.dtype)
        y = _linear(rows, kernel.astype(self.dtype), bias.astype(self.dtype))
        return y.reshape(*x.shape[:-1], kernel.shape[1])


def _linear(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """``x [R, in] @ kernel + bias``; in float32 its weight gradient ``xᵀ·g`` is a
    :func:`adc_jax.cpu_kernels.matmul` (OpenBLAS on a CPU, where XLA's is slowest: issue #8)."""
    if x.dtype == kernel.dtype == jnp.float32:
        return _linear_f32(x, kernel, bias)
    return x @ kernel + bias


@jax.custom_vjp
def _linear_f32(x, kernel, bias):
    return x @ kernel + bias


def _linear_f32_fwd(x, kernel, bias):
    return x @ kernel + bias, (x, kernel)


def _linear_f32_bwd(residuals, g):
    # Only the weight gradient leaves XLA: the input gradient g·kernelᵀ (contracting over the
    # small axis) is as fast in XLA, which also fuses the bias gradient's reduction.
    x, kernel = residuals
    return g @ kernel.T, cpu_kernels.matmul(x, g, trans_a=True), g.sum(axis=0)


_linear_f32.defvjp(_linear_f32_fwd, _linear_f32_bwd)


def _dense(features: int, name: str, dtype: Dtype) -> Dense:
    return Dense(features, dtype, name=name)


class PatchEmbed(nn.Module):
    """timm's ``patch_embed.proj``: a convolution with kernel = stride = patch size.

    The kernel is stored ``[p, p, C, D]`` (HWIO, the layout of ``nn.Conv``; timm's OIHW weight is
    ``w.transpose(2, 3, 1, 0)``). Computed as a strided convolution: on XLA's CPU backend (jax
    0.10) that beats the equivalent "patchify + matmul" by 1.3–3× forward, because rearranging
    the image into patch rows is a slow transpose there. Patches come out in row-major grid
    order, like timm's ``flatten(2)``.

    Input ``[B, H, W, C]``; output ``[B, (H/p)·(W/p), D]`` in ``dtype``.
    """

    patch_size: int
    width: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        b, _, _, c = images.shape
        p = self.patch_size
        kernel = self.param("kernel", _PATCH_INIT, (p, p, c, self.width), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.width,), jnp.float32)
        x = jax.lax.conv_general_dilated(
            images.astype(self.dtype),
            kernel.astype(self.dtype),
            window_strides=(p, p),
            padding="VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return x.reshape(b, -1, self.width) + bias.astype(self.dtype)


@jax.custom_vjp
def add_over_batch(x: jax.Array, y: jax.Array) -> jax.Array:
    """``x + y`` for ``x [B, ...]`` and ``y [1, ...]`` (a parameter shared by the batch, such as
    the position embedding).

    The gradient of ``y`` is the sum of ``g`` over the batch, computed as the product ``1ᵀ·g``
    of a ones vector with ``g [B, rest]`` (float32 accumulation, full precision). XLA's CPU
    reduction over a short leading axis of a wide array is slow: ``[64, 197·192].sum(0)`` takes
    14 ms on a 2-core Xeon (jax 0.10), the product 0.6 ms (issue #8; one per training step).
    """
    return _add_over_batch_fwd(x, y)[0]


def _add_over_batch_fwd(x, y):
    if y.ndim != x.ndim or y.shape[0] != 1 or y.shape[1:] != x.shape[1:] or y.dtype != x.dtype:
        raise ValueError(
            "add_over_batch: y must be [1, *x.shape[1:]] of x's dtype; got "
            f"{x.shape} {x.dtype}, {y.shape} {y.dtype}"
        )
    return x + y, None


def _add_over_batch_bwd(_, g):
    ones = jnp.ones((1, g.shape[0]), g.dtype)
    rows = g.reshape(g.shape[0], -1)
    dy = jnp.dot(ones, rows, precision="highest", preferred_element_type=jnp.float32)
    return g, dy.reshape(1, *g.shape[1:]).astype(g.dtype)


add_over_batch.defvjp(_add_over_batch_fwd, _add_over_batch_bwd)


Selector = Callable[[jax.Array], tuple[jax.Array, Any]]
"""``select(scores [B, N] float32) -> (positions [B, k] int32, aux)``: which query positions of the
last client block to compute (see :class:`Client`); ``aux`` is passed through untouched."""


class Attention(nn.Module):
    """Multi-head self-attention with timm's fused ``qkv`` layout.

    Input ``[B, N, D]``. Returns ``(out [B, N, D], cls_attention [B, N] float32 or None)``, where
    ``cls_attention`` is row 0 (the CLS query) of the post-softmax attention, averaged over heads.

    With ``select``: keys and values are computed for all N tokens, the query and the attention
    row of CLS first, then ``positions, aux = select(cls_attention)`` (no gradient), then queries,
    attention rows and the output projection only at ``positions [B, k]``. Returns
    ``(out [B, k, D], cls_attention [B, N], (positions, aux))``; ``out[b, j]`` equals the full
    output at ``positions[b, j]`` (keys and values still come from all N tokens).
    """

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, return_cls_attention: bool = False, select: Selector | None = None
    ) -> tuple:
        d = x.shape[-1]
        h = self.num_heads
        hd = d // h
        # One [D, 3D] matmul instead of three: fewer, larger GEMMs are faster on CPU, and the output
        # columns are timm's attn.qkv rows: [q (head 0..H-1), k (…), v (…)], each head hd wide.
        # Split, not indexed: the gradient of a split is one concatenation; that of three index
        # slices is three zero-padded copies of the whole qkv tensor, summed.
        qkv = _dense(3 * d, "qkv", self.dtype)
        # Scaling q (B·N·D values) instead of the logits (B·H·N·N) is the same up to rounding
        # (exact when hd is a power of 4, as in every DeiT), and saves a pass over the logits.
        scale = jnp.asarray(hd**-0.5, self.dtype)
        selection = None
        if select is None and cpu_kernels.use_kernel(self.dtype):
            # On a CPU, one call for all heads straight from the projection's layout.
            out, first_row = fused_attention(qkv(x), h)
        elif select is None:
            q, k, v = jnp.split(qkv(x), 3, axis=2)  # [B, N, D] each
            out, first_row = _attention_by_heads(q * scale, k, v, h)
        else:
            # Keys and values for every token; queries only for CLS (the scores), then for the
            # rows the selector keeps.
            kv = qkv(x, columns=slice(d, 3 * d))  # [B, N, 2D]: k heads, v heads
            q_cls = qkv(x[:, :1], columns=slice(0, d)) * scale
            # Same kernel as the full path's row 0: both paths rank tokens by the same numbers.
            cls_row = select_attention(*jax.lax.stop_gradient((q_cls, kv)), h)[1]
            cls_attention = cls_row.mean(axis=1)  # [B, N]
            positions, aux = select(cls_attention)
            selection = (positions, aux)
            kept = jnp.take_along_axis(x, positions[:, :, None], axis=1)  # [B, k, D]
            q = qkv(kept, columns=slice(0, d)) * scale
            out, first_row = select_attention(q, kv, h)  # [B, k, D], [B, H, N]
        out = _dense(d, "proj", self.dtype)(out)
        if selection is not None:
            return out, cls_attention, selection
        cls_attention = first_row.mean(axis=1) if return_cls_attention else None
        return out, cls_attention


def select_attention(q: jax.Array, kv: jax.Array, num_heads: int) -> tuple[jax.Array, jax.Array]:
    """:func:`attention` of queries ``q [B, n, D]`` (pre-scaled) against keys and values ``kv [B,
    N, 2D]`` (the projection's key columns, then its value columns), heads side by side in
    every array: ``(out [B, n, D], probs[:, :, 0, :] [B, H, N])``. On a CPU in float32 one call of
    :func:`adc_jax.cpu_kernels.attention_select_forward`, which reads and writes the heads in
    place; elsewhere the heads are moved to a batch axis and back."""
    if cpu_kernels.use_kernel(q.dtype, kv.dtype):
        return _select_attention(q, kv, num_heads)
    k, v = jnp.split(kv, 2, axis=2)
    return _attention_by_heads(q, k, v, num_heads)


def _attention_by_heads(q, k, v, num_heads):
    """:func:`attention` of ``q [B, n, D]``, ``k, v [B, N, D]``: ``(out [B, n, D], first row)``."""
    b, n, d = q.shape
    out, first_row = attention(_heads(q, num_heads), _heads(k, num_heads), _heads(v, num_heads))
    return out.transpose(0, 2, 1, 3).reshape(b, n, d), first_row  # heads back to features


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _select_attention(q, kv, num_heads):
    return _select_attention_fwd(q, kv, num_heads)[0]


def _select_attention_fwd(q, kv, num_heads):
    out, exp, inv_sum = cpu_kernels.attention_select_forward(q, kv, num_heads)
    first_row = exp[:, :, 0, :] * inv_sum[:, :, 0, :]
    return (out, first_row), (q, kv, out, exp, inv_sum)


def _select_attention_bwd(num_heads, residuals, cotangents):
    return cpu_kernels.attention_select_backward(*residuals, cotangents[0], num_heads)


_select_attention.defvjp(_select_attention_fwd, _select_attention_bwd)


def _heads(x: jax.Array, num_heads: int) -> jax.Array:
    """``[B, n, H·hd] → [B, H, n, hd]``: heads as a batch axis, the layout batched GEMMs want."""
    b, n, d = x.shape
    return x.reshape(b, n, num_heads, d // num_heads).transpose(0, 2, 1, 3)


@jax.custom_vjp
def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``softmax(q kᵀ) v`` per head, and row 0 of the softmax (no gradient through the latter).

    ``q [B, H, n, hd]`` (pre-scaled), ``k, v [B, H, N, hd]`` → ``(out [B, H, n, hd] in v's dtype,
    probs[:, :, 0, :] [B, H, N] float32)``. Same numbers as the textbook form up to rounding, with
    fewer passes over the ``[B, H, n, N]`` attention matrix, which dominate on a CPU: the
    forward pass normalises the ``[n, hd]`` output instead of the ``[n, N]`` matrix, and the
    backward pass takes the softmax's row sums from ``dout · out`` (as FlashAttention does).
    On a CPU in float32 each pass is one call of :mod:`adc_jax.cpu_kernels` (the same arithmetic,
    each (batch, head) item's matrix kept in cache); elsewhere, XLA's operations below.
    """
    return _attention_fwd(q, k, v)[0]


def _attention_fwd(q, k, v):
    if cpu_kernels.use_kernel(q.dtype, k.dtype, v.dtype):
        out, exp, inv_sum = cpu_kernels.attention_forward(q, k, v)
        first_row = exp[:, :, 0, :] * inv_sum[:, :, 0, :]
        return (out, first_row), (q, k, v, out, exp, inv_sum)
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    exp = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    inv_sum = 1.0 / jnp.sum(exp, axis=-1, keepdims=True)  # [B, H, n, 1]
    unnormed = jnp.einsum(
        "bhqk,bhkd->bhqd", exp.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    out = (unnormed * inv_sum).astype(v.dtype)
    first_row = exp[:, :, 0, :] * inv_sum[:, :, 0, :]
    return (out, first_row), (q, k, v, out, exp, inv_sum)


def _attention_bwd(residuals, cotangents):
    q, k, v, out, exp, inv_sum = residuals
    if cpu_kernels.use_kernel(q.dtype, k.dtype, v.dtype, cotangents[0].dtype):
        return cpu_kernels.attention_backward(q, k, v, out, exp, inv_sum, cotangents[0])
    d_out = cotangents[0].astype(jnp.float32)  # row 0's cotangent is ignored (stop_gradient)
    d_scaled = (d_out * inv_sum).astype(v.dtype)  # dout / rowsum: P = exp · inv_sum
    dv = jnp.einsum(
        "bhqk,bhqd->bhkd", exp.astype(v.dtype), d_scaled, preferred_element_type=jnp.float32
    )
    dp = jnp.einsum("bhqd,bhkd->bhqk", d_scaled, v, preferred_element_type=jnp.float32)
    row = jnp.sum(d_out * out.astype(jnp.float32), axis=-1, keepdims=True)  # Σ_k P·dP
    d_logits = (exp * (dp - row * inv_sum)).astype(q.dtype)
    dq = jnp.einsum("bhqk,bhkd->bhqd", d_logits, k, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bhqk,bhqd->bhkd", d_logits, q, preferred_element_type=jnp.float32)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


attention.defvjp(_attention_fwd, _attention_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def fused_attention(qkv: jax.Array, num_heads: int) -> tuple[jax.Array, jax.Array]:
    """:func:`attention` of all heads from the fused projection ``qkv [B, N, 3D]`` (timm's
    layout), through :func:`adc_jax.cpu_kernels.attention_qkv_forward`: ``(out [B, N, D] with
    the heads side by side, probs[:, :, 0, :] [B, H, N])``. float32 on a CPU only."""
    return _fused_attention_fwd(qkv, num_heads)[0]


def _fused_scale(qkv, num_heads):
    return (qkv.shape[-1] // (3 * num_heads)) ** -0.5  # head width ** -0.5


def _fused_attention_fwd(qkv, num_heads):
    out, exp, inv_sum = cpu_kernels.attention_qkv_forward(
        qkv, num_heads, _fused_scale(qkv, num_heads)
    )
    first_row = exp[:, :, 0, :] * inv_sum[:, :, 0, :]
    return (out, first_row), (qkv, out, exp, inv_sum)


def _fused_attention_bwd(num_heads, residuals, cotangents):
    qkv, out, exp, inv_sum = residuals
    scale = _fused_scale(qkv, num_heads)
    d_qkv = cpu_kernels.attention_qkv_backward(
        qkv, out, exp, inv_sum, cotangents[0], num_heads, scale
    )
    return (d_qkv,)


fused_attention.defvjp(_fused_attention_fwd, _fused_attention_bwd)


_INV_SQRT2_NEXT = float(np.nextafter(np.float32(2**-0.5), np.float32(1.0)))


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU ``x·Φ(x) = ½·x·(1 + erf(x/√2))``, timm's ``nn.GELU`` formula.

    ``jax.nn.gelu(approximate=False)`` uses ``erfc`` (more accurate far in the negative tail),
    whose XLA CPU kernel is slower than ``erf``'s. The backward pass ``Φ(x) + x·φ(x)`` is written
    out so that only ``x`` is kept from the forward pass.
    """
    return _gelu_fwd(x)[0]


def _gelu_fwd(x):
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(2**-0.5, x.dtype))), x


def _gelu_bwd(x, g):
    # The forward pass's 1/√2 plus one float32 ulp: with the same constant, XLA merges the two
    # erf computations and keeps erf's output as one more activation-sized array between the
    # passes; recomputing it inside the backward fusion costs less than that memory traffic.
    cdf = 0.5 * (1.0 + jax.lax.erf(x * jnp.asarray(_INV_SQRT2_NEXT, x.dtype)))
    pdf = jnp.exp(-0.5 * x * x) * jnp.asarray((2 * math.pi) ** -0.5, x.dtype)
    return (g * (cdf + x * pdf),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


class Mlp(nn.Module):
    """``fc1 → exact GELU → fc2``; ``[B, N, D] → [B, N, D]``."""

    mlp_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        x = _dense(self.mlp_dim, "fc1", self.dtype)(x)
        x = gelu(x)  # timm's nn.GELU is the exact (erf) form
        return _dense(d, "fc2", self.dtype)(x)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    Input ``[B, N, D]`` (any N). Returns ``(x [B, N, D] in dtype, cls_attention [B, N] float32 or
    None)``; see :class:`Attention`. With ``select``, only the selected positions go through the
    residual, the attention output, ``proj`` and the MLP: returns ``(x [B, k, D], cls_attention
    [B, N], aux)`` with ``x[b, j]`` the full output at ``positions[b, j]``.
    """

    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, return_cls_attention: bool = False, select: Selector | None = None
    ) -> tuple:
        attn = Attention(self.num_heads, self.dtype, name="attn")
        out = attn(_layer_norm("norm1", self.dtype)(x), return_cls_attention, select)
        aux = None
        if select is not None:
            y, cls_attention, (positions, aux) = out
            x = jnp.take_along_axis(x, positions[:, :, None], axis=1)  # [B, k, D]
        else:
            y, cls_attention = out
        x = x + y
        x = x + Mlp(self.mlp_dim, self.dtype, name="mlp")(_layer_norm("norm2", self.dtype)(x))
        return (x, cls_attention) if select is None else (x, cls_attention, aux)


def _check_split(config: ViTConfig, split_index: int) -> None:
    if not 1 <= split_index <= config.depth - 1:
        raise ValueError(
            f"split_index must be in 1..{config.depth - 1} for {config.name} (depth "
            f"{config.depth}): the client and the server each need at least one block; got "
            f"{split_index}."
        )


# ------------------------------------------------------------------------------------------------
# Client and server
# ------------------------------------------------------------------------------------------------


class Client(nn.Module):
    """Embedding and blocks ``0..split_index-1``.

    ``__call__(images [B, H, W, C] float, normalised)`` returns ``(tokens [B, N, D] in dtype,
    scores [B, N] float32)``: ``scores`` is the CLS query row of the last client block's softmax
    attention averaged over heads (each row sums to 1; CLS→CLS included). It is wrapped in
    ``stop_gradient``: ADC only ranks and clusters with it (ADC_SPEC §2.1).

    ``__call__(images, select)`` with a :data:`Selector` computes only what is used downstream
    when each sample keeps ``k`` of its ``N`` output tokens chosen from the scores (ADC): the last
    block computes keys and values for all tokens and the CLS attention row, calls
    ``select(scores) -> (positions [B, k], aux)``, then computes queries, attention, ``proj``,
    residual and MLP only at those positions (most of the block, forward and backward, shrinks
    by ``1 − k/N``). Returns ``(tokens [B, k, D],
    scores [B, N], aux)`` with ``tokens[b, j]`` equal (to float rounding) to the full output at
    ``positions[b, j]``, gradients included.
    """

    config: ViTConfig
    split_index: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, select: Selector | None = None) -> tuple:
        cfg = self.config
        _check_split(cfg, self.split_index)
        expected = (cfg.image_size, cfg.image_size, cfg.in_chans)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"{cfg.name} expects images [B, {', '.join(map(str, expected))}] "
                f"(NHWC); got {tuple(images.shape)}."
            )
        x = PatchEmbed(cfg.patch_size, cfg.width, self.dtype, name="patch_embed")(images)
        cls = self.param("cls_token", _CLS_INIT, (1, 1, cfg.width), jnp.float32)
        pos = self.param("pos_embed", _POS_INIT, (1, cfg.seq_len, cfg.width), jnp.float32)
        # DeiT v1: prepend CLS, then add the N-entry position embedding (CLS has a position too).
        cls = jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, cfg.width))
        x = add_over_batch(jnp.concatenate([cls, x], axis=1), pos.astype(self.dtype))
        scores = aux = None
        for i in range(self.split_index):
            last = i == self.split_index - 1
            block = Block(cfg.num_heads, cfg.mlp_dim, self.dtype, name=f"blocks_{i}")
            if last and select is not None:
                x, scores, aux = block(x, return_cls_attention=True, select=select)
            else:
                x, scores = block(x, return_cls_attention=last)
        scores = jax.lax.stop_gradient(scores)
        return (x, scores) if select is None else (x, scores, aux)


class Server(nn.Module):
    """Blocks ``split_index..L-1``, final LayerNorm and the head on token 0.

    ``__call__(tokens [B, n, D])`` with any ``1 <= n <= N`` and CLS at index 0 (positions are
    embedded on the client, so dropping or reordering the other tokens needs nothing here).
    Returns ``logits [B, num_classes]`` float32.
    """

    config: ViTConfig
    split_index: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.config
        _check_split(cfg, self.split_index)
        if tokens.ndim != 3 or tokens.shape[-1] != cfg.width or tokens.shape[1] < 1:
            raise ValueError(
                f"{cfg.name} server expects tokens [B, n >= 1, {cfg.width}]; got "
                f"{tuple(tokens.shape)}."
            )
        x = tokens.astype(self.dtype)
        for i in range(self.split_index, cfg.depth):
            x, _ = Block(cfg.num_heads, cfg.mlp_dim, self.dtype, name=f"blocks_{i}")(x)
        # Only the CLS token feeds the head; the final norm is per token, so apply it to CLS only.
        x = _layer_norm("norm", self.dtype)(x[:, 0])
        logits = _dense(cfg.num_classes, "head", self.dtype)(x)
        return logits.astype(jnp.float32)


def init_head(key: jax.Array, width: int, num_classes: int) -> Params:
    """Fresh head parameters ``{kernel [D, C], bias [C]}`` float32, initialised as in the server."""
    return {
        "kernel": _DENSE_INIT(key, (width, num_classes), jnp.float32),
        "bias": jnp.zeros((num_classes,), jnp.float32),
    }


# ------------------------------------------------------------------------------------------------
# The pair
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SplitViT:
    """A ViT cut after block ``split_index``: config, the two modules and helpers (not a Module).

    Frozen and hashable, so it can be a static argument of ``jax.jit``.
    """

    config: ViTConfig
    split_index: int
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        _check_split(self.config, self.split_index)

    @property
    def client(self) -> Client:
        return Client(self.config, self.split_index, self.dtype)

    @property
    def server(self) -> Server:
        return Server(self.config, self.split_index, self.dtype)

    @property
    def seq_len(self) -> int:
        """N, CLS included."""
        return self.config.seq_len

    @property
    def width(self) -> int:
        """D."""
        return self.config.width

    @property
    def depth(self) -> int:
        """L."""
        return self.config.depth

    def init(self, key: jax.Array) -> dict[str, Params]:
        """``{"client": params, "server": params}``, float32, each half from its own subkey."""
        client_key, server_key = jax.random.split(key)
        init_client, init_server = _init_fns(self.config, self.split_index)
        return {"client": init_client(client_key), "server": init_server(server_key)}

    def apply_client(
        self, client_params: Params, images: jax.Array, select: Selector | None = None
    ) -> tuple:
        """``images [B, H, W, C] → (tokens [B, N, D], scores [B, N] float32)``.

        With ``select`` (see :class:`Client`): ``(tokens [B, k, D], scores [B, N], aux)``.
        """
        return self.client.apply({"params": client_params}, images, select)

    def apply_server(self, server_params: Params, tokens: jax.Array) -> jax.Array:
        """``tokens [B, n, D] → logits [B, num_classes] float32``."""
        return self.server.apply({"params": server_params}, tokens)

    def apply_full(self, params: dict[str, Params], images: jax.Array) -> jax.Array:
        """Uncompressed client → server: ``images [B, H, W, C] → logits [B, C]`` float32."""
        tokens, _ = self.apply_client(params["client"], images)
        return self.apply_server(params["server"], tokens)


@functools.cache
def _init_fns(config: ViTConfig, split_index: int):
    """Jitted ``key → params`` for each half, compiled once per architecture and split.

    Compiling the many threefry draws of an init takes seconds on CPU; caching makes repeated
    inits (seeds, tests) cheap. Parameters do not depend on the compute dtype or the token count.
    """
    images = jnp.zeros((1, config.image_size, config.image_size, config.in_chans), jnp.float32)
    tokens = jnp.zeros((1, 1, config.width), jnp.float32)
    client, server = Client(config, split_index), Server(config, split_index)
    return (
        jax.jit(lambda key: client.init(key, images)["params"]),
        jax.jit(lambda key: server.init(key, tokens)["params"]),
    )


def make_model(
    name: str,
    *,
    split_index: int,
    num_classes: int | None = None,
    image_size: int | None = None,
    dtype: Dtype = jnp.float32,
) -> SplitViT:
    """The registered model ``name`` cut after block ``split_index`` (1..L-1)."""
    config = get_model_config(name, num_classes=num_classes, image_size=image_size)
    return SplitViT(config, split_index, dtype)
