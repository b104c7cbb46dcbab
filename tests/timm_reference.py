"""A plain NumPy (float64) transcription of timm's DeiT v1 forward, for parity tests.

Written against timm's ``VisionTransformer`` (``global_pool='token'``, class token, no
``norm_pre``/``fc_norm``/layer scale) and its tensor names, independently of ``adc_jax``'s layouts:
it reads a timm state dict directly, so a wrong transpose or name in the converter shows up as a
logits mismatch.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.special import erf


@dataclasses.dataclass(frozen=True)
class Arch:
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    image_size: int
    in_chans: int
    num_classes: int

    @property
    def seq_len(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


def random_state(arch: Arch, seed: int = 0, qkv_gain: float = 2.0) -> dict[str, np.ndarray]:
    """A random float32 checkpoint with timm's exact names and shapes.

    Scales are chosen so that nothing is trivial: LayerNorm weights away from 1, non-zero biases,
    peaked attention (so CLS scores differ clearly between tokens).
    """
    rng = np.random.default_rng(seed)
    d, m, p, c = arch.width, arch.mlp_dim, arch.patch_size, arch.in_chans

    def w(*shape, fan_in, gain=1.0):
        return gain * rng.standard_normal(shape) / np.sqrt(fan_in)

    def b(n, scale=0.1):
        return scale * rng.standard_normal(n)

    state = {
        "cls_token": rng.standard_normal((1, 1, d)),
        "pos_embed": 0.5 * rng.standard_normal((1, arch.seq_len, d)),
        "patch_embed.proj.weight": w(d, c, p, p, fan_in=c * p * p),
        "patch_embed.proj.bias": b(d),
    }
    for i in range(arch.depth):
        t = f"blocks.{i}"
        state |= {
            f"{t}.norm1.weight": 1 + b(d, 0.2),
            f"{t}.norm1.bias": b(d),
            f"{t}.attn.qkv.weight": w(3 * d, d, fan_in=d, gain=qkv_gain),
            f"{t}.attn.qkv.bias": b(3 * d),
            f"{t}.attn.proj.weight": w(d, d, fan_in=d),
            f"{t}.attn.proj.bias": b(d),
            f"{t}.norm2.weight": 1 + b(d, 0.2),
            f"{t}.norm2.bias": b(d),
            f"{t}.mlp.fc1.weight": w(m, d, fan_in=d),
            f"{t}.mlp.fc1.bias": b(m),
            f"{t}.mlp.fc2.weight": w(d, m, fan_in=m),
            f"{t}.mlp.fc2.bias": b(d),
        }
    state |= {
        "norm.weight": 1 + b(d, 0.2),
        "norm.bias": b(d),
        "head.weight": w(arch.num_classes, d, fan_in=d),
        "head.bias": b(arch.num_classes),
    }
    return {k: v.astype(np.float32) for k, v in state.items()}


def _layer_norm(x, weight, bias, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * weight + bias


def _linear(x, state, name):
    return x @ state[f"{name}.weight"].astype(np.float64).T + state[f"{name}.bias"]


def embed(state, images_nhwc: np.ndarray) -> np.ndarray:
    """``images [B, H, W, C] → tokens [B, N, D]``: conv patch embedding, CLS, position embedding."""
    x = np.asarray(images_nhwc, np.float64).transpose(0, 3, 1, 2)  # NCHW, as torch
    w = state["patch_embed.proj.weight"].astype(np.float64)  # [D, C, p, p]
    d, _, p, _ = w.shape
    bsz, c, h, wd = x.shape
    patches = x.reshape(bsz, c, h // p, p, wd // p, p)
    # conv with kernel = stride = p: out[b, o, i, j] = Σ_{c,u,v} w[o,c,u,v]·x[b,c,i·p+u,j·p+v]
    out = np.einsum("bciujv,ocuv->boij", patches, w) + state["patch_embed.proj.bias"][:, None, None]
    x = out.reshape(bsz, d, -1).transpose(0, 2, 1)  # flatten(2).transpose(1, 2)
    cls = np.broadcast_to(state["cls_token"], (bsz, 1, d))
    return np.concatenate([cls, x], axis=1) + state["pos_embed"]


def block(state, i: int, x: np.ndarray, num_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """Block ``i`` on ``x [B, n, D]``; returns ``(x, attention probs [B, H, n, n])``."""
    t = f"blocks.{i}"
    bsz, n, d = x.shape
    hd = d // num_heads
    y = _layer_norm(x, state[f"{t}.norm1.weight"], state[f"{t}.norm1.bias"])
    qkv = _linear(y, state, f"{t}.attn.qkv").reshape(bsz, n, 3, num_heads, hd)
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each [B, H, n, hd]
    logits = (q * hd**-0.5) @ k.transpose(0, 1, 3, 2)
    logits -= logits.max(-1, keepdims=True)
    attn = np.exp(logits)
    attn /= attn.sum(-1, keepdims=True)
    y = (attn @ v).transpose(0, 2, 1, 3).reshape(bsz, n, d)
    x = x + _linear(y, state, f"{t}.attn.proj")
    y = _layer_norm(x, state[f"{t}.norm2.weight"], state[f"{t}.norm2.bias"])
    y = _linear(y, state, f"{t}.mlp.fc1")
    y = 0.5 * y * (1 + erf(y / np.sqrt(2)))  # nn.GELU(): exact erf form
    x = x + _linear(y, state, f"{t}.mlp.fc2")
    return x, attn


def head(state, x: np.ndarray) -> np.ndarray:
    """Final norm and head on the CLS token: ``[B, n, D] → [B, C]``."""
    x = _layer_norm(x, state["norm.weight"], state["norm.bias"])
    return _linear(x[:, 0], state, "head")


def forward(state, images_nhwc, num_heads: int):
    """Full forward: ``(logits [B, C], tokens after each block, attention probs of each block)``."""
    x = embed(state, images_nhwc)
    tokens, attns = [], []
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for i in range(depth):
        x, a = block(state, i, x, num_heads)
        tokens.append(x)
        attns.append(a)
    return head(state, x), tokens, attns


def server_forward(state, x, start: int, num_heads: int) -> np.ndarray:
    """Blocks ``start..L-1``, norm and head on ``x [B, n, D]`` (any n); ``[B, C]``."""
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    x = np.asarray(x, np.float64)
    for i in range(start, depth):
        x, _ = block(state, i, x, num_heads)
    return head(state, x)
