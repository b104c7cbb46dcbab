"""adc_jax.net: the wire format, message checks, TLS and token, faults, several clients, and the
bytes on the wire against the accounting. Loopback only; every process stops by itself."""

import dataclasses
import importlib.util
import os
import threading
import time

import grpc
import jax
import ml_dtypes
import net_kit
import numpy as np
import pytest

from adc_jax import link, runs, train
from adc_jax.net import transport, wire
from adc_jax.net.client import SplitClient
from adc_jax.net.server import SplitServer, _SyncRounds
from adc_jax.net.wire import Codec, WireError

TOKEN = "test-token"


def load_config(overrides):
    path = os.path.join(net_kit.ROOT, "configs", "vit_fashion_mnist.py")
    spec = importlib.util.spec_from_file_location("vit_fashion_mnist", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return net_kit.apply_overrides(module.get_config(), overrides)


# ---- The wire format ----------------------------------------------------------------------


def test_frames_round_trip_every_dtype_and_codec():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 5)).astype(np.float32)
    arrays = [
        ("f32", x, wire.RAW_CODEC),
        ("bf16", x.astype(ml_dtypes.bfloat16).astype(np.float32), Codec("bf16")),
        ("i8", np.asarray(link.int8_roundtrip(x)), Codec("int8")),
        ("u3", np.asarray(link.uniform_quantize(x, 3)), Codec("uniform", 3)),
        ("u8", np.asarray(link.uniform_quantize(x, 8)), Codec("uniform", 8)),
        ("u13", np.asarray(link.uniform_quantize(x, 13)), Codec("uniform", 13)),
        ("labels", np.arange(7, dtype=np.uint8), wire.RAW_CODEC),
        ("idx", rng.integers(0, 1000, (4, 2)).astype(np.int32), wire.RAW_CODEC),
        ("scalar", np.float64(3.5), wire.RAW_CODEC),
        ("empty", np.zeros((0, 3), np.int64), wire.RAW_CODEC),
    ]
    message = wire.encode(wire.STEP, {"client": 0, "seq": 3}, arrays)
    frame = wire.parse(message, {"u3": 3, "u8": 8, "u13": 13})
    assert frame.kind == wire.STEP and frame.meta == {"client": 0, "seq": 3}
    for (name, value, codec), got in zip(arrays, frame.arrays, strict=True):
        assert got.name == name and got.codec.kind == codec.kind, name
        out = got.value()
        assert out.dtype == value.dtype and out.shape == np.shape(value)
        assert out.tobytes() == np.asarray(value).tobytes(), name  # lossless, to the bit
    # Packed sizes: what the link's accounting counts (values, plus scale or range).
    sizes = {a.name: len(a.data) + len(a.params) for a in frame.arrays}
    assert sizes["bf16"] == 2 * 30 and sizes["i8"] == 30 + 4
    # uniform: the range's two floats, and one byte naming the sender's rounding variant
    assert sizes["u3"] == -(-30 * 3 // 8) + 9 and sizes["u13"] == -(-30 * 13 // 8) + 9


def test_values_off_the_codec_grid_travel_raw():
    x = np.linspace(-1, 1, 50, dtype=np.float32)  # not on a 4-bit grid, not bfloat16
    for codec in (Codec("uniform", 4), Codec("bf16"), Codec("int8")):
        used, _, data = wire.encode_array(x, codec)
        assert used.kind == "raw" and data == x.tobytes()


def test_quantised_gradient_is_idempotent_through_the_wire():
    # The server sends Q(g); the client's backward pass applies Q again: the same values.
    g = np.asarray(jax.random.normal(jax.random.key(1), (4, 64, 17, 32)))
    q = np.asarray(link.uniform_quantize(g, 8))
    used, params, data = wire.encode_array(q, Codec("uniform", 8))
    received = wire.decode_array(used, params, data, q.shape, "float32")
    again = np.asarray(link.uniform_quantize(received, 8))
    assert used.kind == "uniform" and again.tobytes() == q.tobytes()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[:-1], "truncated"),
        (lambda b: b"XXXX" + b[4:], "magic"),
        (lambda b: b + b"\0", "unexpected bytes"),
        (lambda b: b[:4] + bytes([9]) + b[5:], "version"),
        (lambda b: b[:5] + bytes([77]) + b[6:], "kind"),
    ],
)
def test_malformed_frames_raise_wire_errors(mutate, message):
    good = wire.encode(wire.STEP, {"a": 1}, [("x", np.ones(3, np.float32), wire.RAW_CODEC)])
    with pytest.raises(WireError, match=message):
        wire.parse(mutate(good))


