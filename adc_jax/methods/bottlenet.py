"""BottleNet++ adapted to ViTs: a per-token autoencoder across the cut (Shao & Zhang 2020).

The client's encoder maps every token ``D → h → D′`` and the server's decoder maps it back
``D′ → h → D`` (Dense layers, ReLU between), trained jointly with the model. ``D′ = round(c·D)``
and the hidden width ``h = round((D + D′)/2)`` lies midway (both rounded half up, at least 1).
ξ = D′/D in both directions: the gradient w.r.t. the code has the code's shape.

The reference decoder ends with a ReLU, which forces the server's residual stream to be
non-negative; ``relu_output=True`` reproduces it (paper-faithful), the default ends linear.
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


class TokenMLP(nn.Module):
    """``Dense(hidden) → ReLU → Dense(features)`` on the last axis, then ReLU if asked."""

    hidden: int
    features: int
    relu_output: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(self.hidden, name="fc1")(x))
        x = nn.Dense(self.features, name="fc2")(x)
        return nn.relu(x) if self.relu_output else x


@dataclasses.dataclass(frozen=True)
class BottleNet(Method):
    """Per-token MLP autoencoder: client encoder ``D → h → D′``, server decoder ``D′ → h → D``.

    Parameters: ``{"client": encoder params, "server": decoder params}`` (Flax ``fc1``/``fc2``
    Dense trees). Payload: activations ``[B, N, D′]`` float32 codes, labels ``[B]`` indices.
    """

    name: ClassVar[str] = "bottlenet"
    active_at_eval: ClassVar[bool] = True

    compression: float = 0.25  # c = D′/D
    relu_output: bool = False  # True: the reference's final ReLU on the decoder

    def widths(self, width: int) -> tuple[int, int]:
        """``(h, D′)`` for a token width ``D``."""
        code = max(1, _round_half_up(self.compression * width))
        return max(1, _round_half_up((width + code) / 2)), code

    def encoder(self, width: int) -> TokenMLP:
        hidden, code = self.widths(width)
        return TokenMLP(hidden, code)

    def decoder(self, width: int) -> TokenMLP:
        hidden, _ = self.widths(width)
        return TokenMLP(hidden, width, self.relu_output)

    def validate(self, cut: CutShape) -> None:
        if not 0 < self.compression <= 1:
            raise ValueError(
                f"BottleNet++'s compression c ({self.compression}) must be in (0, 1]: "
                "the code width D′ = round(c·D) is at most the token width D."
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


__all__ = ["BottleNet", "TokenMLP"]
