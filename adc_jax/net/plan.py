"""What crosses the network, fixed before the first message, and the programs of each side.

Both sides build the same :class:`Plan` from the config (:func:`build`): the name, shape, dtype
and codec of every array of every message, plus bounds for integer arrays. A message is checked
against it (:meth:`Plan.check`) before anything of it reaches a model, and the handshake
compares the two sides' :attr:`Plan.identity` so that a client with another config is turned
away with the fields that differ.

Codecs follow the byte accounting of :mod:`adc_jax.methods` (``uplink_bytes`` /
``downlink_bytes``), so the wire carries what the accounting counts:

* activations and gradient: ``uniform`` n-bit codes for the quantize method; otherwise the link
  channel's format (``bf16``, ``int8`` or ``uniform`` for those channels, ``raw`` for identity
  and AWGN). The server applies the downlink's rounding to the gradient before sending it
  (:attr:`NetExperiment.rounding`), which the client's backward pass then applies again as in one
  process (the rounding is idempotent).
* FedLite's activations are ``omit``-ted: the server rebuilds them from the codebook and codes
  (a gather, exact); a client whose activations do not equal that rebuild (a non-identity
  uplink channel) sends them ``raw``.
* everything else (labels, soft labels, indices, codes, codebooks) ``raw``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from adc_jax import split, train
from adc_jax.link import Channel, uniform_quantize
from adc_jax.methods import CutShape, FedLite, Quantize, TopK, step_cost
from adc_jax.methods.fedlite import reconstruct
from adc_jax.net import wire
from adc_jax.net.wire import RAW_CODEC, Codec, WireError

# ---- Array specifications --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """One array of a message: its name, shape (leading device axis included), dtype, codec."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    codec: Codec = RAW_CODEC
    bound: int | None = None  # integer values must lie in [0, bound)

    @property
    def max_bytes(self) -> int:
        """The most its data section can take (an array that misses its codec travels raw)."""
        return RAW_CODEC.data_bytes(self.shape, self.dtype)

    def describe(self) -> list:
        return [self.name, list(self.shape), self.dtype, self.codec.kind, self.codec.bits]


