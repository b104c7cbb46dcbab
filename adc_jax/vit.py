"""ViT / DeiT in Flax Linen, cut in two for split learning (client and server halves).

The model is timm's ``VisionTransformer`` as used by DeiT v1 (class token, learned absolute position
embedding added after the class token is prepended, pre-norm blocks, classification on token 0),
split after block ``l = split_index``:

* :class:`Client`: patch embedding, CLS token, position embedding, blocks ``0..l-1``. Returns the
  tokens ``[B, N, D]`` and the last client block's head-averaged CLS attention row ``[B, N]`` (the
  ADC scores, computed in the same forward pass).
* :class:`Server`: blocks ``l..L-1``, final LayerNorm, linear head on token 0. Accepts any token
  count ``1 <= n <= N`` (the ADC payload keeps ``k < N`` tokens, CLS first).
* :class:`SplitViT`: both halves, with ``init`` and ``apply_full``.

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

One code path for every backend, differentiated by JAX: Flax's layers and one written-out
attention (the last client block needs its CLS row), cuDNN's fused kernel elsewhere on a GPU.
Parameters are float32; ``dtype`` is the compute dtype (residual stream, matrix products, the
tokens sent across the cut), while attention logits and softmax, LayerNorm statistics, scores,
final norm, head and logits are float32 (``docs/mixed_precision.md``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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
        problems = [
            self.image_size % self.patch_size
            and f"image size {self.image_size} is not divisible by the patch size "
            f"{self.patch_size} (e.g. {self.image_size - self.image_size % self.patch_size})",
            self.width % self.num_heads
            and f"width {self.width} is not divisible by num_heads {self.num_heads}",
            (len(self.mean), len(self.std)) != (self.in_chans,) * 2
            and f"mean/std need one entry per input channel ({self.in_chans})",
            self.num_classes < 1 and f"num_classes must be >= 1, got {self.num_classes}",
        ]
        if any(problems):
            raise ValueError(f"{self.name}: " + "; ".join(p for p in problems if p) + ".")

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
        name, 224, 16, 3, width, depth, num_heads, mlp_dim, 1000, IMAGENET_MEAN, IMAGENET_STD
    )


def _fashion_mnist(name, depth) -> ViTConfig:
    return ViTConfig(name, 28, 4, 1, 64, depth, 2, 256, 10, FASHION_MNIST_MEAN, FASHION_MNIST_STD)


# ViTConfig's fields in order: name, image_size, patch_size, in_chans, width, depth, num_heads,
# mlp_dim, num_classes, mean, std.
MODELS: dict[str, ViTConfig] = {
    c.name: c
    for c in (
        # timm deit_*_patch16_224.fb_in1k: ImageNet-1k, ImageNet mean/std.
        _imagenet("deit_tiny_patch16_224", 192, 12, 3, 768),
        _imagenet("deit_small_patch16_224", 384, 12, 6, 1536),
        _imagenet("deit_base_patch16_224", 768, 12, 12, 3072),
        # Small ViTs for Fashion-MNIST (the project's real-data checks on a CPU); the 8-block one
        # cut after block 2 splits at a quarter of the depth, as the paper cuts DeiT after block 3.
        _fashion_mnist("vit_mini_patch4_28", depth=4),
        _fashion_mnist("vit_mini_d8_patch4_28", depth=8),
        # Tiny variant for fast CPU tests (N = 17 tokens).
        ViTConfig("vit_test_patch4_16", 16, 4, 3, 32, 4, 2, 64, 10, (0.5,) * 3, (0.5,) * 3),
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
    changes = dict(num_classes=num_classes, image_size=image_size)
    return dataclasses.replace(MODELS[name], **{k: v for k, v in changes.items() if v is not None})


ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")

Selector = Callable[[jax.Array], tuple[jax.Array, Any]]
"""``select(scores [B, N] float32) -> (positions [B, k] int32, aux)``: which query positions of the
last client block to compute (see :class:`Client`); ``aux`` is passed through untouched."""


class Dense(nn.Module):
    """``nn.Dense`` (same parameters: ``kernel [in, out]``, ``bias [out]``, float32) applied to
    the tokens as one ``[rows, in]`` matrix, so that the weight gradient is one plain matrix
    product (over ``[B, N, D]`` XLA's CPU backend makes a transposed copy first: 7 % of a
    DeiT-Tiny step). The reshape is free everywhere. ``columns`` computes only those output
    features (the queries alone, or the keys and values alone, of a fused projection).
    """

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, columns: slice = slice(None)) -> jax.Array:
        kernel = self.param("kernel", _DENSE_INIT, (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        kernel, bias = kernel[:, columns].astype(self.dtype), bias[columns].astype(self.dtype)
        y = x.reshape(-1, x.shape[-1]).astype(self.dtype) @ kernel + bias
        return y.reshape(*x.shape[:-1], kernel.shape[1])


def _dense(features: int, name: str, dtype: Dtype) -> Dense:
    return Dense(features, dtype, name=name)


# LayerNorm and GELU are recomputed in the backward pass from their inputs (``nn.remat``,
# ``jax.checkpoint``). Differentiated as written, each keeps several arrays of its input's size
# from the forward pass for the backward one (LayerNorm: the centred and the normalised input;
# GELU: erf's value and its derivative, at the MLP's width); recomputed, it keeps its input only.
# Less memory, and fewer bytes written and read, for a few elementwise operations: on the CPU a
# DeiT-Tiny step 1–6 % faster and its peak memory 7–36 % lower (docs/performance.md).
_LayerNorm = nn.remat(nn.LayerNorm)


def _layer_norm(name: str, dtype: Dtype) -> nn.Module:
    # Two-pass variance, as timm's (PyTorch's) LayerNorm; statistics in float32 for any dtype.
    return _LayerNorm(epsilon=LN_EPS, dtype=dtype, use_fast_variance=False, name=name)


@jax.checkpoint
def gelu(x: jax.Array) -> jax.Array:
    """timm's exact GELU ``½·x·(1 + erf(x/√2))``: ``jax.nn.gelu(approximate=False)`` by way of
    ``erf`` rather than ``erfc`` (which is slower, and more accurate only where both are 0)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(2**-0.5, x.dtype)))


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``softmax(q kᵀ / √hd) v`` per head, and row 0 of the softmax averaged over heads.

    ``q [B, n, H, hd]``, ``k, v [B, N, H, hd]`` → ``(out [B, n, H, hd] in v's dtype, [B, N]
    float32)``; logits, softmax and its row sums in float32. Normalised as FlashAttention does:
    ``exp(logits − max)`` multiplies ``v`` and the ``[n, hd]`` result is divided by the row sums,
    so the ``[n, N]`` matrix is never normalised itself, one pass fewer over it forward and
    backward (a DeiT-Tiny training step 8 % faster on the CPU than ``jax.nn.softmax`` then the
    product, B = 64). The row is what ADC clusters on; where it is not used, XLA drops it.
    """
    # Heads as a batch axis, [B, H, n, hd]: the products are then plain batched matrix products
    # (with the heads in the middle, XLA's CPU backend transposed inside each of them, 35 % slower).
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)  # exact for every DeiT's head width
    logits = jnp.einsum("bhqd,bhkd->bhqk", q * scale, k, preferred_element_type=jnp.float32)
    exp = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
    sums = exp.sum(axis=-1, keepdims=True)  # [B, H, n, 1]
    out = jnp.einsum("bhqk,bhkd->bhqd", exp.astype(v.dtype), v, preferred_element_type=jnp.float32)
    cls_row = (exp[:, :, 0] / sums[:, :, 0]).mean(axis=1)
    return (out / sums).astype(v.dtype).transpose(0, 2, 1, 3), cls_row


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, implementation: str = "auto"
) -> jax.Array:
    """:func:`attention`'s output alone, from the implementation asked for.

    ``implementation``: ``"xla"`` (:func:`attention`: any backend and dtype), ``"cudnn"``
    (cuDNN's fused flash attention through ``jax.nn.dot_product_attention``: CUDA GPUs, 16-bit
    dtypes) or ``"auto"``: cuDNN on a GPU in a 16-bit dtype unless JAX refuses it while tracing,
    else XLA. (``jax.nn.dot_product_attention``'s own default is its XLA form on every backend,
    GPUs included.)
    """
    gpu_16bit = jax.default_backend() == "gpu" and jnp.dtype(q.dtype).itemsize == 2
    if implementation == "auto" and gpu_16bit:
        try:
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
        except (NotImplementedError, RuntimeError):
            pass
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    return attention(q, k, v)[0]


class Attention(nn.Module):
    """Multi-head self-attention with timm's fused ``qkv`` projection (output columns ``[q heads,
    k heads, v heads]``). ``[B, N, D] → (out [B, N, D], cls_attention [B, N] float32 or None)``:
    row 0 (the CLS query) of the softmax averaged over heads, when asked for.

    With ``select``: the CLS row first (no gradient), ``positions, aux = select(cls_attention)``,
    then attention and ``proj`` only for the queries at ``positions [B, k]`` (keys and values of
    all N tokens): ``(out [B, k, D], cls_attention, (positions, aux))``.
    """

    num_heads: int
    dtype: Dtype = jnp.float32
    implementation: str = "auto"

    @nn.compact
    def __call__(
        self, x: jax.Array, return_cls_attention: bool = False, select: Selector | None = None
    ) -> tuple:
        d = x.shape[-1]
        heads = lambda t: t.reshape(*t.shape[:2], self.num_heads, -1)  # [B, n, H, hd]
        qkv = _dense(3 * d, "qkv", self.dtype)
        cls_attention = selection = None
        if select is not None:
            # Keys and values of every token; queries only where they are used: CLS's for the
            # row, then the kept tokens'.
            k, v = map(heads, jnp.split(qkv(x, slice(d, None)), 2, axis=-1))
            q_cls = heads(qkv(x[:, :1], slice(0, d)))
            cls_attention = attention(*jax.lax.stop_gradient((q_cls, k, v)))[1]
            positions, aux = select(cls_attention)
            selection = (positions, aux)
            kept = jnp.take_along_axis(x, positions[:, :, None], axis=1)  # [B, k, D]
            out = attention(heads(qkv(kept, slice(0, d))), k, v)[0]
        else:
            q, k, v = map(heads, jnp.split(qkv(x), 3, axis=-1))
            if return_cls_attention:
                out, cls_attention = attention(q, k, v)
            else:
                out = dot_product_attention(q, k, v, self.implementation)
        out = _dense(d, "proj", self.dtype)(out.reshape(*out.shape[:2], d))
        return (out, cls_attention) if selection is None else (out, cls_attention, selection)


class Mlp(nn.Module):
    """``fc1 → exact GELU → fc2``; ``[B, N, D] → [B, N, D]``."""

    mlp_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = _dense(self.mlp_dim, "fc1", self.dtype)(x)
        y = gelu(y)
        return _dense(x.shape[-1], "fc2", self.dtype)(y)


class Block(nn.Module):
    """Pre-norm block ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``: ``[B, N, D] → (x [B, N, D],
    cls_attention or None)`` (:class:`Attention`). With ``select``, only the selected positions go
    through the residual and the MLP: ``(x [B, k, D], cls_attention [B, N], aux)``.
    """

    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(
        self, x: jax.Array, return_cls_attention: bool = False, select: Selector | None = None
    ) -> tuple:
        attn = Attention(self.num_heads, self.dtype, self.attention, name="attn")
        y, cls_attention, *selection = attn(
            _layer_norm("norm1", self.dtype)(x), return_cls_attention, select
        )
        if selection:
            positions, aux = selection[0]
            x = jnp.take_along_axis(x, positions[:, :, None], axis=1)  # [B, k, D]
        x = x + y
        x = x + Mlp(self.mlp_dim, self.dtype, name="mlp")(_layer_norm("norm2", self.dtype)(x))
        return (x, cls_attention) if select is None else (x, cls_attention, aux)


def _block(cfg: ViTConfig, index: int, dtype: Dtype, attention: str) -> Block:
    return Block(cfg.num_heads, cfg.mlp_dim, dtype, attention, name=f"blocks_{index}")


def _check_split(config: ViTConfig, split_index: int) -> None:
    if not 1 <= split_index <= config.depth - 1:
        raise ValueError(
            f"split_index must be in 1..{config.depth - 1} for {config.name} (depth "
            f"{config.depth}): the client and the server each need at least one block; got "
            f"{split_index}."
        )


class Client(nn.Module):
    """Embedding and blocks ``0..split_index-1``.

    ``__call__(images [B, H, W, C] float, normalised)`` returns ``(tokens [B, N, D] in dtype,
    scores [B, N] float32)``: ``scores`` is the CLS query row of the last client block's softmax
    attention averaged over heads (each row sums to 1; CLS→CLS included). It is wrapped in
    ``stop_gradient``: ADC only ranks and clusters with it.

    ``__call__(images, select)`` with a :data:`Selector` computes only what is used when each
    sample keeps ``k`` of its ``N`` output tokens, chosen from the scores (ADC): the last block
    computes keys, values and the CLS row for all tokens, calls ``select(scores) -> (positions
    [B, k], aux)``, then attention, ``proj``, residual and MLP only at those positions. Returns
    ``(tokens [B, k, D], scores [B, N], aux)``, ``tokens[b, j]`` equal (to rounding) to the full
    output at ``positions[b, j]``, gradients included.
    """

    config: ViTConfig
    split_index: int
    dtype: Dtype = jnp.float32
    attention: str = "auto"

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
        # timm's patch_embed.proj: a convolution with kernel = stride = patch size; patches come
        # out in row-major grid order, like timm's flatten(2).
        p = (cfg.patch_size,) * 2
        conv = dict(dtype=self.dtype, kernel_init=_PATCH_INIT, name="patch_embed")
        x = nn.Conv(cfg.width, p, p, "VALID", **conv)(images)
        x = x.reshape(x.shape[0], -1, cfg.width)
        cls = self.param("cls_token", _CLS_INIT, (1, 1, cfg.width), jnp.float32)
        pos = self.param("pos_embed", _POS_INIT, (1, cfg.seq_len, cfg.width), jnp.float32)
        # DeiT v1: prepend CLS, then add the N-entry position embedding (CLS has a position too).
        cls = jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, cfg.width))
        x = jnp.concatenate([cls, x], axis=1) + pos.astype(self.dtype)
        scores = aux = None
        for i in range(self.split_index):
            last = i == self.split_index - 1
            block = _block(cfg, i, self.dtype, self.attention)
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
    Returns ``logits [B, num_classes]`` float32 (the final norm and the head run in float32).
    """

    config: ViTConfig
    split_index: int
    dtype: Dtype = jnp.float32
    attention: str = "auto"

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
            x, _ = _block(cfg, i, self.dtype, self.attention)(x)
        # Only the CLS token feeds the head; the final norm is per token, so apply it to CLS only.
        x = _layer_norm("norm", jnp.float32)(x[:, 0])
        return _dense(cfg.num_classes, "head", jnp.float32)(x)


