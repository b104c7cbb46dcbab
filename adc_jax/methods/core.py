"""The interface every split-learning compression method implements.

A method decides what the client sends across the cut and how the server reads it:

* ``encode`` (client side, differentiable w.r.t. the client's tokens and its own parameters)
  returns a :class:`Payload`: the ``activations`` the server differentiates its loss against
  (the downlink gradient has their shape), the ``labels`` the server trains on, and any
  non-differentiable ``side`` information (indices, codes, …).
* ``decode`` (server side) turns the payload back into tokens ``[M, n, D]`` for the server blocks.
* ``targets`` gives the server's soft targets ``[M, C]``.
* ``uplink_bytes`` / ``downlink_bytes`` count what crosses the cut, per part, from the payload's
  shapes and dtypes and the link's channel. Activations and their gradients travel in the
  model's compute dtype (:attr:`CutShape.dtype`: float32, or bfloat16 under mixed precision), so
  a bfloat16 model sends half the bytes per value; labels and side information keep their own
  dtypes.
* ``xi_paper`` is the paper-compatible compression ratio, and ``active_at_eval`` says whether the
  method stays on at evaluation (only BottleNet++, whose autoencoder is part of the model);
  ``eval_encode`` / ``eval_decode`` are the client and server halves of ``eval_tokens``.
* ``selector`` (optional, default none) lets a method that keeps only some tokens per sample,
  chosen from the scores (ADC), have the client compute only those in its last block; ``encode``
  then receives the kept tokens and ``selection=``.

Methods are frozen dataclasses (hashable, so they can be static arguments of ``jit``); learned
parameters live in ``init``'s ``{"client": ..., "server": ...}`` tree and fixed state (such as
C3-SL's keys) in its ``state``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from adc_jax.link import Channel, nbytes


class Unreachable(ValueError):
    """A method cannot reach a target ξ with any setting of its knob."""


class Payload(NamedTuple):
    """What the client sends the server in one step (a pytree of arrays)."""

    activations: jax.Array  # differentiated by the server; the gradient comes back in this shape
    labels: jax.Array  # [M] int class indices or [M, C] float soft labels
    side: dict[str, jax.Array]  # non-differentiable side information


@dataclasses.dataclass(frozen=True)
class CutShape:
    """Static sizes at the cut for one client (one program's view of the batch), and the dtype of
    the client's tokens (the model's compute dtype), which the payload's activations keep."""

    batch_size: int  # B seen by this client (the global batch in the default mode)
    seq_len: int  # N, CLS included
    width: int  # D
    num_classes: int  # C
    dtype: Any = jnp.float32  # the tokens' dtype: float32, or bfloat16 under mixed precision


def axis_size(axis_name: str | None) -> int:
    """Number of devices along ``axis_name`` (1 without one); a Python int under pmap."""
    return 1 if axis_name is None else jax.lax.psum(1, axis_name)


def label_dtype(num_classes: int):
    """The smallest unsigned integer type that holds a class index."""
    return jnp.uint8 if num_classes <= 256 else jnp.uint16 if num_classes <= 65536 else jnp.int32