def test_a_frame_whose_data_does_not_match_its_shape_is_refused():
    good = wire.encode(wire.STEP, {}, [("x", np.ones(3, np.float32), wire.RAW_CODEC)])
    lying = good.replace(b"x\x0a\x00\x01\x03\x00\x00\x00", b"x\x0a\x00\x01\x04\x00\x00\x00")
    assert lying != good
    with pytest.raises(WireError, match="needs 16"):
        wire.parse(lying)


# ---- The relay: counting and shaping -------------------------------------------------------


def test_relay_counts_every_byte_and_shapes_the_link():
    import socket

    echo = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = echo.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data[:10])  # 10 bytes back per chunk read

    threading.Thread(target=serve, daemon=True).start()
    relay = transport.Relay(
        echo.getsockname(), up=transport.Link(mbps=8.0, latency_ms=50.0), down=transport.Link()
    )
    try:
        host, port = transport.parse_address(relay.address)
        sent = 200_000  # 0.2 s at 8 Mbit/s
        start = time.monotonic()
        with socket.create_connection((host, port)) as s:
            s.sendall(b"x" * sent)
            s.shutdown(socket.SHUT_WR)
            received = 0
            while data := s.recv(65536):
                received += len(data)
        elapsed = time.monotonic() - start
        up, down = relay.counts()
        assert up == sent and down == received > 0
        assert elapsed >= 0.2 + 0.05 - 0.01  # the rate and the latency held the bytes
    finally:
        relay.close()
        echo.close()


def test_sync_rounds_do_not_wait_forever_for_a_missing_client():
    rounds = _SyncRounds(2, timeout=0.3)
    one = [np.ones(2, np.float32)]
    start = time.monotonic()
    average, members = rounds.contribute(1, 0, one)  # client 1 never comes
    assert members == [0] and 0.3 <= time.monotonic() - start < 2
    start = time.monotonic()
    assert rounds.contribute(2, 0, one)[1] == [0]
    assert time.monotonic() - start < 0.2  # it is not waited for again ...
    rounds.seen(1)  # ... until it calls
    out = {}
    t = threading.Thread(target=lambda: out.update(r=rounds.contribute(3, 1, [one[0] * 3])))
    t.start()
    average, members = rounds.contribute(3, 0, one)
    t.join()
    assert members == [0, 1] and average[0].tolist() == [2.0, 2.0]
    assert out["r"][1] == [0, 1]


# ---- A live server in this process: TLS, token, message checks -----------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return net_kit.make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def live(fashion_dir, certs, tmp_path_factory):
    """A Top-K server with mutual TLS (its payload has float, label and index arrays)."""
    config = load_config(net_kit.tiny_overrides(fashion_dir, **{"method.name": "topk"}))
    credentials = transport.server_credentials(certs["server"], certs["server_key"], certs["ca"])
    server = SplitServer(
        config, str(tmp_path_factory.mktemp("live")), token=TOKEN, credentials=credentials
    )
    address = server.start("127.0.0.1:0")
    yield server, address
    server.request_stop("test over")
    server.close()