def init_head(key: jax.Array, width: int, num_classes: int) -> Params:
    """Fresh head parameters ``{kernel [D, C], bias [C]}`` float32, initialised as in the server."""
    return {
        "kernel": _DENSE_INIT(key, (width, num_classes), jnp.float32),
        "bias": jnp.zeros((num_classes,), jnp.float32),
    }


@dataclasses.dataclass(frozen=True)
class SplitViT:
    """A ViT cut after block ``split_index``: the two modules and helpers (not a Module; hashable,
    so it can be a static argument of ``jax.jit``)."""

    config: ViTConfig
    split_index: int
    dtype: Dtype = jnp.float32
    attention: str = "auto"  # see dot_product_attention

    def __post_init__(self):
        _check_split(self.config, self.split_index)
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"attention must be one of {ATTENTION_IMPLEMENTATIONS}; got {self.attention!r}."
            )

    @property
    def client(self) -> Client:
        return Client(self.config, self.split_index, self.dtype, self.attention)

    @property
    def server(self) -> Server:
        return Server(self.config, self.split_index, self.dtype, self.attention)

    seq_len = property(lambda self: self.config.seq_len, doc="N, CLS included.")
    width = property(lambda self: self.config.width, doc="D.")
    depth = property(lambda self: self.config.depth, doc="L.")

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

    Parameters depend on neither the compute dtype nor the token count.
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
    attention: str = "auto",
) -> SplitViT:
    """The registered model ``name`` cut after block ``split_index`` (1..L-1)."""
    config = get_model_config(name, num_classes=num_classes, image_size=image_size)
    return SplitViT(config, split_index, dtype, attention)
