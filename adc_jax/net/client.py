"""A client process: the client half, its optimiser and its data, training against a server.

:class:`SplitClient` runs the loop of :func:`adc_jax.train.train_and_evaluate` with the server
half behind the network: per step it runs ``client_forward``, sends the payload, receives the
gradient and runs ``client_backward``, with the same programs, batches and keys as one process.
Evaluation sends what the client half computes for each test batch (uncompressed) and counts the
server's predictions against its own labels.

Faults: every call has a deadline; a call that fails for a reason that can pass (server down,
connection lost, deadline) is retried with exponential backoff after a new handshake, for up to
``net.retry_seconds`` without success. The handshake may tell the client to restore an older
checkpoint (``rollback``) or to move on to the server's step (``skip``); see ``docs/network.md``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from typing import Any, NoReturn

import grpc
import jax
import ml_collections
import numpy as np

from adc_jax import data as data_lib
from adc_jax import runs, split, train
from adc_jax.net import plan as plan_lib
from adc_jax.net import transport, wire
from adc_jax.net.checkpoints import Checkpoints
from adc_jax.net.wire import RAW_CODEC

# Failures that can pass: the server is down or restarting, the connection broke, a deadline.
_TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,
}


_LINK_FIELDS = ("up_mbps", "down_mbps", "up_latency_ms", "down_latency_ms")


class NetError(RuntimeError):
    """The server refused a request, or could not be reached in time; the message says why."""


class Resync(Exception):
    """The handshake asks the client to ``rollback`` to, or ``skip`` to, step ``applied``."""

    def __init__(self, action: str, applied: int):
        super().__init__(f"{action} to step {applied}")
        self.action, self.applied = action, applied


@dataclasses.dataclass
class WireCounts:
    """Bytes on the client's connection, both ways, by what was being exchanged."""

    up: int = 0
    down: int = 0

    def add(self, up: int, down: int) -> None:
        self.up += up
        self.down += down


class Connection:
    """The client's gRPC channel to the server, through its :class:`transport.Relay`."""

    def __init__(
        self,
        server: str,
        *,
        token: str,
        plan: plan_lib.Plan,
        net: ml_collections.ConfigDict,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str | None = None,
    ):
        host, port = transport.parse_address(server)
        self.relay = transport.Relay(
            (host, port),
            up=transport.Link(net.up_mbps, net.up_latency_ms),
            down=transport.Link(net.down_mbps, net.down_latency_ms),
        )
        options = transport.channel_options(plan.max_reply_bytes(), plan.max_request_bytes())
        if credentials is None:
            self.channel = grpc.insecure_channel(self.relay.address, options=options)
        else:  # the certificate names the server, not the relay in front of it
            options.append(("grpc.ssl_target_name_override", server_name or host))
            self.channel = grpc.secure_channel(self.relay.address, credentials, options=options)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._timeout = net.rpc_timeout
        self._calls = {
            name: self.channel.unary_unary(f"/{transport.SERVICE}/{name}")
            for name in ("Hello", "Step", "Eval", "Sync", "Done")
        }

    def call(self, name: str, request: bytes, reply_bytes: int, counts: WireCounts) -> bytes:
        """One attempt; its bytes on the wire go to ``counts``. Raises ``grpc.RpcError``."""
        link = self.relay
        timeout = self._timeout + link.up.seconds(len(request)) + link.down.seconds(reply_bytes)
        before = link.counts()
        try:
            return self._calls[name](request, timeout=timeout, metadata=self._metadata)
        finally:
            after = link.counts()
            counts.add(after[0] - before[0], after[1] - before[1])

    def close(self) -> None:
        self.channel.close()
        self.relay.close()


