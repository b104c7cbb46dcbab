"""The split-learning protocol: client forward, server step, client backward (docs/method.md §1).

One training step is three programs that exchange real messages:

1. :func:`client_forward` – client blocks → the method's encoder → the uplink channel. Returns the
   :class:`~adc_jax.methods.Payload` (what crosses the cut) and the client's vjp (a pytree of
   residuals: it can leave ``jit`` and wait for the gradient).
2. :func:`server_step` – decodes the payload, computes the soft-target cross-entropy, updates the
   server, and returns the gradient w.r.t. the payload's activations (what crosses back).
3. :func:`client_backward` – the gradient passes the downlink channel (inside the vjp of
   :func:`adc_jax.link.link`), then the method's encoder and the client blocks; the client updates.

:func:`fused_step` runs the same three functions in one program, for speed; it gives the same
updates. :func:`jit_programs` compiles them for one device; :func:`pmap_programs` maps them over
devices with the named axis ``"data"``:

* default (``per_client=False``): one client and one server spread over all devices. The method
  sees the global batch (ADC gathers the scores, runs the same K-means everywhere and sums
  per-cluster partial means), so a run on 8 devices gives the result of a run on 1.
* ``per_client=True``: every device is a client that compresses its own batch; the model is shared
  and its gradients are averaged (SplitFed style).

Every device computes its loss as its local mean divided by the device count and gradients are
summed across devices, so the update is that of the global mean loss.

Each step also checks, on the device, that the loss, both sides' gradients and their new
parameters are finite; :attr:`TrainState.bad_step` keeps the first step where they were not, so
the training loop can read it whenever it reads anything else and never waits for it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adc_jax.link import Channel, link
from adc_jax.methods import Method, Payload
from adc_jax.methods.core import axis_size

AXIS = "data"


class Side(NamedTuple):
    """One side of the cut: ``params = {"model": ..., "method": ...}`` and its optimiser."""

    params: Any
    opt_state: Any


class TrainState(NamedTuple):
    """Everything a training run carries from step to step (a plain pytree)."""

    step: jax.Array  # int32 []
    client: Side
    server: Side
    method_state: Any  # fixed method state (e.g. C3-SL keys)
    rng: jax.Array  # uint32 key data of the run's base key; step keys are fold_in(rng, step)
    # int32 []: the first step whose loss, gradients or new parameters were not all finite; 0
    # while every step's were. Set once, kept (later steps compute on the non-finite state).
    bad_step: jax.Array


@dataclasses.dataclass(frozen=True)
class Protocol:
    """The static description of one split-learning setup.

    ``client_apply(params, images) -> (tokens [B, N, D], scores [B, N])`` (with ``select=``:
    ``(tokens [B, k, D], scores, aux)``, see :class:`adc_jax.vit.Client`) and
    ``server_apply(params, tokens [M, n, D]) -> logits [M, C]`` are the two halves of the model;
    ``preprocess(images, key)`` and ``eval_preprocess(images)`` turn a stored batch into model
    inputs on the device (identity when ``None``).
    """

    client_apply: Callable
    server_apply: Callable
    method: Method
    num_classes: int
    client_tx: optax.GradientTransformation
    server_tx: optax.GradientTransformation
    uplink: Channel = Channel()
    downlink: Channel = Channel()
    preprocess: Callable | None = None
    eval_preprocess: Callable | None = None
    axis_name: str | None = None  # set by pmap_programs
    per_client: bool = False
    # Let a method with a selector (ADC) have the client compute only the tokens it keeps; then
    # client_apply must accept ``select=`` (as SplitViT.apply_client does). Same result either way.
    select_in_client: bool = True

    @property
    def method_axis(self) -> str | None:
        """The axis the method reduces over: the whole client, unless each device is one."""
        return None if self.per_client else self.axis_name


def init_state(
    protocol: Protocol, key: jax.Array, client_params: Any, server_params: Any, cut
) -> TrainState:
    """A fresh :class:`TrainState` from the two halves' parameters and the method's own."""
    method_key, rng = jax.random.split(key)
    method_params, method_state = protocol.method.init(method_key, cut)
    client = {"model": client_params, "method": method_params["client"]}
    server = {"model": server_params, "method": method_params["server"]}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        client=Side(client, protocol.client_tx.init(client)),
        server=Side(server, protocol.server_tx.init(server)),
        method_state=method_state,
        rng=jax.random.key_data(rng),
        bad_step=jnp.zeros((), jnp.int32),
    )


def step_keys(state: TrainState) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Keys of this step for augmentation, the method's encoder and the link."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    return tuple(jax.random.split(key, 3))


def _psum(tree, axis_name):
    return tree if axis_name is None else jax.lax.psum(tree, axis_name)


def all_finite(tree) -> jax.Array:
    """bool []: every element of every leaf of ``tree`` is finite."""
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def _update(tx: optax.GradientTransformation, side: Side, grads) -> tuple[Side, jax.Array]:
    """The side after one optimiser step, and whether its gradients and new parameters are all
    finite (one fused pass over each on the device)."""
    updates, opt_state = tx.update(grads, side.opt_state, side.params)
    params = optax.apply_updates(side.params, updates)
    return Side(params, opt_state), all_finite((grads, params))


def mark_bad_step(bad_step: jax.Array, step: jax.Array, finite: jax.Array) -> jax.Array:
    """``step`` if it is the first one that was not ``finite``, else ``bad_step`` unchanged."""
    return jnp.where((bad_step == 0) & ~finite, step, bad_step).astype(jnp.int32)


# ---- The three programs of one step --------------------------------------------------------


def client_forward(protocol: Protocol, state: TrainState, batch: dict[str, jax.Array]):
    """Client: returns ``(payload, vjp)``; ``payload.activations`` went through the uplink."""
    aug_key, encode_key, link_key = step_keys(state)
    images = batch["image"]
    if protocol.preprocess is not None:
        if protocol.axis_name is not None:  # each device augments its own images
            aug_key = jax.random.fold_in(aug_key, jax.lax.axis_index(protocol.axis_name))
        images = protocol.preprocess(images, aug_key)
    method, axis = protocol.method, protocol.method_axis
    if protocol.per_client and protocol.axis_name is not None:  # independent clients draw apart
        encode_key = jax.random.fold_in(encode_key, jax.lax.axis_index(protocol.axis_name))

    def forward(params):
        select = None
        if protocol.select_in_client:
            select = method.selector(
                params["method"], state.method_state, encode_key, axis_name=axis
            )
        if select is None:
            tokens, scores = protocol.client_apply(params["model"], images)
            selected = {}
        else:  # the client computes only the tokens the encoder keeps (see Method.selector)
            tokens, scores, aux = protocol.client_apply(params["model"], images, select=select)
            selected = {"selection": aux}
        payload = method.encode(
            params["method"],
            state.method_state,
            tokens,
            scores,
            batch["label"],
            encode_key,
            num_classes=protocol.num_classes,
            axis_name=axis,
            **selected,
        )
        sent = link(
            payload.activations,
            link_key,
            uplink=protocol.uplink,
            downlink=protocol.downlink,
            axis_name=axis,
        )
        return sent, payload._replace(activations=None)

    sent, vjp, payload = jax.vjp(forward, state.client.params, has_aux=True)
    return payload._replace(activations=sent), vjp


def server_step(protocol: Protocol, server: Side, method_state: Any, payload: Payload):
    """Server: returns ``(server side, gradient w.r.t. payload.activations, metrics)``.

    ``metrics["finite"]`` (bool): the loss, the server's gradients and its new parameters are all
    finite; :func:`client_backward` folds it into the step's verdict.
    """
    method, axis = protocol.method, protocol.axis_name
    devices = axis_size(axis)

    def loss_fn(params, activations):
        received = payload._replace(activations=activations)
        tokens = method.decode(params["method"], method_state, received)
        logits = protocol.server_apply(params["model"], tokens)
        targets = method.targets(payload, protocol.num_classes)
        loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()
        hits = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(targets, -1))
        # Summed over devices, loss/devices is the global mean (equal shares per device).
        return loss / devices, (loss, hits)

    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
    (_, (loss, hits)), (grads, activation_grad) = grad_fn(server.params, payload.activations)
    server, finite = _update(protocol.server_tx, server, _psum(grads, axis))
    metrics = {"loss": loss, "train_accuracy": hits}
    if axis is not None:
        metrics = jax.lax.pmean(metrics, axis)
    # The mean loss is non-finite if any device's is; gradients and parameters are replicated.
    metrics["finite"] = finite & jnp.isfinite(metrics["loss"])
    return server, activation_grad, metrics


def client_backward(
    protocol: Protocol,
    client: Side,
    step: jax.Array,
    vjp,
    activation_grad: jax.Array,
    bad_step: jax.Array,
    server_finite: jax.Array,
):
    """Client: back-propagates the server's gradient, updates, and closes the step.

    Returns ``(client side, step + 1, bad_step)``; the counter is advanced here, on the device, so
    that a step needs no host-to-device transfer, and ``bad_step`` becomes ``step + 1`` if this is
    the first step whose loss or gradients or new parameters, on either side (``server_finite``:
    the server's ``metrics["finite"]``), were not all finite.
    """
    (grads,) = vjp(activation_grad)
    client, finite = _update(protocol.client_tx, client, _psum(grads, protocol.axis_name))
    step = step + 1
    return client, step, mark_bad_step(bad_step, step, finite & server_finite)


def fused_step(protocol: Protocol, state: TrainState, batch: dict[str, jax.Array]):
    """The same step as the three programs, as one program: ``(state, metrics)``.

    ``metrics["bad_step"]`` is the new state's ``bad_step`` (a buffer of its own: the state is
    donated to the next step, the metrics are read later).
    """
    payload, vjp = client_forward(protocol, state, batch)
    server, grad, metrics = server_step(protocol, state.server, state.method_state, payload)
    client, step, bad_step = client_backward(
        protocol, state.client, state.step, vjp, grad, state.bad_step, metrics["finite"]
    )
    state = state._replace(step=step, client=client, server=server, bad_step=bad_step)
    return state, {**metrics, "bad_step": bad_step}


def evaluate_batch(protocol: Protocol, state: TrainState, batch: dict[str, jax.Array]):
    """Uncompressed forward (the method only if ``active_at_eval``): summed hits and count.

    ``batch["mask"]`` marks real examples in a padded batch.
    """
    images = batch["image"]
    if protocol.eval_preprocess is not None:
        images = protocol.eval_preprocess(images)
    client, server = state.client.params, state.server.params
    tokens, _ = protocol.client_apply(client["model"], images)
    tokens = protocol.method.eval_tokens(
        client["method"], server["method"], state.method_state, tokens
    )
    logits = protocol.server_apply(server["model"], tokens)
    mask = batch["mask"].astype(jnp.float32)
    hits = jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask)
    out = {"correct": hits, "count": jnp.sum(mask)}
    return _psum(out, protocol.axis_name)


# ---- Compiled programs -----------------------------------------------------------------------


class Programs(NamedTuple):
    """The compiled programs of one protocol (single-device ``jit`` or ``pmap``)."""

    client_forward: Callable  # (state, batch) -> (payload, vjp)
    server_step: Callable  # (server, method_state, payload) -> (server, grad, metrics)
    # (client, step, vjp, grad, bad_step, server_finite) -> (client, step + 1, bad_step)
    client_backward: Callable
    fused_step: Callable  # (state, batch) -> (state, metrics)
    evaluate: Callable  # (state, batch) -> {"correct", "count"}

    def split_step(self, state: TrainState, batch):
        """One step as three programs exchanging messages: ``(state, metrics)``, as
        :func:`fused_step` (``bad_step`` is not donated by these programs, so it is shared)."""
        payload, vjp = self.client_forward(state, batch)
        server, grad, metrics = self.server_step(state.server, state.method_state, payload)
        client, step, bad_step = self.client_backward(
            state.client, state.step, vjp, grad, state.bad_step, metrics["finite"]
        )
        state = state._replace(step=step, client=client, server=server, bad_step=bad_step)
        return state, {**metrics, "bad_step": bad_step}


def _programs(protocol: Protocol, compile_fn) -> Programs:
    return Programs(
        client_forward=compile_fn(partial(client_forward, protocol)),
        server_step=compile_fn(partial(server_step, protocol), donate_argnums=(0,)),
        client_backward=compile_fn(partial(client_backward, protocol), donate_argnums=(0,)),
        fused_step=compile_fn(partial(fused_step, protocol), donate_argnums=(0,)),
        evaluate=compile_fn(partial(evaluate_batch, protocol)),
    )


def jit_programs(protocol: Protocol) -> Programs:
    """The programs for one device, each its own ``jax.jit``."""
    return _programs(dataclasses.replace(protocol, axis_name=None), jax.jit)


def pmap_programs(protocol: Protocol, devices=None) -> Programs:
    """The programs mapped over ``devices`` (default: all local ones) with the axis ``"data"``.

    Inputs carry a leading device axis: replicate the state with :func:`replicate` and split
    each batch with :func:`shard_batch`.
    """
    protocol = dataclasses.replace(protocol, axis_name=AXIS)
    return _programs(protocol, partial(jax.pmap, axis_name=AXIS, devices=devices))


def replicate(tree, devices):
    """Copies a pytree onto each of ``devices`` with a leading device axis, for ``pmap``."""
    stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (len(devices), *jnp.shape(x))), tree)
    return _put_stacked(stacked, devices)


def _put_stacked(stacked, devices):
    # A sharding over the leading axis places slice i on device i, as pmap expects.
    mesh = jax.sharding.Mesh(devices, (AXIS,))
    spec = jax.sharding.PartitionSpec(AXIS)
    return jax.device_put(stacked, jax.sharding.NamedSharding(mesh, spec))


def unreplicate(tree):
    """The first device's copy of a replicated pytree, as single-device arrays."""
    return jax.tree.map(lambda x: x.addressable_data(0)[0], tree)


def shard_batch(batch: dict[str, Any], devices) -> dict[str, jax.Array]:
    """Splits the leading (batch) axis of every array over ``devices``: ``[n, B/n, ...]``.

    Raises a ValueError naming the fix when the batch does not divide among the devices.
    """
    n = len(devices)
    size = len(next(iter(batch.values())))
    if size % n:
        raise ValueError(
            f"Batch size ({size}) must be divisible by the number of devices ({n}); "
            f"choose a batch size that is a multiple of {n} or use fewer devices."
        )
    stacked = {k: v.reshape(n, size // n, *v.shape[1:]) for k, v in batch.items()}
    return _put_stacked(stacked, devices)