@dataclasses.dataclass(frozen=True)
class Method:
    """Base class: sends the activations as they are (the ``base`` method)."""

    name: ClassVar[str] = "base"
    active_at_eval: ClassVar[bool] = False

    # ---- Parameters and fixed state -----------------------------------------------------------

    def init(self, key: jax.Array, cut: CutShape) -> tuple[dict[str, Any], Any]:
        """Returns ``({"client": params, "server": params}, state)``; both may be empty."""
        del key
        self.validate(cut)
        return {"client": {}, "server": {}}, {}

    def validate(self, cut: CutShape) -> None:
        """Raises ValueError when this method cannot run on ``cut``."""

    def validate_device_batch(self, batch_size: int) -> None:
        """Raises ValueError when one device's share of the batch cannot be encoded.

        For methods that group samples on each device (C3-SL) when one client spans devices.
        """

    # ---- The two sides of the cut ---------------------------------------------------------------

    def encode(
        self,
        params: Any,
        state: Any,
        tokens: jax.Array,
        scores: jax.Array,
        labels: jax.Array,
        key: jax.Array,
        *,
        num_classes: int,
        axis_name: str | None = None,
    ) -> Payload:
        """Client side. ``tokens [B, N, D]``, ``scores [B, N]``, ``labels [B] int``.

        ``axis_name`` is set when one client's batch is spread over devices (each call sees its
        slice); methods whose encoding couples samples reduce over it.
        """
        del params, state, scores, key, axis_name
        return Payload(tokens, labels.astype(label_dtype(num_classes)), {})

    def selector(
        self, params: Any, state: Any, key: jax.Array, *, axis_name: str | None = None
    ) -> Callable[[jax.Array], tuple[jax.Array, Any]] | None:
        """Optional hook: ``None`` (the default) or ``select(scores [B, N]) -> (positions, aux)``.

        A method whose encoder only ever uses ``k`` of each sample's ``N`` output tokens, chosen
        from the scores alone, returns a selector; ``positions [B, k] int32`` are those tokens.
        The client then computes its last block only at those positions
        (:class:`adc_jax.vit.Client`), and :meth:`encode` is called with ``tokens [B, k, D]``
        (the outputs at ``positions``) and ``selection=aux``; it must give the payload that the
        full tokens would give. ``key`` and ``axis_name`` are the ones :meth:`encode` gets.
        """
        del params, state, key, axis_name
        return None

    def decode(self, params: Any, state: Any, payload: Payload) -> jax.Array:
        """Server side: tokens ``[M, n, D]`` for the server blocks."""
        del params, state
        return payload.activations

    def targets(self, payload: Payload, num_classes: int) -> jax.Array:
        """Soft targets ``[M, C]`` for the server's cross-entropy."""
        if payload.labels.ndim == 2:
            return payload.labels.astype(jnp.float32)
        return jax.nn.one_hot(payload.labels, num_classes, dtype=jnp.float32)

    def eval_tokens(
        self, client_params: Any, server_params: Any, state: Any, tokens: jax.Array
    ) -> jax.Array:
        """What the server blocks see at evaluation (uncompressed unless ``active_at_eval``)."""
        sent = self.eval_encode(client_params, state, tokens)
        return self.eval_decode(server_params, state, sent)

    def eval_encode(self, params: Any, state: Any, tokens: jax.Array) -> jax.Array:
        """Client side of :meth:`eval_tokens`: what crosses the cut at evaluation."""
        del params, state
        return tokens

    def eval_decode(self, params: Any, state: Any, sent: jax.Array) -> jax.Array:
        """Server side of :meth:`eval_tokens`: tokens for the server blocks from ``sent``."""
        del params, state
        return sent

    # ---- Accounting ------------------------------------------------------------------------

    def xi_paper(self, cut: CutShape) -> float:
        """The paper-compatible compression ratio ξ (see ``docs/method.md``)."""
        del cut
        return 1.0

    @classmethod
    def knobs_for_xi(cls, xi: float, cut: CutShape) -> dict[str, Any]:
        """The inverse of :meth:`xi_paper`: the ``config.method`` fields that bring this
        method's paper ξ closest to ``xi`` on ``cut``.

        Base sends everything whatever the target: ``{}``. Raises :class:`Unreachable` when no
        setting of the knob gets near ``xi``.
        """
        del xi, cut
        return {}

    def uplink_bytes(self, payload: Payload, channel: Channel) -> dict[str, int]:
        """Bytes sent client → server per step, by part. ``payload`` may hold ShapeDtypeStructs."""
        act = payload.activations
        parts = {
            "activations": channel.wire_bytes(act.shape, act.dtype),
            "labels": nbytes(payload.labels.shape, payload.labels.dtype),
        }
        for name, value in sorted(payload.side.items()):
            parts[name] = nbytes(value.shape, value.dtype)
        return parts

    def downlink_bytes(self, payload: Payload, channel: Channel) -> dict[str, int]:
        """Bytes sent server → client per step: the gradient w.r.t. the activations."""
        act = payload.activations
        return {"gradient": channel.wire_bytes(act.shape, act.dtype)}