class SplitClient:
    """One client of a split-learning run (``python -m adc_jax.net client``).

    Args:
      config: the experiment (the same file as the server's).
      server: ``HOST:PORT`` of the server.
      workdir: metrics, checkpoints and ``summary.json`` of this client; a restarted client
        resumes.
      token: the server's token.
      client_index: this client's index in ``[0, net.num_clients)``; it picks the data shard.
      credentials, server_name: TLS (``transport.channel_credentials``) and the name the server's
        certificate carries (default: the host of ``server``).
      train_source: the training split as a ``data.BatchSource`` (default: opened from the
        config's dataset).
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        server: str,
        workdir: str,
        *,
        token: str,
        client_index: int = 0,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str | None = None,
        train_source=None,
    ):
        self.config = config
        self._train_source = train_source
        self._test_source = None
        self.workdir = workdir
        self.index = client_index
        self.net = plan_lib.build(config)
        n = self.net.num_clients
        if not 0 <= client_index < n:
            raise ValueError(
                f"--client_index ({client_index}) must be in [0, {n}) (net.num_clients = {n})."
            )
        self.plan = self.net.plan
        self.exp = self.net.exp
        self.conn = Connection(
            server,
            token=token,
            plan=self.plan,
            net=config.net,
            credentials=credentials,
            server_name=server_name,
        )
        self.incarnation = ""
        self.step = 0  # steps done (the next one sent is step + 1)
        self.train_seconds = 0.0
        # Per step after the first: the exchange as the client sees it, and the server's share.
        self.exchange_seconds: list[float] = []
        self.server_seconds: list[float] = []
        self.wire = {k: WireCounts() for k in ("hello", "step", "eval", "sync", "done")}
        self.resyncs = {"rollback": 0, "skip": 0}
        self.retries = 0
        self._bits = self.plan.codec_bits()
        self._last_success = time.monotonic()
        self._checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"))

    # ---- Calls -----------------------------------------------------------------------------

    def _request(self, name: str, build, reply_bytes: int, *, handshake: bool = True):
        """Sends ``build()`` (rebuilt per attempt, with the current incarnation) and parses the
        reply; retries what can pass, after a new handshake; raises :class:`Resync`."""
        attempt = 0
        while True:
            try:
                reply = self.conn.call(name, build(), reply_bytes, self.wire[name.lower()])
                self._last_success = time.monotonic()
                return wire.parse(reply, self._bits)
            except grpc.RpcError as e:
                code, details = e.code(), e.details()
                if code == grpc.StatusCode.ABORTED and handshake:  # the server restarted
                    self._hello()
                    continue
                if code not in _TRANSIENT:
                    raise NetError(f"The server refused {name}: {code.name}: {details}") from None
                waited = time.monotonic() - self._last_success
                if waited > self.config.net.retry_seconds:
                    raise NetError(
                        f"No answer from the server for {waited:.0f} s (net.retry_seconds); "
                        f"last error {code.name}: {details}"
                    ) from None
                self.retries += 1
                attempt += 1
                time.sleep(min(5.0, 0.2 * 2 ** min(attempt, 5)) * random.uniform(0.5, 1.0))
                if handshake:
                    self._hello()

    def _hello(self) -> None:
        """Handshake; raises :class:`Resync` if the two sides must meet at another step."""

        def build():
            meta = {
                "client": self.index,
                "step": self.step,
                "checkpoints": self._checkpoints.steps(),
                "identity": self.plan.identity,
            }
            return wire.encode(wire.HELLO, meta)

        meta = self._request("Hello", build, 1024, handshake=False).meta
        self.incarnation = meta["incarnation"]
        if meta["action"] != "continue":
            raise Resync(meta["action"], meta["applied"])
        if meta["applied"] > self.step + 1:  # cannot happen with a consistent server
            raise NetError(
                f"The server applied step {meta['applied']} of client {self.index} "
                f"which is at step {self.step}."
            )

    def _meta(self, **fields) -> dict[str, Any]:
        return {"client": self.index, "incarnation": self.incarnation, **fields}

    # ---- One step ----------------------------------------------------------------------------

    def _exchange(self, seq: int, payload) -> tuple[np.ndarray, dict[str, float]]:
        """Sends step ``seq``'s payload; the gradient and the server's metrics."""
        payload = jax.device_get(payload)  # waits for the forward pass: not the exchange's time
        if not all(wire.all_finite(np.asarray(x)) for x in jax.tree.leaves(payload)):
            self._diverged(seq)  # the server would refuse it
        start = time.perf_counter()
        arrays = self.plan.payload_arrays(payload)
        frame = self._request(
            "Step",
            lambda: wire.encode(wire.STEP, self._meta(seq=seq), arrays),
            self.plan.gradient.max_bytes,
        )
        meta = frame.meta
        if meta["status"] == "skip":
            raise Resync("skip", meta["applied"])
        if not meta["server_finite"]:  # the gradient is not usable (nor finite, to be checked)
            self._diverged(seq)
        (gradient,) = self.plan.check(frame, (self.plan.gradient,)).values()
        if self.step > 0 and meta["status"] == "applied":  # not the compiling first step
            self.exchange_seconds.append(time.perf_counter() - start)
            self.server_seconds.append(meta["server_seconds"])
        metrics = {"loss": meta["loss"], "train_accuracy": meta["train_accuracy"]}
        return gradient, {**metrics, "server_finite": bool(meta["server_finite"])}

    def _sync(self, state: split.TrainState, round_: int) -> split.TrainState:
        params = jax.device_get(split.unreplicate(state.client.params))
        arrays = [
            (s.name, np.asarray(x), RAW_CODEC)
            for s, x in zip(self.plan.params, jax.tree.leaves(params), strict=True)
        ]
        frame = self._request(
            "Sync",
            lambda: wire.encode(wire.SYNC, self._meta(round=round_), arrays),
            sum(s.max_bytes for s in self.plan.params),
        )
        decoded = self.plan.check(frame, self.plan.params)
        average = self.plan.unflatten_params([decoded[s.name] for s in self.plan.params])
        client = state.client._replace(params=split.replicate(average, self.exp.devices))
        return state._replace(client=client)

    def evaluate(self, state: split.TrainState) -> float:
        """Test accuracy of this client's half with the server's, over the whole test split."""
        exp, correct, count = self.exp, 0, 0
        if self._test_source is None:
            self._test_source = train.open_data(self.config, "test")
        batches = data_lib.eval_batches(self._test_source, batch_size=self.config.eval_batch_size)
        for batch in batches:
            images = split.shard_batch({"image": batch["image"]}, exp.devices)["image"]
            sent = np.asarray(self.net.client_eval(state.client.params, state.method_state, images))
            frame = self._request(
                "Eval",
                lambda sent=sent: wire.encode(wire.EVAL, self._meta(), [("sent", sent, RAW_CODEC)]),
                self.plan.eval_output.max_bytes,
            )
            predictions = self.plan.check(frame, (self.plan.eval_output,))["predictions"]
            hits = (predictions.reshape(-1) == batch["label"]) & batch["mask"]
            correct += int(hits.sum())
            count += int(batch["mask"].sum())
        return correct / max(count, 1)

    # ---- The loop ----------------------------------------------------------------------------

    def _start_state(self) -> tuple[split.TrainState, int]:
        """The initial state (this client's key folded in when there are several) or the newest
        checkpoint's."""
        state = self.exp.initial_state._replace(server=None)
        if self.net.num_clients > 1:
            key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), self.index)
            state = state._replace(rng=jax.random.key_data(key))
        steps = self._checkpoints.steps()
        if steps:
            state = self._load(state, steps[-1])
        return state, int(state.step)

    def _load(self, state: split.TrainState, step: int) -> split.TrainState:
        target = {"client": state.client, "step": state.step, "rng": state.rng}
        restored, _ = self._checkpoints.restore(step, target)
        return state._replace(**restored)

    def _save(self, state: split.TrainState, step: int) -> None:
        host = split.unreplicate(state)
        tree = {"client": host.client, "step": host.step, "rng": host.rng}
        self._checkpoints.save(step, tree, {"step": step, "client": self.index})

    def _diverged(self, bad_step: int) -> NoReturn:
        """Stops the run at its first step whose activations, loss, gradients or parameters were
        not finite (on either side): marks the workdir, so that a restart is refused, and raises
        :class:`adc_jax.runs.RunDiverged`. Nothing of that step was synced, saved or logged."""
        last = max(self._checkpoints.steps(), default=0)
        message = runs.mark_diverged(self.workdir, bad_step, bad_step, last)
        raise runs.RunDiverged(
            f"{message} Lower optimizer.learning_rate (now "
            f"{self.config.optimizer.learning_rate:g}) or check the data, and start both sides "
            "again in other workdirs (docs/runs.md)."
        )

    def _record(self, step: int) -> dict[str, Any]:
        cost = self.exp.cost
        return {
            "step": step,
            "samples_equivalent": step * cost.samples_equivalent,
            "bytes_up": step * cost.bytes_up,
            "bytes_down": step * cost.bytes_down,
        }

    def run(self, evaluate: bool = True) -> dict[str, Any]:
        """Trains, evaluates, tells the server it is done; returns (and writes) the summary.

        ``evaluate=False`` trains only (``test_accuracy`` None), e.g. to measure the link.
        """
        start_time = time.time()
        config, exp = self.config, self.exp
        runs.check_not_diverged(self.workdir)
        os.makedirs(self.workdir, exist_ok=True)
        with open(os.path.join(self.workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        host_state, start = self._start_state()
        self.step = start
        self.train_seconds = 0.0
        source = self._train_source or train.open_data(config, "train")
        total = exp.schedule.total_steps
        max_seconds, eval_seconds = config.net.max_train_seconds, config.net.eval_every_seconds
        writer = batches = None
        test_accuracy = None
        first_step_done = False
        while True:
            state = None
            try:
                state = split.replicate(host_state, exp.devices)
                writer = train.MetricsWriter(self.workdir, self.step)
                batches = data_lib.TrainIterator(
                    source,
                    batch_size=config.batch_size,
                    seed=config.seed,
                    start_step=self.step,
                    process_index=self.index,
                    process_count=self.net.num_clients,
                )
                if not self.incarnation:
                    self._hello()
                last_eval = self.train_seconds
                while self.step < total and not 0 < max_seconds <= self.train_seconds:
                    tick = time.monotonic()
                    state, metrics = self._train_step(state, next(batches))
                    state = self._after_step(state, metrics, writer)
                    if first_step_done:  # the first step compiles both sides' programs
                        self.train_seconds += time.monotonic() - tick
                    first_step_done = True
                    s = self.step
                    due = s % exp.schedule.eval_every == 0 and s != total
                    due |= 0 < eval_seconds <= self.train_seconds - last_eval
                    if evaluate and due:
                        last_eval = self.train_seconds
                        self._evaluate_and_log(state, writer)
                if self.step % exp.schedule.checkpoint_every and self.step != total:
                    self._save(state, self.step)  # stopped by net.max_train_seconds
                if evaluate:
                    test_accuracy = self._evaluate_and_log(state, writer)
                break
            except Resync as r:
                host_state = self._resync(r, host_state if state is None else state)
            finally:
                if batches is not None:
                    batches.close()
                if writer is not None:
                    writer.close()
                writer = batches = None
        self._request(
            "Done",
            lambda: wire.encode(wire.DONE, self._meta(step=self.step, test_accuracy=test_accuracy)),
            1024,
        )
        self._checkpoints.close()
        self.conn.close()
        return self._summary(test_accuracy, start, time.time() - start_time)

    def _train_step(self, state: split.TrainState, batch) -> tuple[split.TrainState, dict]:
        """One step: forward, exchange, backward (which donates ``state.client``)."""
        exp = self.exp
        batch = split.shard_batch(batch, exp.devices)
        payload, vjp = exp.programs.client_forward(state, batch)
        gradient, metrics = self._exchange(self.step + 1, payload)
        server_finite = np.full(len(exp.devices), metrics.pop("server_finite"))  # per device
        client, step, bad_step = exp.programs.client_backward(
            state.client, state.step, vjp, gradient, state.bad_step, server_finite
        )
        self.step += 1
        return state._replace(client=client, step=step, bad_step=bad_step), metrics

    def _after_step(self, state: split.TrainState, metrics, writer) -> split.TrainState:
        """Sync, checkpoint and metrics of the step just done, where due."""
        s, schedule = self.step, self.exp.schedule
        bad_step = int(np.asarray(jax.device_get(split.unreplicate(state.bad_step))))
        if bad_step:  # stop before anything non-finite is synced, saved or logged
            self._diverged(bad_step)
        sync_every = self.config.net.sync_every
        if self.net.num_clients > 1 and sync_every > 0 and s % sync_every == 0:
            state = self._sync(state, s // sync_every)
        if s % schedule.checkpoint_every == 0 or s == schedule.total_steps:
            self._save(state, s)
        if s % schedule.log_every == 0 or s == schedule.total_steps:
            writer.write({**self._record(s), **metrics, **self._wire_fields()})
        return state

    def _evaluate_and_log(self, state: split.TrainState, writer) -> float:
        """Evaluates at full speed (the link's shaping is for training traffic) and logs it."""
        with self.conn.relay.unshaped():
            accuracy = self.evaluate(state)
        writer.write({**self._record(self.step), "test_accuracy": accuracy, **self._wire_fields()})
        return accuracy

    def _resync(self, r: Resync, state: split.TrainState) -> split.TrainState:
        """The host state to go on from after :class:`Resync` (``state`` may be replicated)."""
        self.resyncs[r.action] += 1
        if np.ndim(state.step):
            state = split.unreplicate(state)
        if r.action == "rollback":  # the server restarted from an older checkpoint
            self._checkpoints.delete_after(r.applied)
            state = self._load(state, r.applied)
        else:  # skip: the server applied steps this client lost; keep this client half
            state = state._replace(step=np.asarray(r.applied, np.int32))
        self.step = r.applied
        self.incarnation = ""  # hello again before the next step
        return state

    def _wire_fields(self) -> dict[str, int]:
        up, down = self.conn.relay.counts()
        return {"wire_bytes_up": up, "wire_bytes_down": down, "train_seconds": self.train_seconds}

    def _summary(self, test_accuracy, start: int, wall: float) -> dict[str, Any]:
        exp, config = self.exp, self.config
        cost = exp.cost
        up, down = self.conn.relay.counts()
        summary = {
            **self._record(self.step),
            "wire_bytes_up": up,
            "wire_bytes_down": down,
            **{f"wire_bytes_{k}_up": c.up for k, c in self.wire.items()},
            **{f"wire_bytes_{k}_down": c.down for k, c in self.wire.items()},
            "test_accuracy": test_accuracy,
            "steps": self.step,
            "method": config.method.name,
            "model": config.model.name,
            "dataset": config.dataset.name,
            "batch_size": config.batch_size // self.net.num_clients,
            "xi_nominal": cost.xi_paper,
            "xi_measured": cost.xi_measured,
            "bytes_per_step_up": cost.uplink,
            "bytes_per_step_down": cost.downlink,
            "client_index": self.index,
            "num_clients": self.net.num_clients,
            "train_seconds": self.train_seconds,
            "exchange_seconds_median": _median(self.exchange_seconds),
            "server_step_seconds_median": _median(self.server_seconds),
            "transport_seconds_median": _median(
                [a - b for a, b in zip(self.exchange_seconds, self.server_seconds, strict=True)]
            ),
            "wall_seconds": wall,
            "resumed_from_step": start,
            "resyncs": self.resyncs,
            "retries": self.retries,
            "connections": self.conn.relay.connections,
            "link": {k: config.net[k] for k in _LINK_FIELDS},
            "num_devices": len(exp.devices),
            "device_kind": exp.devices[0].device_kind,
            "platform": exp.devices[0].platform,
            "versions": train.versions(),
        }
        with open(os.path.join(self.workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        accuracy = "not evaluated" if test_accuracy is None else f"{test_accuracy:.4f}"
        print(
            f"client {self.index}: {config.method.name} test accuracy {accuracy} after "
            f"{self.step} steps; accounted {summary['bytes_up'] / 2**20:.2f} MiB up, "
            f"{summary['bytes_down'] / 2**20:.2f} MiB down; on the wire {up / 2**20:.2f} MiB up, "
            f"{down / 2**20:.2f} MiB down. Outputs in {self.workdir}.",
            flush=True,
        )
        return summary


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None