def _leaf_name(path) -> str:
    parts = []
    for key in path:
        for attr in ("name", "key", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "/".join(parts)


def _specs(tree, codecs: dict[str, Codec] | None = None, bounds=None) -> tuple[ArraySpec, ...]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = []
    for path, leaf in leaves:
        name = _leaf_name(path)
        out.append(
            ArraySpec(
                name,
                tuple(leaf.shape),
                wire.dtype_name(leaf.dtype),
                (codecs or {}).get(name, RAW_CODEC),
                (bounds or {}).get(name),
            )
        )
    return tuple(out)


def channel_codec(channel: Channel) -> Codec:
    """The wire format of a link channel's values."""
    if channel.kind == "bfloat16":
        return Codec("bf16")
    if channel.kind == "int8":
        return Codec("int8")
    if channel.kind == "quantize":
        return Codec("uniform", channel.bits)
    return RAW_CODEC


def activation_codec(method, channel: Channel) -> Codec:
    """The wire format of the activations or the gradient of ``method`` on ``channel``."""
    if isinstance(method, Quantize):
        return Codec("uniform", method.bits)
    return channel_codec(channel)


def gradient_rounding(method, channel: Channel) -> Callable | None:
    """What the client's backward pass does to the gradient first (downlink channel, then the
    quantize method's rounding), for the server to apply before sending; None if nothing."""
    steps = []
    if channel.kind in ("bfloat16", "int8", "quantize"):  # deterministic: no key needed
        steps.append(lambda g: channel.apply(g, None))
    if isinstance(method, Quantize):
        steps.append(lambda g: uniform_quantize(g, method.bits))
    if not steps:
        return None

    def rounding(g):
        for f in steps:
            g = f(g)
        return g

    return jax.jit(rounding)


# ---- The plan ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    """Every message's arrays, and what both sides must agree on."""

    payload: tuple[ArraySpec, ...]  # the leaves of the client's Payload, in tree order
    payload_tree: Any
    gradient: ArraySpec
    eval_input: ArraySpec  # what the client sends at evaluation
    eval_output: ArraySpec  # the server's predictions
    params: tuple[ArraySpec, ...]  # the client half (SplitFed averaging), no device axis
    params_tree: Any
    identity: dict[str, Any]  # compared at the handshake
    rebuild: Callable | None = None  # FedLite: activations from the other payload leaves

    def max_request_bytes(self) -> int:
        """The largest message a client may send (with generous room for headers)."""
        sizes = [
            sum(s.max_bytes for s in self.payload),
            self.eval_input.max_bytes,
            sum(s.max_bytes for s in self.params),
        ]
        return max(sizes) + 65536

    def max_reply_bytes(self) -> int:
        sizes = [
            self.gradient.max_bytes,
            self.eval_output.max_bytes,
            sum(s.max_bytes for s in self.params),
        ]
        return max(sizes) + 65536

    # ---- Encoding and checking -------------------------------------------------------------

    def payload_arrays(self, payload) -> list[tuple[str, np.ndarray, Codec]]:
        """The payload's leaves as ``(name, array, codec)``; an ``omit`` array that the receiver
        could not rebuild exactly is sent ``raw``."""
        leaves = [np.asarray(x) for x in jax.tree.leaves(payload)]
        out = []
        for spec, leaf in zip(self.payload, leaves, strict=True):
            codec = spec.codec
            if codec.kind == "omit":
                others = {s.name: x for s, x in zip(self.payload, leaves, strict=True)}
                rebuilt = np.asarray(self.rebuild(others))
                if rebuilt.tobytes() != leaf.tobytes():
                    codec = RAW_CODEC
            out.append((spec.name, leaf, codec))
        return out

    def check(self, frame: wire.Frame, specs: tuple[ArraySpec, ...]) -> dict[str, np.ndarray]:
        """The frame's arrays, decoded, after checking them against ``specs``.

        Raises :class:`WireError` naming the array and what is wrong: names and order, dtype,
        shape, codec (the plan's or ``raw``), non-finite floats, integers out of range.
        """
        names = [a.name for a in frame.arrays]
        expected = [s.name for s in specs]
        if names != expected:
            raise WireError(f"The message carries arrays {names}; the plan expects {expected}.")
        out = {}
        for spec, array in zip(specs, frame.arrays, strict=True):
            if array.dtype != spec.dtype or array.shape != spec.shape:
                raise WireError(
                    f"Array {spec.name!r} is {array.dtype} {list(array.shape)}; the plan "
                    f"expects {spec.dtype} {list(spec.shape)}."
                )
            if array.codec.kind not in (spec.codec.kind, "raw"):
                raise WireError(
                    f"Array {spec.name!r} is sent as {array.codec.kind}; the plan expects "
                    f"{spec.codec.kind} (or raw)."
                )
            if array.codec.kind == "omit":
                continue
            value = array.value()
            if not wire.all_finite(value):
                raise WireError(f"Array {spec.name!r} holds non-finite values.")
            if spec.bound is not None and value.size:  # integer arrays only (ArraySpec.bound)
                low, high = int(value.min()), int(value.max())
                if low < 0 or high >= spec.bound:
                    raise WireError(
                        f"Array {spec.name!r} holds values in [{low}, {high}]; the plan "
                        f"allows [0, {spec.bound})."
                    )
            out[spec.name] = value
        for spec in specs:
            if spec.name not in out:
                out[spec.name] = np.asarray(self.rebuild(out)).astype(wire.np_dtype(spec.dtype))
        return out

    def codec_bits(self) -> dict[str, int]:
        """Bit widths of the ``uniform`` arrays by name (for :func:`adc_jax.net.wire.parse`)."""
        specs = (*self.payload, self.gradient)
        return {s.name: s.codec.bits for s in specs if s.codec.kind == "uniform"}

    def unflatten_payload(self, arrays: dict[str, np.ndarray]):
        return jax.tree.unflatten(self.payload_tree, [arrays[s.name] for s in self.payload])

    def unflatten_params(self, arrays: list[np.ndarray]):
        return jax.tree.unflatten(self.params_tree, arrays)


# ---- Both sides' setup -------------------------------------------------------------------


@dataclasses.dataclass
class NetExperiment:
    """What a client or the server builds before the first message."""

    exp: train.Experiment  # its cost is one client's, its schedule all clients' budget
    plan: Plan
    client_eval: Callable  # pmap: (client params, method state, images) -> what is sent
    server_eval: Callable  # pmap: (server params, method state, sent) -> predictions int32
    rounding: Callable | None  # the gradient's rounding for the downlink (server)
    num_clients: int


def _shapes(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), tree)


def _eval_programs(protocol: split.Protocol, devices):
    method = protocol.method

    def client_eval(params, method_state, images):
        if protocol.eval_preprocess is not None:
            images = protocol.eval_preprocess(images)
        tokens, _ = protocol.client_apply(params["model"], images)
        return method.eval_encode(params["method"], method_state, tokens)

    def server_eval(params, method_state, sent):
        tokens = method.eval_decode(params["method"], method_state, sent)
        logits = protocol.server_apply(params["model"], tokens)
        return jnp.argmax(logits, -1).astype(jnp.int32)

    pmap = partial(jax.pmap, axis_name=split.AXIS, devices=devices)
    return pmap(client_eval), pmap(server_eval)