def _call(address, name, body, certs, *, token=TOKEN, ca="ca", client_cert=True):
    if ca is None:
        channel = grpc.insecure_channel(address)
    else:
        channel = grpc.secure_channel(
            address,
            transport.channel_credentials(
                certs[ca],
                certs["client"] if client_cert else None,
                certs["client_key"] if client_cert else None,
            ),
        )
    with channel:
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        call = channel.unary_unary(f"/{transport.SERVICE}/{name}")
        return wire.parse(call(body, timeout=30, metadata=metadata))


def _hello(server, address, certs):
    meta = {"client": 0, "step": 0, "checkpoints": [], "identity": server.plan.identity}
    return _call(address, "Hello", wire.encode(wire.HELLO, meta), certs).meta


def _code(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code()


def test_tls_refuses_clients_without_a_certificate_or_the_right_ca(live, certs):
    server, address = live
    hello = wire.encode(wire.HELLO, {"client": 0, "step": 0, "checkpoints": []})
    unavailable = grpc.StatusCode.UNAVAILABLE
    assert _code(lambda: _call(address, "Hello", hello, certs, ca=None)) == unavailable
    assert _code(lambda: _call(address, "Hello", hello, certs, client_cert=False)) == unavailable
    assert _code(lambda: _call(address, "Hello", hello, certs, ca="other_ca")) == unavailable
    assert _hello(server, address, certs)["action"] == "continue"


def test_a_client_without_the_token_is_refused(live, certs):
    server, address = live
    hello = wire.encode(wire.HELLO, {"client": 0, "step": 0, "checkpoints": []})
    refused = grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: _call(address, "Hello", hello, certs, token=None)) == refused
    assert _code(lambda: _call(address, "Hello", hello, certs, token="guess")) == refused


def test_a_client_with_another_config_is_refused_with_the_differences(live, certs):
    server, address = live
    identity = {**server.plan.identity, "seed": 7}
    hello = wire.encode(
        wire.HELLO, {"client": 0, "step": 0, "checkpoints": [], "identity": identity}
    )
    with pytest.raises(grpc.RpcError) as e:
        _call(address, "Hello", hello, certs)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "seed: server 0, client 7" in e.value.details()


