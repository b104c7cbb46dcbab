r"""Split learning over a real connection: the transport's overhead, and accuracy against time.

    python benchmarks/network.py wire [--steps 3] [--out docs/network_wire.jsonl]
    python benchmarks/network.py overhead [--steps 60] [--out docs/network_overhead.jsonl]
    python benchmarks/network.py time-to-accuracy [--seconds 100] [--eval-seconds 15] \
        [--mbps 10 100] [--latency-ms 5] [--out docs/network_time_to_accuracy.jsonl]
    python benchmarks/network.py plot [--jsonl docs/network_time_to_accuracy.jsonl] \
        [--png docs/network_time_to_accuracy.png]

Both measurements run ``configs/vit_fashion_mnist.py`` (the small ViT on real Fashion-MNIST,
batch 128, one CPU device per process) with a server and a client as two processes on
127.0.0.1 (``python -m adc_jax.net``), and print one JSON object per line (also appended to
``--out``), each with the machine's description and its 1-minute load.

* ``wire``: bytes per training step on the connection against the accounting, for every method
  (its default options; ``--steps`` steps, server and client in this process, loopback).
* ``overhead``: what the transport adds to a training step of Base and ADC (ξ = 0.1) over the
  unshaped loopback connection, measured inside the run: the median over steps of the client's
  exchange (encoding the payload, the call, checking and decoding the reply) minus the server's
  own step (``server_step``, the gradient's rounding and its copy to the host), i.e.
  serialisation and checks on both sides, gRPC, the byte-counting relay and the threads' hand-offs.
  Also the whole step's time in one process (``train.py``, the three-program split step) and over
  the network, as medians over 10-step windows after the first (compilation), with checkpoints
  and evaluation outside the windows; on a shared machine these two move by more than the
  transport's share.
* ``time-to-accuracy``: Base and ADC (ξ = 0.1, 0.25) over links of each ``--mbps`` (both
  directions, ``--latency-ms`` one way), each trained for ``--seconds`` of training time and
  evaluated on the whole test split every ``--eval-seconds`` of it. Training time excludes
  evaluation (which passes the link unshaped) and the first step (both sides compile then).
* ``plot`` draws test accuracy against training time, one panel per link speed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "vit_fashion_mnist.py")
METHODS = (("base", 1.0), ("adc", 0.1), ("adc", 0.25))


def machine() -> dict:
    from common import _cpu_name

    return {
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_1min": round(os.getloadavg()[0], 2),
    }


def emit(record: dict, out: str | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def _flags(overrides: dict) -> list[str]:
    return ["--config", CONFIG, *(f"--config.{k}={v}" for k, v in overrides.items())]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def run_network(overrides: dict, workdir: str, timeout: float) -> dict:
    """A server and a client process on 127.0.0.1; the client's summary and metric rows."""
    server_dir, client_dir = os.path.join(workdir, "server"), os.path.join(workdir, "client")
    os.makedirs(server_dir)
    with open(os.path.join(server_dir, "log"), "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "adc_jax.net", "server", *_flags(overrides)]
            + ["--listen", "127.0.0.1:0", "--workdir", server_dir],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_env(),
        )
    try:
        deadline = time.monotonic() + timeout
        address = None
        while address is None:
            with open(os.path.join(server_dir, "log")) as f:
                for line in f:
                    if line.startswith("listening on "):
                        address = line.split()[-1]
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: see {server_dir}/log")
            time.sleep(0.2)
        client = subprocess.run(
            [sys.executable, "-m", "adc_jax.net", "client", *_flags(overrides)]
            + ["--server", address, "--workdir", client_dir]
            + ["--token_file", os.path.join(server_dir, "token")],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=max(1.0, deadline - time.monotonic()),
        )
        if client.returncode:
            raise RuntimeError(f"the client failed:\n{client.stderr[-3000:]}")
        server.wait(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    with open(os.path.join(client_dir, "summary.json")) as f:
        summary = json.load(f)
    return {"summary": summary, "rows": _rows(os.path.join(client_dir, "metrics.jsonl"))}


def _rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def _window_times(points: list[tuple[int, float]]) -> list[float]:
    """Seconds per step between consecutive ``(step, seconds)`` points."""
    return [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(points, points[1:], strict=False)]


def wire(args) -> None:
    from adc_jax import train
    from adc_jax.methods import METHODS as ALL_METHODS
    from adc_jax.net.client import SplitClient
    from adc_jax.net.server import SplitServer

    spec = importlib.util.spec_from_file_location("vit_fashion_mnist", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    source = None
    for name in ALL_METHODS:
        config = module.get_config()
        config.method.name = name
        config.budget.steps = args.steps
        config.devices.count = 1
        config.progress = False
        source = source or train.open_data(config, "train")
        with tempfile.TemporaryDirectory() as tmp:
            server = SplitServer(config, os.path.join(tmp, "server"), token="benchmark")
            address = server.start("127.0.0.1:0")
            try:
                client = SplitClient(
                    config,
                    address,
                    os.path.join(tmp, "client"),
                    token="benchmark",
                    train_source=source,
                )
                s = client.run(evaluate=False)
            finally:
                server.request_stop("done")
                server.close()
        steps = s["steps"]
        emit(
            {
                "record": "wire",
                "method": name,
                "batch": s["batch_size"],
                "xi_nominal": s["xi_nominal"],
                "steps": steps,
                "accounted_per_step_up": s["bytes_up"] / steps,
                "wire_per_step_up": s["wire_bytes_step_up"] / steps,
                "accounted_per_step_down": s["bytes_down"] / steps,
                "wire_per_step_down": s["wire_bytes_step_down"] / steps,
                "framing_up": s["wire_bytes_step_up"] / s["bytes_up"] - 1,
                "framing_down": s["wire_bytes_step_down"] / s["bytes_down"] - 1,
                **machine(),
            },
            args.out,
        )


def overhead(args) -> None:
    base = {
        "budget.steps": args.steps,
        "log_every_steps": 10,
        "eval_every_steps": 100000,
        "checkpoint_every_steps": 100000,
        "devices.count": 1,
        "progress": False,
    }
    for name, xi in METHODS[:2]:
        overrides = {**base, "method.name": name, "method.xi": xi}
        with tempfile.TemporaryDirectory() as tmp:
            inproc = subprocess.run(
                [sys.executable, os.path.join(ROOT, "train.py"), *_flags(overrides)]
                + ["--workdir", os.path.join(tmp, "in_process")],
                capture_output=True,
                text=True,
                env=_env(),
                timeout=args.timeout,
            )
            if inproc.returncode:
                raise RuntimeError(inproc.stderr[-3000:])
            rows = _rows(os.path.join(tmp, "in_process", "metrics.jsonl"))
            in_process = [1 / r["steps_per_second"] for r in rows if "steps_per_second" in r][1:]
            net = run_network(overrides, os.path.join(tmp, "net"), args.timeout)
        points = [(r["step"], r["train_seconds"]) for r in net["rows"] if "loss" in r]
        over_net = _window_times(points)
        s = net["summary"]
        per_step = statistics.median(over_net) - statistics.median(in_process)
        emit(
            {
                "record": "overhead",
                "method": name,
                "xi": xi,
                "batch": s["batch_size"],
                "steps": s["steps"],
                "in_process_step_s": statistics.median(in_process),
                "network_step_s": statistics.median(over_net),
                "transport_per_step_s": s["transport_seconds_median"],
                "exchange_per_step_s": s["exchange_seconds_median"],
                "server_step_s": s["server_step_seconds_median"],
                "step_difference_s": per_step,
                "in_process_windows_s": in_process,
                "network_windows_s": over_net,
                "bytes_per_step_up": s["bytes_up"] / s["steps"],
                "bytes_per_step_down": s["bytes_down"] / s["steps"],
                "wire_per_step_up": s["wire_bytes_step_up"] / s["steps"],
                "wire_per_step_down": s["wire_bytes_step_down"] / s["steps"],
                **machine(),
            },
            args.out,
        )


def time_to_accuracy(args) -> None:
    for mbps in args.mbps:
        for name, xi in METHODS:
            overrides = {
                "method.name": name,
                "method.xi": xi,
                "budget.steps": 1000000,
                "net.max_train_seconds": args.seconds,
                "net.eval_every_seconds": args.eval_seconds,
                "eval_every_steps": 1000000,
                "checkpoint_every_steps": 1000000,
                "log_every_steps": 10,
                "devices.count": 1,
                "progress": False,
                "net.up_mbps": mbps,
                "net.down_mbps": mbps,
                "net.up_latency_ms": args.latency_ms,
                "net.down_latency_ms": args.latency_ms,
            }
            with tempfile.TemporaryDirectory() as tmp:
                run = run_network(overrides, tmp, args.timeout)
            s = run["summary"]
            points = [
                [r["train_seconds"], r["step"], r["test_accuracy"]]
                for r in run["rows"]
                if "test_accuracy" in r
            ]
            emit(
                {
                    "record": "time_to_accuracy",
                    "method": name,
                    "xi": xi,
                    "mbps": mbps,
                    "latency_ms": args.latency_ms,
                    "batch": s["batch_size"],
                    "train_seconds": s["train_seconds"],
                    "steps": s["steps"],
                    "test_accuracy": s["test_accuracy"],
                    "points": points,  # [training seconds, step, test accuracy]
                    "bytes_up": s["bytes_up"],
                    "bytes_down": s["bytes_down"],
                    "wire_bytes_step_up": s["wire_bytes_step_up"],
                    "wire_bytes_step_down": s["wire_bytes_step_down"],
                    **machine(),
                },
                args.out,
            )


def plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(args.jsonl) as f:
        records = [r for r in map(json.loads, f) if r.get("record") == "time_to_accuracy"]
    speeds = sorted({r["mbps"] for r in records})
    fig, axes = plt.subplots(1, len(speeds), figsize=(5.5 * len(speeds), 4), sharey=True)
    for ax, mbps in zip(list(getattr(axes, "flat", [axes])), speeds, strict=True):
        for r in (r for r in records if r["mbps"] == mbps):
            label = "Base" if r["method"] == "base" else f"ADC ξ={r['xi']:g}"
            t, _, acc = zip(*r["points"], strict=True)
            ax.plot(t, acc, marker="o", ms=3, label=f"{label} ({r['steps']} steps)")
        ax.set_title(f"{mbps:g} Mbit/s each way, {records[0]['latency_ms']:g} ms latency")
        ax.set_xlabel("training time (s)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    axes_list = list(getattr(axes, "flat", [axes]))
    axes_list[0].set_ylabel("test accuracy (Fashion-MNIST)")
    fig.suptitle(f"Small ViT, batch {records[0]['batch']}, client and server over loopback TCP")
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"wrote {args.png}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("wire")
    w.add_argument("--steps", type=int, default=3)
    w.add_argument("--out", default=None)
    o = sub.add_parser("overhead")
    o.add_argument("--steps", type=int, default=60)
    o.add_argument("--out", default=None)
    o.add_argument("--timeout", type=float, default=1200)
    t = sub.add_parser("time-to-accuracy")
    t.add_argument("--seconds", type=float, default=100)
    t.add_argument("--eval-seconds", type=float, default=15)
    t.add_argument("--mbps", type=float, nargs="+", default=[10.0, 100.0])
    t.add_argument("--latency-ms", type=float, default=5.0)
    t.add_argument("--out", default=None)
    t.add_argument("--timeout", type=float, default=1200)
    g = sub.add_parser("plot")
    g.add_argument("--jsonl", default=os.path.join(ROOT, "docs", "network_time_to_accuracy.jsonl"))
    g.add_argument("--png", default=os.path.join(ROOT, "docs", "network_time_to_accuracy.png"))
    args = p.parse_args(argv)
    commands = {"wire": wire, "overhead": overhead, "time-to-accuracy": time_to_accuracy}
    commands["plot"] = plot
    commands[args.command](args)


if __name__ == "__main__":
    main()
