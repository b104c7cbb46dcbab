"""BottleNet++ adapted to ViTs: a per-token autoencoder across the cut (Shao & Zhang 2020).

The client's encoder maps every token ``D → h → D′`` and the server's decoder maps it back
``D′ → h → D`` (Dense layers, ReLU between), trained jointly with the model. ``D′ = round(c·D)``
and the hidden width ``h = round((D + D′)/2)`` lies midway (both rounded half up, at least 1).
ξ = D′/D in both directions: the gradient w.r.t. the code has the code's shape.

The reference decoder ends with a ReLU, which forces the server's residual stream to be
non-negative; ``relu_output=True`` reproduces it (paper-faithful), the default ends linear.
``weight_init="torch"`` draws weights and biases as PyTorch's ``nn.Linear`` does (uniform in
``±1/√fan_in``), as the reference; the default ``"flax"`` uses LeCun-normal weights and zero
biases. (The reference floors the hidden width, ``⌊(D + D′)/2⌋``; rounding half up differs by one
unit when ``D + D′`` is odd, e.g. 106 instead of 105 at ``D = 192``, ``c = 0.1``.)
The autoencoder is part of the model, so it stays on at evaluation (``active_at_eval``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from adc_jax.methods.core import CutShape, Method, Payload, label_dtype


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


INITS = ("flax", "torch")


def _torch_uniform(fan_in: int):
    """PyTorch ``nn.Linear``'s default for weights and biases: ``U(±1/√fan_in)``."""
    bound = fan_in**-0.5
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound
    )


def _dense(features: int, fan_in: int, init: str, name: str) -> nn.Dense:
    if init == "torch":
        uniform = _torch_uniform(fan_in)
        return nn.Dense(features, kernel_init=uniform, bias_init=uniform, name=name)
    return nn.Dense(features, name=name)


class TokenMLP(nn.Module):
    """``Dense(hidden) → ReLU → Dense(features)`` on the last axis, then ReLU if asked."""

    hidden: int
    features: int
    relu_output: bool = False
    weight_init: str = "flax"  # flax (LeCun normal, zero bias) | torch (nn.Linear's uniform)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(_dense(self.hidden, x.shape[-1], self.weight_init, "fc1")(x))
        x = _dense(self.features, self.hidden, self.weight_init, "fc2")(x)
        return nn.relu(x) if self.relu_output else x


@dataclasses.dataclass(frozen=True)
class BottleNet(Method):
    """Per-token MLP autoencoder: client encoder ``D → h → D′``, server decoder ``D′ → h → D``.

    Parameters: ``{"client": encoder params, "server": decoder params}`` (Flax ``fc1``/``fc2``
    Dense trees). Payload: activations ``[B, N, D′]`` codes in the tokens' dtype, labels ``[B]``
    indices.
    """

    name: ClassVar[str] = "bottlenet"
    active_at_eval: ClassVar[bool] = True

    compression: float = 0.25  # c = D′/D
    relu_output: bool = False  # True: the reference's final ReLU on the decoder
    weight_init: str = "flax"  # flax | torch (the reference's PyTorch nn.Linear initialisation)

    def widths(self, width: int) -> tuple[int, int]:
        """``(h, D′)`` for a token width ``D``."""
        code = max(1, _round_half_up(self.compression * width))
        return max(1, _round_half_up((width + code) / 2)), code

    def encoder(self, width: int) -> TokenMLP:
        hidden, code = self.widths(width)
        return TokenMLP(hidden, code, weight_init=self.weight_init)

    def decoder(self, width: int) -> TokenMLP:
        hidden, _ = self.widths(width)
        return TokenMLP(hidden, width, self.relu_output, self.weight_init)

    def validate(self, cut: CutShape) -> None:
        if not 0 < self.compression <= 1:
            raise ValueError(
                f"BottleNet++'s compression c ({self.compression}) must be in (0, 1]: "
                "the code width D′ = round(c·D) is at most the token width D."
            )
        if self.weight_init not in INITS:
            raise ValueError(
                f"Unknown BottleNet++ weight_init {self.weight_init!r} (method.weight_init); "
                f"expected one of {INITS}."
            )

    def init(self, key, cut):
        self.validate(cut)
        enc_key, dec_key = jax.random.split(key)
        _, code = self.widths(cut.width)
        enc = self.encoder(cut.width).init(enc_key, jnp.zeros((1, 1, cut.width), jnp.float32))
        dec = self.decoder(cut.width).init(dec_key, jnp.zeros((1, 1, code), jnp.float32))
        return {"client": enc["params"], "server": dec["params"]}, {}

    def encode(self, params, state, tokens, scores, labels, key, *, num_classes, axis_name=None):
        del state, scores, key, axis_name  # per token: nothing couples samples
        code = self.encoder(tokens.shape[-1]).apply({"params": params}, tokens)
        # Sent in the tokens' dtype (the float32 parameters would promote bfloat16 tokens).
        code = code.astype(tokens.dtype)
        return Payload(code, labels.astype(label_dtype(num_classes)), {})

    def decode(self, params, state, payload):
        del state
        width = params["fc2"]["kernel"].shape[-1]  # D, from the decoder's own output layer
        return self.decoder(width).apply({"params": params}, payload.activations)

    # Encoder → decoder with no channel in between: the autoencoder is part of the model.
    def eval_encode(self, params, state, tokens):
        del state
        return self.encoder(tokens.shape[-1]).apply({"params": params}, tokens)

    def eval_decode(self, params, state, sent):
        return self.decode(params, state, Payload(sent, jnp.zeros(()), {}))

    def xi_paper(self, cut: CutShape) -> float:
        return self.widths(cut.width)[1] / cut.width

    @classmethod
    def knobs_for_xi(cls, xi, cut):
        """``c = ξ`` (the achieved ξ is ``round(ξ·D)/D``)."""
        del cut
        return {"compression": float(xi)}


__all__ = ["BottleNet", "TokenMLP"]