@dataclasses.dataclass(frozen=True)
class StepCost:
    """What one training step sends across the cut, per direction, in bytes (all clients).

    The dense reference of :attr:`xi_measured` is the ``base`` method on the same cut, in the same
    compute dtype, over an identity link: what this model would send uncompressed. So the measured
    ratio is the method's own compression (ADC's is almost the same for a float32 and a bfloat16
    model, whose bytes are half), while a lossy link (``bfloat16``, ``int8``, ...) counts as
    compression.
    """

    uplink: dict[str, int]  # bytes by part (activations, labels, indices, ...)
    downlink: dict[str, int]
    dense_uplink: int  # the base method's uplink for the same cut and dtype (activations + labels)
    dense_downlink: int
    xi_paper: float  # the paper-compatible ratio (docs/method.md §3, §4)
    batch_size: int  # samples per step over all clients

    @property
    def bytes_up(self) -> int:
        return sum(self.uplink.values())

    @property
    def bytes_down(self) -> int:
        return sum(self.downlink.values())

    @property
    def xi_measured(self) -> float:
        """``(ξ_up + ξ_down) / 2`` from exact bytes, against the uncompressed method."""
        return 0.5 * (self.bytes_up / self.dense_uplink + self.bytes_down / self.dense_downlink)

    @property
    def samples_equivalent(self) -> float:
        """The paper's budget unit per step: ``ξ·B``."""
        return self.xi_paper * self.batch_size


def payload_shapes(method: Method, cut: CutShape) -> Payload:
    """Shapes and dtypes of one client's payload, without computing anything."""
    params, state = jax.eval_shape(lambda k: method.init(k, cut), jax.random.key(0))
    tokens = jax.ShapeDtypeStruct((cut.batch_size, cut.seq_len, cut.width), cut.dtype)
    scores = jax.ShapeDtypeStruct((cut.batch_size, cut.seq_len), jnp.float32)
    labels = jax.ShapeDtypeStruct((cut.batch_size,), jnp.int32)

    def encode(params, state, tokens, scores, labels, key):
        return method.encode(
            params["client"], state, tokens, scores, labels, key, num_classes=cut.num_classes
        )

    return jax.eval_shape(encode, params, state, tokens, scores, labels, jax.random.key(0))


def step_cost(
    method: Method,
    cut: CutShape,
    uplink: Channel = Channel(),
    downlink: Channel = Channel(),
    *,
    clients: int = 1,
) -> StepCost:
    """Exact bytes per step for ``clients`` clients that each see ``cut`` (docs/method.md §3).

    Computed from the shapes and dtypes of what :meth:`Method.encode` returns for one client's
    whole batch of ``cut.dtype`` tokens, with the channels' wire formats; multiplied by the number
    of clients. The dense reference is :class:`StepCost`'s.
    """
    payload = payload_shapes(method, cut)
    dense = payload_shapes(Method(), cut)
    scale = lambda parts: {k: v * clients for k, v in parts.items()}
    return StepCost(
        uplink=scale(method.uplink_bytes(payload, uplink)),
        downlink=scale(method.downlink_bytes(payload, downlink)),
        dense_uplink=clients * sum(Method().uplink_bytes(dense, Channel()).values()),
        dense_downlink=clients * sum(Method().downlink_bytes(dense, Channel()).values()),
        xi_paper=method.xi_paper(cut),
        batch_size=clients * cut.batch_size,
    )