def _identity(config: ml_collections.ConfigDict, exp: train.Experiment, payload) -> dict:
    model = {k: v for k, v in config.model.to_dict().items() if k != "pretrained"}
    identity = {
        "model": model,
        "pretrained": bool(config.model.pretrained),
        "method": config.method.to_dict(),
        "dataset": config.dataset.name,
        "augment": config.dataset.augment,
        "batch_size": config.batch_size,
        "eval_batch_size": config.eval_batch_size,
        "seed": config.seed,
        "optimizer": config.optimizer.to_dict(),
        "link": config.link.to_dict(),
        "num_clients": config.net.num_clients,
        "sync_every": config.net.sync_every,
        "devices": len(exp.devices),
        "payload": [s.describe() for s in payload],
    }
    return json.loads(json.dumps(identity))  # as the other side receives it (lists, not tuples)


def build(config: ml_collections.ConfigDict) -> NetExperiment:
    """The experiment of either side and the plan of the messages (no data is opened).

    With ``n = net.num_clients``, every client trains on ``batch_size / n`` examples per step;
    the budget counts all clients together (each client runs the schedule's steps).
    """
    n = config.net.num_clients
    if n < 1:
        raise ValueError(f"net.num_clients ({n}) must be at least 1.")
    if config.batch_size % n:
        raise ValueError(
            f"batch_size ({config.batch_size}) must be divisible by net.num_clients ({n}): each "
            "client trains on batch_size / num_clients examples per step."
        )
    if config.devices.per_client:
        raise ValueError(
            "devices.per_client must be False for networked training: the network clients are "
            "the clients (set net.num_clients instead)."
        )
    if config.fused_step:
        raise ValueError(
            "fused_step must be False for networked training (client and server "
            "run in different processes)."
        )
    local = config.copy_and_resolve_references()
    local.batch_size = config.batch_size // n
    exp = train.setup(local, open_test=False)  # a client opens its test split to evaluate
    model, protocol, method = exp.model, exp.protocol, exp.protocol.method
    cut = CutShape(local.batch_size, model.seq_len, model.width, exp.info.num_classes)
    all_clients = step_cost(method, cut, protocol.uplink, protocol.downlink, clients=n)
    exp = dataclasses.replace(
        exp, schedule=train.plan_steps(config, all_clients, exp.info.train_size)
    )

    devices = exp.devices
    state = split.replicate(exp.initial_state, devices)
    h, w, c = exp.info.image_shape
    batch = {
        "image": jax.ShapeDtypeStruct(
            (len(devices), local.batch_size // len(devices), h, w, c), jnp.uint8
        ),
        "label": jax.ShapeDtypeStruct((len(devices), local.batch_size // len(devices)), jnp.int32),
    }
    payload, _ = jax.eval_shape(
        exp.programs.client_forward, _shapes(state._replace(server=None)), batch
    )
    codecs = {"activations": activation_codec(method, protocol.uplink)}
    bounds = {"labels": exp.info.num_classes}
    rebuild = None
    if isinstance(method, TopK):
        bounds["side/indices"] = model.seq_len * model.width
    if isinstance(method, FedLite):
        bounds["side/codes"] = method.num_centroids
        codecs["activations"] = Codec("omit")
        act = payload.activations
        fn = jax.jit(jax.vmap(partial(reconstruct, seq_len=model.seq_len, width=model.width)))
        rebuild = lambda a: fn(a["side/codebook"], a["side/codes"]).astype(act.dtype)
    payload_specs = _specs(payload, codecs, bounds)
    act = payload.activations
    gradient = ArraySpec(
        "gradient",
        tuple(act.shape),
        wire.dtype_name(act.dtype),
        activation_codec(method, protocol.downlink),
    )

    client_eval, server_eval = _eval_programs(protocol, devices)
    per_device = config.eval_batch_size // len(devices)
    images = jax.ShapeDtypeStruct((len(devices), per_device, h, w, c), jnp.uint8)
    sent = jax.eval_shape(
        client_eval, _shapes(state.client.params), _shapes(state.method_state), images
    )
    params = exp.initial_state.client.params
    plan = Plan(
        payload=payload_specs,
        payload_tree=jax.tree.structure(payload),
        gradient=gradient,
        eval_input=ArraySpec("sent", tuple(sent.shape), wire.dtype_name(sent.dtype)),
        eval_output=ArraySpec(
            "predictions", (len(devices), per_device), "int32", bound=exp.info.num_classes
        ),
        params=_specs(params),
        params_tree=jax.tree.structure(params),
        identity=_identity(config, exp, payload_specs),
        rebuild=rebuild,
    )
    return NetExperiment(
        exp=exp,
        plan=plan,
        client_eval=client_eval,
        server_eval=server_eval,
        rounding=gradient_rounding(method, protocol.downlink),
        num_clients=n,
    )


def differences(mine: dict, theirs: dict) -> list[str]:
    """The keys (dotted) where two identity dicts differ, with both values."""

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(mine), flat(theirs)
    return [
        f"{k}: server {a.get(k)!r}, client {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]
