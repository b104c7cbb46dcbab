"""The server process: the server half, its optimiser, and the protocol's handlers over gRPC.

RPCs of the service ``adc_jax.net.Split`` (unary, raw bytes in the format of
:mod:`adc_jax.net.wire`; no protoc):

* ``Hello`` – handshake: the client's config identity (refused with the differing fields if it
  does not match), its step and checkpoints; the reply says how the two sides meet again after a
  fault (``continue``, ``rollback`` or ``skip``; see ``docs/network.md``).
* ``Step`` – the payload of client step ``seq``; the reply carries the gradient and the loss.
  Applied once: a repeated ``seq`` gets the stored reply.
* ``Eval`` – what the client sends at evaluation; the reply carries the predictions.
* ``Sync`` – a client half for SplitFed averaging; the reply is the round's average.
* ``Done`` – the client finished; the server stops once every client is done.

Every request is checked before anything else: the token (``authorization: Bearer ...``), then
the framing and every array against the plan (:meth:`adc_jax.net.plan.Plan.check`). A bad
request gets an error status (``UNAUTHENTICATED``, ``INVALID_ARGUMENT``, ``FAILED_PRECONDITION``;
gRPC answers ``RESOURCE_EXHAUSTED`` to one over the size limit) and changes nothing.

Everything that touches the model runs on one thread, in arrival order (a single-worker
executor); parsing and checking run on gRPC's threads.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import hmac
import json
import os
import threading
import time
import uuid
from typing import Any

import grpc
import ml_collections
import numpy as np

from adc_jax import split
from adc_jax.net import plan as plan_lib
from adc_jax.net import transport, wire
from adc_jax.net.checkpoints import Checkpoints
from adc_jax.net.wire import RAW_CODEC, WireError


class _Refused(Exception):
    """Ends a handler with ``code`` and a message for the client."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclasses.dataclass
class _Reply:
    """The server's answer to a client's last applied step, kept to answer a repeat."""

    seq: int
    digest: str
    gradient: np.ndarray
    loss: float
    train_accuracy: float
    seconds: float  # server_step and the gradient's rounding, to the host
    finite: bool = True  # the loss, the server's gradients and new parameters were finite