@pytest.mark.slow
def test_malformed_messages_are_refused_and_the_server_keeps_serving(live, certs):
    server, address = live
    incarnation = _hello(server, address, certs)["incarnation"]
    specs = server.plan.payload  # activations [1, 16, 54] f32, labels [1, 16] u8, indices
    valid = {
        "activations": np.ones(specs[0].shape, np.float32),
        "labels": np.arange(16, dtype=np.uint8).reshape(specs[1].shape) % 10,
        "side/indices": np.broadcast_to(np.arange(54, dtype=np.int32), specs[2].shape),
    }

    def step(seq=1, **changes):
        arrays = {**valid, **changes}
        meta = {"client": 0, "seq": seq, "incarnation": incarnation}
        body = wire.encode(wire.STEP, meta, [(k, v, wire.RAW_CODEC) for k, v in arrays.items()])
        return _call(address, "Step", body, certs)

    applied_before = server.server_step
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    bad = [
        dict(activations=np.ones((1, 16, 55), np.float32)),  # shape
        dict(activations=np.ones(specs[0].shape, np.float64)),  # dtype
        dict(activations=np.full(specs[0].shape, np.nan, np.float32)),  # non-finite
        dict(labels=np.full(specs[1].shape, 10, np.uint8)),  # class out of range
        {"side/indices": np.full(specs[2].shape, 17 * 32, np.int32)},  # index out of range
    ]
    for changes in bad:
        assert _code(lambda changes=changes: step(**changes)) == invalid, changes
    body = wire.encode(wire.STEP, {"client": 0, "seq": 1, "incarnation": incarnation})
    assert _code(lambda: _call(address, "Step", body, certs)) == invalid  # no arrays
    assert _code(lambda: _call(address, "Step", b"\0" * 64, certs)) == invalid  # garbage
    assert _code(lambda: step(seq=0)) == invalid
    stale = wire.encode(wire.STEP, {"client": 0, "seq": 1, "incarnation": "old"})
    assert _code(lambda: _call(address, "Step", stale, certs)) == grpc.StatusCode.ABORTED
    huge = np.zeros(server.plan.max_request_bytes() // 4 + 1, np.float32)
    oversized = lambda: step(activations=huge)
    assert _code(oversized) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert server.server_step == applied_before  # nothing of them reached the model

    reply = step()  # the server still serves, and applies a valid step once
    assert reply.meta["status"] == "applied" and reply.arrays[0].shape == specs[0].shape
    assert step().meta["status"] == "cached"  # a repeat gets the same reply ...
    assert server.server_step == applied_before + 1  # ... and is not applied twice
    assert server.stats["replayed"] == 1


# ---- Processes: one client, faults, several clients ----------------------------------------

RUN = {"budget.steps": 16, "log_every_steps": 1, "checkpoint_every_steps": 4}


@pytest.fixture(scope="module")
def in_process(fashion_dir, tmp_path_factory):
    """The run of one process, and its final parameters (client, then server)."""
    config = load_config(net_kit.tiny_overrides(fashion_dir, **RUN))
    workdir = str(tmp_path_factory.mktemp("in_process"))
    summary = train.train_and_evaluate(config, workdir)
    state = train.Checkpoints(workdir, 1).restore(train.setup(config).initial_state)
    return config, summary, workdir, jax.tree.leaves((state.client, state.server))


def net_leaves(config, client_dir, server_dir):
    """The final client and server parameters of a networked run, from its checkpoints."""
    from adc_jax.net.checkpoints import Checkpoints

    init = train.setup(config, open_test=False).initial_state
    client = Checkpoints(os.path.join(client_dir, "checkpoints"))
    c, _ = client.restore(
        client.steps()[-1], {"client": init.client, "step": init.step, "rng": init.rng}
    )
    server = Checkpoints(os.path.join(server_dir, "checkpoints"))
    gradients = np.zeros((1, 1, 8, 8, 32), np.float32)  # ADC ξ = 0.25 at B = 16
    s, _ = server.restore(server.steps()[-1], {"server": init.server, "gradients": gradients})
    return jax.tree.leaves((c["client"], s["server"]))


def losses(workdir):
    rows = net_kit.read_jsonl(os.path.join(str(workdir), "metrics.jsonl"))
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def assert_same_run(in_process, client_dir, server_dir):
    config, summary, workdir, expected = in_process
    assert losses(client_dir) == losses(workdir)
    assert net_kit.summary(client_dir)["test_accuracy"] == summary["test_accuracy"]
    got = net_leaves(config, client_dir, server_dir)
    assert len(got) == len(expected)
    for x, y in zip(got, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_one_client_over_the_network_gives_the_in_process_run(in_process, fashion_dir, tmp_path):
    overrides = net_kit.tiny_overrides(fashion_dir, **RUN)
    server, address = net_kit.start_server(tmp_path / "server", overrides)
    client = net_kit.start_client(
        tmp_path / "client", overrides, address, tmp_path / "server" / "token"
    )
    try:
        assert client.wait() == 0, client.output()[-3000:]
        assert server.wait() == 0, server.output()[-3000:]
    finally:
        client.stop()
        server.stop()
    assert_same_run(in_process, tmp_path / "client", tmp_path / "server")
    s = net_kit.summary(tmp_path / "client")
    for direction in ("up", "down"):  # the accounting, plus framing
        accounted, measured = s[f"bytes_{direction}"], s[f"wire_bytes_step_{direction}"]
        assert accounted < measured < 1.05 * accounted
        assert s[f"wire_bytes_{direction}"] >= measured + s[f"wire_bytes_eval_{direction}"]


@pytest.mark.slow
def test_a_diverged_run_stops_both_sides_with_one_paragraph_and_saves_nothing(
    fashion_dir, tmp_path
):
    """Adam at 1e5 (as in test_runs): the first non-finite step stops the client with the
    one-paragraph divergence message, the server logs it, and neither side saves that state."""
    overrides = net_kit.tiny_overrides(fashion_dir, **{**RUN, "optimizer.learning_rate": 1e5})
    server, address = net_kit.start_server(tmp_path / "server", overrides)
    client = net_kit.start_client(
        tmp_path / "client", overrides, address, tmp_path / "server" / "token"
    )
    try:
        assert client.wait() == 1, client.output()[-3000:]
    finally:
        client.stop()
        server.stop()
    out = client.output()
    assert "not finite at step 2" in out and "Traceback" not in out, out[-3000:]
    events = net_kit.read_jsonl(tmp_path / "server" / "events.jsonl")
    assert [e["seq"] for e in events if e["event"] == "diverged"] == [2]
    for side in ("client", "server"):  # checkpoints every 4 steps: none was due before step 2
        assert not os.listdir(tmp_path / side / "checkpoints"), side
    logged = net_kit.read_jsonl(tmp_path / "client" / "metrics.jsonl")
    assert not any("loss" in r and r["step"] >= 2 for r in logged)
    # The client's workdir is marked: the same command again is refused before any connection.
    again = net_kit.start_client(
        tmp_path / "client", overrides, address, tmp_path / "server" / "token", timeout=60
    )
    try:
        assert again.wait() == 1
    finally:
        again.stop()
    assert "holds a run that diverged" in again.output(), again.output()[-3000:]


@pytest.mark.slow
def test_a_non_finite_payload_is_never_sent(fashion_dir, tmp_path):
    """The client's forward pass made non-finite at step 3 (as a bad batch would): the client
    stops there with the divergence message, and the server never receives step 3."""
    config = load_config(net_kit.tiny_overrides(fashion_dir, **RUN))
    server = SplitServer(config, str(tmp_path / "server"), token=TOKEN)
    address = server.start("127.0.0.1:0")
    try:
        client = SplitClient(config, address, str(tmp_path / "client"), token=TOKEN)
        forward, calls = client.exp.programs.client_forward, []

        def poisoned(state, batch):
            payload, vjp = forward(state, batch)
            calls.append(None)
            if len(calls) == 3:
                payload = payload._replace(activations=payload.activations * np.nan)
            return payload, vjp

        programs = client.exp.programs._replace(client_forward=poisoned)
        client.exp = dataclasses.replace(client.exp, programs=programs)
        with pytest.raises(runs.RunDiverged, match="not finite at step 3"):
            client.run(evaluate=False)
        assert server.applied == [2]
    finally:
        server.request_stop("test over")
        server.close()
    with pytest.raises(runs.RunDiverged, match="holds a run that diverged"):
        runs.check_not_diverged(str(tmp_path / "client"))


@pytest.mark.slow
def test_killing_and_restarting_each_side_gives_the_uninterrupted_run(
    in_process, fashion_dir, tmp_path
):
    # A link latency makes a step take over 100 ms, so that the kills land mid-run.
    overrides = net_kit.tiny_overrides(
        fashion_dir, **RUN, **{"net.up_latency_ms": 50.0, "net.down_latency_ms": 50.0}
    )
    server_dir, client_dir = tmp_path / "server", tmp_path / "client"
    token = server_dir / "token"
    server, address = net_kit.start_server(server_dir, overrides)
    client = net_kit.start_client(client_dir, overrides, address, token)
    try:
        net_kit.wait_for_step(client_dir, 6, client)
        client.kill()  # the server has applied steps the client's checkpoint lacks
        client = net_kit.start_client(client_dir, overrides, address, token)
        net_kit.wait_for_step(client_dir, 10, client)
        server.kill()  # the client has steps the server's checkpoint lacks
        server, _ = net_kit.start_server(server_dir, overrides, listen=address)
        assert client.wait() == 0, client.output()[-3000:]
        assert server.wait() == 0, server.output()[-3000:]
    finally:
        client.stop()
        server.stop()
    assert_same_run(in_process, client_dir, server_dir)
    events = net_kit.read_jsonl(server_dir / "events.jsonl")
    assert [e["event"] for e in events].count("rollback") >= 1  # the server met the client
    assert any(e.get("action") == "rollback" for e in events)  # the client met the server
    assert net_kit.summary(server_dir)["applied"] == [RUN["budget.steps"]]


@pytest.mark.slow
def test_two_clients_train_on_their_shards_and_average_their_halves(fashion_dir, tmp_path):
    overrides = net_kit.tiny_overrides(
        fashion_dir, **{"net.num_clients": 2, "net.sync_every": 2, "budget.steps": 4}
    )
    server, address = net_kit.start_server(tmp_path / "server", overrides)
    clients = [
        net_kit.start_client(
            tmp_path / f"client{i}",
            overrides,
            address,
            tmp_path / "server" / "token",
            extra=["--client_index", str(i)],
        )
        for i in range(2)
    ]
    try:
        for c in clients:
            assert c.wait() == 0, c.output()[-3000:]
        assert server.wait() == 0, server.output()[-3000:]
    finally:
        for p in (*clients, server):
            p.stop()
    assert net_kit.summary(tmp_path / "server")["applied"] == [4, 4]
    summaries = [net_kit.summary(tmp_path / f"client{i}") for i in range(2)]
    assert [s["batch_size"] for s in summaries] == [8, 8]
    first = [losses(tmp_path / f"client{i}")[2] for i in range(2)]
    assert first[0] != first[1]  # different shards
    syncs = [
        e for e in net_kit.read_jsonl(tmp_path / "server" / "events.jsonl") if e["event"] == "sync"
    ]
    assert {e["round"] for e in syncs} == {1, 2}
    assert all(e["members"] == [0, 1] for e in syncs)
    # Both end on the same averaged client half with the same server half.
    assert summaries[0]["test_accuracy"] == summaries[1]["test_accuracy"]


# ---- Bytes on the wire for every method ----------------------------------------------------

METHODS = {
    "base": {},
    "adc": {"method.xi": 0.25},
    "c3sl": {"method.ratio": 4},
    "bottlenet": {"method.compression": 0.25},
    "topk": {"method.rate": 0.1},
    "randtopk": {"method.rate": 0.1},
    "quantize": {"method.bits": 8},
    "fedlite": {"method.num_subvectors": 136, "method.num_centroids": 16},
}


@pytest.mark.slow
def test_wire_bytes_are_the_accounting_plus_framing_for_every_method(fashion_dir, tmp_path):
    """Two steps per method between a server and a client in this process, over loopback."""
    source = train.open_data(load_config(net_kit.tiny_overrides(fashion_dir)), "train")
    for name, options in METHODS.items():
        overrides = net_kit.tiny_overrides(
            fashion_dir, **{"method.name": name, **options, "batch_size": 64, "budget.steps": 2}
        )
        config = load_config(overrides)
        server = SplitServer(config, str(tmp_path / f"{name}-server"), token=TOKEN)
        address = server.start("127.0.0.1:0")
        try:
            workdir = str(tmp_path / f"{name}-client")
            client = SplitClient(config, address, workdir, token=TOKEN, train_source=source)
            summary = client.run(evaluate=False)
        finally:
            server.request_stop("test over")
            server.close()
        for direction in ("up", "down"):
            accounted, measured = (
                summary[f"bytes_{direction}"],
                summary[f"wire_bytes_step_{direction}"],
            )
            assert accounted < measured < 1.05 * accounted, (name, direction, measured, accounted)