class SplitServer:
    """Holds the server half; serves clients until all are done (or nobody calls for a while).

    Args:
      config: the experiment (the same file the clients use).
      workdir: checkpoints, ``events.jsonl`` and ``summary.json``; a restarted server resumes.
      token: the secret every request must carry.
      credentials: TLS (``transport.server_credentials``); None for plaintext.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: str,
        *,
        token: str,
        credentials: grpc.ServerCredentials | None = None,
    ):
        if not token:
            raise ValueError("The server needs a token (see --token_file).")
        self.config = config
        self.workdir = workdir
        self._token = token
        self._credentials = credentials
        self.net = plan_lib.build(config)
        self.plan = self.net.plan
        exp = self.net.exp
        self.devices = exp.devices
        self.n = self.net.num_clients
        self.every = exp.schedule.checkpoint_every
        self.incarnation = uuid.uuid4().hex[:12]
        os.makedirs(workdir, exist_ok=True)

        # ---- State (touched by the model thread only, once serving) ----
        self.side = split.replicate(exp.initial_state.server, self.devices)
        self.method_state = split.replicate(exp.initial_state.method_state, self.devices)
        self.applied = [0] * self.n  # the highest step applied, per client
        self.replies: dict[int, _Reply] = {}
        self.done = [False] * self.n
        self.server_step = 0  # messages applied, all clients
        self.stats = {"messages_applied": 0, "replayed": 0, "skipped": 0, "gaps": 0, "rollbacks": 0}
        self._checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"))
        self._saved_step = -1
        self.diverged = False  # a step's loss, gradients or parameters were not finite
        self.resumed_from_step = 0
        if self._checkpoints.steps():
            self._restore(self._checkpoints.steps()[-1])
            self.resumed_from_step = self.server_step

        self._model = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
        self._finished = threading.Event()
        self._stop_reason = ""
        self._last_request = time.monotonic()
        self._sync = _SyncRounds(self.n, config.net.sync_timeout)
        self._events = open(os.path.join(workdir, "events.jsonl"), "a")  # noqa: SIM115
        self._events_lock = threading.Lock()
        self._server: grpc.Server | None = None
        self._start_time = time.time()
        self.address = ""

    # ---- Serving ---------------------------------------------------------------------------

    def start(self, listen: str) -> str:
        """Starts serving on ``listen`` (``HOST:PORT``; port 0 picks one); the bound address."""
        host, port = transport.parse_address(listen)
        handlers = {
            "Hello": self._handler(wire.HELLO, self._hello),
            "Step": self._handler(wire.STEP, self._step),
            "Eval": self._handler(wire.EVAL, self._eval),
            "Sync": self._handler(wire.SYNC, self._sync_round),
            "Done": self._handler(wire.DONE, self._done),
        }
        server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(8 + 2 * self.n, thread_name_prefix="grpc"),
            options=transport.server_options(
                self.plan.max_request_bytes(), self.plan.max_reply_bytes()
            ),
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(transport.SERVICE, handlers),)
        )
        bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if self._credentials is None:
            bound = server.add_insecure_port(bind)
        else:
            bound = server.add_secure_port(bind, self._credentials)
        if not bound:
            raise OSError(f"Cannot listen on {listen} (address in use or not this machine's).")
        server.start()
        self._server = server
        self.address = f"{host}:{bound}"
        self._log("start", incarnation=self.incarnation, server_step=self.server_step)
        if all(self.done):
            self.request_stop("every client had finished before this start")
        return self.address

    def wait(self) -> dict[str, Any]:
        """Blocks until every client is done, the idle timeout or :meth:`request_stop`; then
        saves a last checkpoint, stops serving and returns the summary."""
        idle = self.config.net.idle_timeout
        while not self._finished.wait(0.5):
            if idle > 0 and time.monotonic() - self._last_request > idle:
                self.request_stop(f"no request for {idle:g} s")
        return self.close()

    def request_stop(self, reason: str) -> None:
        if not self._stop_reason:
            self._stop_reason = reason
        self._finished.set()

    def close(self) -> dict[str, Any]:
        if self._server is not None:
            self._server.stop(grace=2).wait()
            self._server = None
        self._model.shutdown(wait=True)
        if self._saved_step != self.server_step:
            self._save()
        self._checkpoints.close()
        summary = {
            "stop_reason": self._stop_reason,
            "server_steps": self.server_step,
            "applied": list(self.applied),
            "done": list(self.done),
            **self.stats,
            "resumed_from_step": self.resumed_from_step,
            "num_clients": self.n,
            "method": self.config.method.name,
            "wall_seconds": time.time() - self._start_time,
        }
        with open(os.path.join(self.workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        self._log("stop", reason=self._stop_reason)
        self._events.close()
        return summary

    # ---- Request handling --------------------------------------------------------------------

    def _handler(self, kind: int, fn):
        bits = self.plan.codec_bits()

        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            self._last_request = time.monotonic()
            try:
                self._authenticate(context)
                try:
                    frame = wire.parse(request, bits)
                except WireError as e:
                    raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
                if frame.kind != kind:
                    raise _Refused(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"A {wire.KINDS[frame.kind]} message sent to {wire.KINDS[kind]}.",
                    )
                client = frame.meta.get("client")
                if not isinstance(client, int) or not 0 <= client < self.n:
                    raise _Refused(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"Client index {client!r} is not in [0, {self.n}) (net.num_clients).",
                    )
                if kind != wire.HELLO and frame.meta.get("incarnation") != self.incarnation:
                    raise _Refused(grpc.StatusCode.ABORTED, "The server restarted: hello again.")
                self._sync.seen(client)
                return fn(client, frame)
            except _Refused as e:
                context.abort(e.code, str(e))
            except WireError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

        return grpc.unary_unary_rpc_method_handler(handle)

    def _authenticate(self, context: grpc.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata())
        given = metadata.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self._token}".encode()):
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "Missing or wrong token.")

    def _on_model(self, fn, *args):
        """Runs ``fn`` on the model thread, after every request that arrived before."""
        return self._model.submit(fn, *args).result()

    def _log(self, event: str, **fields) -> None:
        with self._events_lock:
            if not self._events.closed:
                record = {"time": time.time(), "event": event, **fields}
                self._events.write(json.dumps(record) + "\n")
                self._events.flush()

    # ---- Hello -------------------------------------------------------------------------------

    def _hello(self, client: int, frame: wire.Frame) -> bytes:
        meta = frame.meta
        differences = plan_lib.differences(self.plan.identity, meta.get("identity") or {})
        if differences:
            raise _Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                "The client's config does not match the server's; run both with the same "
                "config. Differences: " + "; ".join(differences),
            )
        step, checkpoints = meta.get("step"), meta.get("checkpoints")
        if not isinstance(step, int) or step < 0 or not isinstance(checkpoints, list):
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "Hello needs step and checkpoints.")
        action, applied = self._on_model(self._reconcile, client, step, checkpoints)
        reply = {"incarnation": self.incarnation, "action": action, "applied": applied}
        return wire.encode(wire.REPLY, reply)

    def _reconcile(self, client: int, step: int, checkpoints: list) -> tuple[str, int]:
        """How client ``client`` at ``step`` and this server meet (docs/network.md)."""
        a = self.applied[client]
        action = "continue"
        if a > step + 1:  # the client lost steps step+1..a: it restarted from a checkpoint
            if self.n == 1 and self._rollback(client, step):
                a = step
            else:
                action = "skip"
                self.stats["skipped"] += 1
        elif a < step:  # this server lost steps a+1..step: it restarted from a checkpoint
            if a in checkpoints:
                action = "rollback"
            else:
                self.stats["gaps"] += 1
                self.applied[client] = a = step
        self._log("hello", client=client, client_step=step, applied=a, action=action)
        return action, a

    # ---- Step --------------------------------------------------------------------------------

    def _step(self, client: int, frame: wire.Frame) -> bytes:
        seq = frame.meta.get("seq")
        if not isinstance(seq, int) or seq < 1:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"Bad step number {seq!r}.")
        arrays = self.plan.check(frame, self.plan.payload)
        digest = hashlib.sha256()
        for a in frame.arrays:
            digest.update(a.params)
            digest.update(a.data)
        payload = self.plan.unflatten_payload(arrays)
        status, applied, reply = self._on_model(
            self._apply, client, seq, digest.hexdigest(), payload
        )
        meta = {"status": status, "applied": applied}
        if reply is None:
            return wire.encode(wire.REPLY, meta)
        meta.update(
            loss=reply.loss,
            train_accuracy=reply.train_accuracy,
            server_seconds=reply.seconds,  # the server step's own time, for the client's record
            server_finite=reply.finite,
        )
        return wire.encode(
            wire.REPLY, meta, [("gradient", reply.gradient, self.plan.gradient.codec)]
        )

    def _apply(self, client: int, seq: int, digest: str, payload):
        """``(status, applied, reply)``: applies step ``seq`` once; a repeat gets the stored
        reply, an older step (or a repeat with another payload) is answered ``skip``."""
        a = self.applied[client]
        if seq <= a:
            cached = self.replies.get(client)
            if seq == a and cached is not None and cached.digest == digest:
                self.stats["replayed"] += 1
                return "cached", a, cached
            self.stats["skipped"] += 1
            self._log("skip", client=client, seq=seq, applied=a)
            return "skip", a, None
        if seq > a + 1:
            self.stats["gaps"] += 1
            self._log("gap", client=client, seq=seq, applied=a)
        start = time.perf_counter()
        side, gradient, metrics = self.net.exp.programs.server_step(
            self.side, self.method_state, payload
        )
        self.side = side
        if self.net.rounding is not None:
            gradient = self.net.rounding(gradient)
        metrics = {k: float(np.asarray(v).reshape(-1)[0]) for k, v in metrics.items()}
        gradient = np.asarray(gradient)
        loss, accuracy, finite = metrics["loss"], metrics["train_accuracy"], bool(metrics["finite"])
        if not finite and not self.diverged:  # the client stops on the reply; nothing is saved
            self.diverged = True
            self._log("diverged", client=client, seq=seq)
        seconds = time.perf_counter() - start
        reply = _Reply(seq, digest, gradient, loss, accuracy, seconds, finite)
        self.replies[client] = reply
        self.applied[client] = seq
        self.server_step += 1
        self.stats["messages_applied"] += 1
        if seq % self.every == 0:
            self._save()
        return "applied", seq, reply

    # ---- Evaluation, sync, done -------------------------------------------------------------

    def _eval(self, client: int, frame: wire.Frame) -> bytes:
        sent = self.plan.check(frame, (self.plan.eval_input,))["sent"]

        def predict():
            return np.asarray(self.net.server_eval(self.side.params, self.method_state, sent))

        predictions = self._on_model(predict)
        return wire.encode(wire.REPLY, {}, [("predictions", predictions, RAW_CODEC)])

    def _sync_round(self, client: int, frame: wire.Frame) -> bytes:
        round_ = frame.meta.get("round")
        if not isinstance(round_, int) or round_ < 1:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"Bad sync round {round_!r}.")
        arrays = self.plan.check(frame, self.plan.params)
        leaves = [arrays[s.name] for s in self.plan.params]
        average, members = self._sync.contribute(round_, client, leaves)
        self._log("sync", client=client, round=round_, members=members)
        specs = self.plan.params
        return wire.encode(
            wire.REPLY,
            {"members": members},
            [(s.name, x, RAW_CODEC) for s, x in zip(specs, average, strict=True)],
        )

    def _done(self, client: int, frame: wire.Frame) -> bytes:
        def finish():
            self.done[client] = True
            self._sync.leave(client)
            self._save()
            meta = frame.meta
            self._log(
                "done", client=client, step=meta.get("step"), accuracy=meta.get("test_accuracy")
            )

        self._on_model(finish)
        if all(self.done):
            self.request_stop("every client finished")
        return wire.encode(wire.REPLY, {})

    # ---- Checkpoints -------------------------------------------------------------------------

    def _state_tree(self):
        spec = self.plan.gradient
        grad = np.zeros((self.n, *spec.shape), wire.np_dtype(spec.dtype))
        for i, r in self.replies.items():
            grad[i] = r.gradient
        return {"server": split.unreplicate(self.side), "gradients": grad}

    def _meta(self) -> dict[str, Any]:
        replies = [
            dataclasses.asdict(self.replies[i]) if i in self.replies else None
            for i in range(self.n)
        ]
        for r in replies:
            if r is not None:
                del r["gradient"]
        return {
            "server_step": self.server_step,
            "applied": self.applied,
            "done": self.done,
            "replies": replies,
            "stats": self.stats,
        }

    def _save(self) -> None:
        if self.diverged:  # no non-finite state is ever checkpointed
            return
        self._checkpoints.save(self.server_step, self._state_tree(), self._meta())
        self._saved_step = self.server_step

    def _restore(self, step: int) -> None:
        state, meta = self._checkpoints.restore(step, self._state_tree())
        self.side = split.replicate(state["server"], self.devices)
        self.server_step = meta["server_step"]
        self.applied = list(meta["applied"])
        self.done = list(meta["done"])
        self.stats = dict(meta["stats"])
        self.replies = {
            i: _Reply(gradient=np.asarray(state["gradients"][i]), **r)
            for i, r in enumerate(meta["replies"])
            if r is not None
        }
        self._saved_step = step

    def _rollback(self, client: int, step: int) -> bool:
        """Restores the checkpoint where ``client`` had ``step`` applied, if there is one."""
        for s in reversed(self._checkpoints.steps()):
            if self._checkpoints.meta(s)["applied"][client] == step:
                stats = self.stats
                self._restore(s)
                self.stats = {**stats, "rollbacks": stats["rollbacks"] + 1}
                self._checkpoints.delete_after(s)
                self._log("rollback", client=client, step=step, server_step=s)
                return True
        return False


class _SyncRounds:
    """SplitFed averaging: round ``r`` closes when every expected client has sent its half, or
    ``timeout`` seconds after it opened; clients missing then are not waited for again until
    they call."""

    def __init__(self, n: int, timeout: float):
        self.n, self.timeout = n, timeout
        self._cond = threading.Condition()
        self._rounds: dict[int, dict[str, Any]] = {}
        self._absent: set[int] = set()
        self._left: set[int] = set()

    def seen(self, client: int) -> None:
        with self._cond:
            self._absent.discard(client)

    def leave(self, client: int) -> None:
        with self._cond:
            self._left.add(client)
            self._cond.notify_all()

    def contribute(self, r: int, client: int, leaves: list[np.ndarray]):
        with self._cond:
            entry = self._rounds.setdefault(
                r, {"halves": {}, "average": None, "opened": time.monotonic()}
            )
            if entry["average"] is None:
                entry["halves"][client] = [np.array(x) for x in leaves]
            while entry["average"] is None:
                expected = set(range(self.n)) - self._absent - self._left
                waited = time.monotonic() - entry["opened"]
                if expected <= set(entry["halves"]) or waited >= self.timeout:
                    self._absent |= expected - set(entry["halves"])
                    members = sorted(entry["halves"])
                    halves = zip(*(entry["halves"][i] for i in members), strict=True)
                    entry["average"] = [np.mean(np.stack(xs), axis=0) for xs in halves]
                    entry["members"] = members
                    entry["halves"] = {}
                    for old in [k for k in self._rounds if k < r - 1]:
                        del self._rounds[old]
                    self._cond.notify_all()
                else:
                    self._cond.wait(min(0.5, self.timeout - waited))
            return entry["average"], entry["members"]
