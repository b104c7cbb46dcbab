"""Times one split-learning training step, program by program, in one process.

One configuration (model, batch, method, ξ, dtype, ...) per process; JSON lines on stdout::

    python benchmarks/step.py --model deit_tiny_patch16_224 --batch 32 --method adc --xi 0.1
    python benchmarks/step.py --batch 64 --xi 0.1 --paired-base   # ADC and Base, alternated
    python benchmarks/step.py --input --batch 128                 # the input path only

``benchmarks/grid.py`` runs this script over a grid of configurations (one process each, with
PyTorch's step as a yardstick) and makes tables of the records; ``benchmarks/gpu.sh`` runs it for
a GPU.

Records (every one carries the device, versions, XLA flags and the 1-minute load average):

* ``record="time"``, ``phase`` ∈ ``client_forward``, ``compress``, ``compress_fwd_bwd``,
  ``server_step``, ``client_backward``, ``step``, ``fused_step``: ``median_s`` of ``--steps``
  calls after warm-up, each ending in ``block_until_ready``. ``client_forward``,
  ``server_step`` and ``client_backward`` are the three jitted programs of
  :func:`adc_jax.split.jit_programs`, timed one at a time; ``step`` is the three run back to back
  (:meth:`~adc_jax.split.Programs.split_step`, one wait at the end); ``fused_step`` is the
  single-program step; these two are timed alternately (one call of each per round), so that
  their ratio compares calls made under the same machine conditions. ``compress`` is the
  method's encoder alone on the client's output (ADC: K-means, token selection, gather and
  merge: everything ADC adds), ``compress_fwd_bwd`` the same with its backward pass. Both are
  measured outside the step; inside the step the ADC client runs the cheaper form (clustering,
  then merging of the kept tokens only).
* ``record="memory"``: peak bytes for the configuration (``peak_source``: ``device`` allocator
  statistics where the backend has them, else ``process_max_rss``, the process's own maximum
  RSS: one configuration per process keeps it the configuration's).
* ``record="ratio"``: ``compress / step`` (ADC's overhead), ``step / fused_step``.
* ``record="check"``: compilations per program after all the timed calls (1 = no recompilation).
* ``--paired-base`` (an ADC configuration): ``record="paired"``, ``phase`` ∈ ``adc_step``,
  ``adc_fused_step``, ``base_step``, ``base_fused_step``, the four timed alternately in one
  process, and ``record="paired_ratio"`` (``step_over_base``, ``fused_step_over_base``): the
  ratio of ADC's step to Base's without the drift between two processes.
* ``--paired-torch`` (Base, with ``--torch-python``): ``record="paired_torch"``, ``phase`` ∈
  ``fused_step``, ``step`` (ours), ``torch_step``, ``torch_split_step`` (PyTorch's, timed in its
  own process, ``torch_step.py --serve``), one call of each in turn per round with a 0.2 s pause
  between them, and ``record="paired_torch_ratio"`` (``fused_over_torch``, ``split_over_torch``):
  ours over PyTorch's without the drift between two processes run minutes apart.
* ``record="input"``: host→device bytes per step of a uint8 32×32×3 batch (CIFAR, as the training
  loop ships it) and of a float32 batch at the model's resolution, their ``device_put`` times, and
  the time of the on-device augmentation (:func:`adc_jax.augment.train_augment`: RandAugment,
  colour jitter, resize to the model's size, flip, normalise) per batch.

``--dtype bfloat16`` (compute dtype of the model), ``--attention`` (XLA's or cuDNN's attention
kernel) and ``--no-donate`` (no buffer donation) are there so that accelerator choices are visible
in the same script; on a CPU none helps. Records carry them.

Environment: unless ``--xla-default``, the XLA CPU flags of ``common.TUNED_CPU_XLA_FLAGS`` are
added to ``XLA_FLAGS``. The allocator matters on a CPU (why: the comment in
``benchmarks/common.py``): ``benchmarks/grid.py`` sets it for its processes; for one configuration,
set it yourself:
``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python benchmarks/step.py ...``.
Every record names the flags and tunables it ran with.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    add_torch_arguments,
    configure_xla,
    emit,
    environment,
    peak_memory,
    summary,
    timed,
    timed_interleaved,
    torch_command,
)

from adc_jax import augment, split, vit  # noqa: E402
from adc_jax.kmeans import kmeans  # noqa: E402
from adc_jax.methods import ADC, Base, CutShape  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="deit_tiny_patch16_224")
    p.add_argument("--split-index", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=100, help="head size (CIFAR-100: 100)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--method", choices=("base", "adc"), default="adc")
    p.add_argument("--xi", type=float, default=0.1, help="ADC compression ratio")
    p.add_argument("--steps", type=int, default=5, help="timed calls per phase (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (compilation)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument(
        "--attention",
        choices=vit.ATTENTION_IMPLEMENTATIONS,
        default="auto",
        help="attention of the blocks that need no CLS row (adc_jax.vit.dot_product_attention)",
    )
    p.add_argument("--no-donate", dest="donate", action="store_false", help="no buffer donation")
    p.add_argument(
        "--no-select",
        dest="select",
        action="store_false",
        help="ADC client computes all N tokens of its last block (the unoptimised path)",
    )
    p.add_argument(
        "--xla-default",
        dest="xla_tuned",
        action="store_false",
        help="JAX's default XLA flags (else common.TUNED_CPU_XLA_FLAGS are added to XLA_FLAGS)",
    )
    p.add_argument("--input", action="store_true", help="time the input path only")
    p.add_argument(
        "--paired-base",
        action="store_true",
        help="time this ADC configuration's steps and Base's alternately in one process",
    )
    p.add_argument(
        "--paired-torch",
        action="store_true",
        help="Base: time our steps and PyTorch's (--torch-python, benchmarks/torch_step.py "
        "--serve) alternately, one call at a time, PyTorch in a second process",
    )
    add_torch_arguments(
        p,
        "with --paired-torch: an interpreter with torch + timm for benchmarks/torch_step.py "
        "(bfloat16: --amp)",
    )
    return p.parse_args(argv)


# ---- One configuration ----------------------------------------------------------------------


def _config(args) -> dict[str, Any]:
    return {
        "model": args.model,
        "split_index": args.split_index,
        "batch": args.batch,
        "method": args.method,
        "xi": args.xi if args.method == "adc" else 1.0,
        "dtype": args.dtype,
        "attention": args.attention,
        "donate": args.donate,
        "select_in_client": args.select,
    }


def _programs(protocol: split.Protocol, donate: bool) -> split.Programs:
    if donate:
        return split.jit_programs(protocol)
    jit = lambda f: jax.jit(partial(f, protocol))
    return split.Programs(
        jit(split.client_forward),
        jit(split.server_step),
        jit(split.client_backward),
        jit(split.fused_step),
        jit(split.evaluate_batch),
    )


def setup(args):
    """Model, protocol, fresh state and one device batch of random images and labels."""
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    model = vit.make_model(
        args.model,
        split_index=args.split_index,
        num_classes=args.num_classes,
        dtype=dtype,
        attention=args.attention,
    )
    method = ADC(xi=args.xi) if args.method == "adc" else Base()
    protocol = split.Protocol(
        client_apply=model.apply_client,
        server_apply=model.apply_server,
        method=method,
        num_classes=args.num_classes,
        client_tx=optax.adam(1e-4),
        server_tx=optax.adam(1e-4),
        select_in_client=args.select,
    )
    params = model.init(jax.random.key(0))
    cut = CutShape(args.batch, model.seq_len, model.width, args.num_classes)
    state = split.init_state(protocol, jax.random.key(1), params["client"], params["server"], cut)
    cfg = model.config
    shape = (args.batch, cfg.image_size, cfg.image_size, cfg.in_chans)
    batch = {
        "image": jax.random.normal(jax.random.key(2), shape, jnp.float32),
        "label": jax.random.randint(jax.random.key(3), (args.batch,), 0, args.num_classes),
    }
    return model, protocol, state, jax.device_put(batch)


def bench_config(args) -> list[dict[str, Any]]:
    base = {**_config(args), **environment()}
    records = []

    def add(phase, result, **extra):
        records.append({"record": "time", "phase": phase, **result, **extra, **base})

    model, protocol, state, batch = setup(args)
    if args.method == "adc":
        plan = protocol.method.plan(args.batch, model.seq_len)
        base.update(num_clusters=plan.num_clusters, num_tokens=plan.num_tokens, xi_actual=plan.xi)
    programs = _programs(protocol, args.donate)
    steps, warmup = args.steps, max(args.warmup, 1)

    # ---- Warm-up: compiles the three programs -----------------------------------------------
    first = []
    for _ in range(warmup):
        start = _now()
        state, metrics = programs.split_step(state, batch)
        jax.block_until_ready((state, metrics))
        first.append(_now() - start)

    # ---- The three programs, one at a time ---------------------------------------------------
    state = _time_programs(programs, state, batch, steps, add)

    # ---- The whole split step, then the fused program ---------------------------------------
    def split_call():
        nonlocal state
        state, m = programs.split_step(state, batch)
        return state, m

    def fused_call():
        nonlocal state
        state, m = programs.fused_step(state, batch)
        return state, m

    # Alternated, so that split / fused compares calls made under the same machine conditions.
    both = timed_interleaved({"step": split_call, "fused_step": fused_call}, steps, warmup)
    add("step", both["step"], first_s=round(first[0], 4))
    add("fused_step", both["fused_step"])

    # ---- The method's encoder alone (ADC: everything ADC adds to the step) -----------------
    _bench_compress(args, model, protocol, state, batch, add)

    # ---- Recompilation and memory ----------------------------------------------------------
    compiles = {
        name: _cache_size(getattr(programs, name))
        for name in ("client_forward", "server_step", "client_backward", "fused_step")
    }
    records.append({"record": "check", "compilations": compiles, **base})
    records.append({"record": "memory", **peak_memory(), **base})
    times = {r["phase"]: r["median_s"] for r in records if r["record"] == "time"}
    ratios = {"split_over_fused": times["step"] / times["fused_step"]}
    if args.method == "adc":
        ratios["compress_over_step"] = times["compress"] / times["step"]
        ratios["compress_fwd_bwd_over_step"] = times["compress_fwd_bwd"] / times["step"]
    records.append({"record": "ratio", **ratios, **base})
    return records


def _stepper(state, batch):
    """``step(run)``: one call of a step program (split or fused) on the state the previous call
    left, keeping the new one; returns ``(state, metrics)``."""
    holder = [state]

    def step(run):
        holder[0], metrics = run(holder[0], batch)
        return holder[0], metrics

    return step


def bench_paired(args) -> list[dict[str, Any]]:
    """An ADC configuration's steps and Base's at the same batch, alternated in one process.

    ``step(ξ) / step(Base)`` from two runs of this script divides times measured in two processes
    minutes apart, and a shared virtual CPU drifts by several percent over minutes; here each
    round calls ADC's split step, ADC's fused step, Base's split step and Base's fused step once,
    so that a slow spell lands on all four alike.
    """
    if args.method != "adc":
        raise SystemExit("--paired-base compares an ADC configuration (--method adc) with Base.")
    env = {**_config(args), **environment()}
    calls = {}
    for name, config in (
        ("adc", args),
        ("base", argparse.Namespace(**{**vars(args), "method": "base"})),
    ):
        _, protocol, state, batch = setup(config)
        programs = _programs(protocol, config.donate)
        step = _stepper(state, batch)
        calls[f"{name}_step"] = partial(step, programs.split_step)
        calls[f"{name}_fused_step"] = partial(step, programs.fused_step)
    times = timed_interleaved(calls, args.steps, max(args.warmup, 1))
    records = [{"record": "paired", "phase": name, **t, **env} for name, t in times.items()]
    median = {name: t["median_s"] for name, t in times.items()}
    ratios = {
        "step_over_base": median["adc_step"] / median["base_step"],
        "fused_step_over_base": median["adc_fused_step"] / median["base_fused_step"],
    }
    records.append({"record": "paired_ratio", **ratios, **env})
    return records


# Seconds between handing the cores from one framework to the other: their idle worker threads
# (XLA's pool, PyTorch's OpenMP team) spin for a while after each call before they sleep.
HANDOVER_PAUSE_S = 0.2


def bench_paired_torch(args) -> list[dict[str, Any]]:
    """Our Base steps and PyTorch's at the same batch, alternated call by call.

    Ours over PyTorch's from two processes run minutes apart carries a shared machine's drift (4-5 %
    between two grids on a 2-core VM); here PyTorch's step runs in a second process
    (``torch_step.py --serve``, started now, same environment) that waits on a pipe while ours
    runs, and each round calls our fused step, PyTorch's step, our split step and PyTorch's split
    step once.
    """
    if args.method != "base" or not args.torch_python:
        raise SystemExit("--paired-torch times Base (--method base) against --torch-python.")
    env = {**_config(args), **environment()}
    _, protocol, state, batch = setup(args)
    programs = _programs(protocol, args.donate)
    step = _stepper(state, batch)

    def ours(run):
        start = time.perf_counter()
        jax.block_until_ready(step(run))
        return time.perf_counter() - start

    command = torch_command(args, args.batch, "--serve")
    server = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def theirs(phase):
        server.stdin.write(phase + "\n")
        server.stdin.flush()
        return json.loads(server.stdout.readline())["s"]

    calls = {
        "fused_step": lambda: ours(programs.fused_step),
        "torch_step": lambda: theirs("step"),
        "step": lambda: ours(programs.split_step),
        "torch_split_step": lambda: theirs("split_step"),
    }
    times = {name: [] for name in calls}
    try:
        for round_ in range(max(args.warmup, 1) + args.steps):
            for name, call in calls.items():
                time.sleep(HANDOVER_PAUSE_S)
                elapsed = call()  # PyTorch's is its own time of the call, without the pipe
                if round_ >= max(args.warmup, 1):
                    times[name].append(elapsed)
    finally:
        server.stdin.close()
        server.wait()
    records = [
        {"record": "paired_torch", "phase": name, **summary(t), **env} for name, t in times.items()
    ]
    median = {name: summary(t)["median_s"] for name, t in times.items()}
    ratios = {
        "fused_over_torch": median["fused_step"] / median["torch_step"],
        "split_over_torch": median["step"] / median["torch_split_step"],
    }
    records.append({"record": "paired_torch_ratio", **ratios, **env})
    return records


def _time_programs(programs, state, batch, steps, add):
    """Times client_forward, server_step and client_backward one by one; returns the state."""
    add("client_forward", timed(lambda: programs.client_forward(state, batch), steps, 0))
    payload, vjp = programs.client_forward(state, batch)
    server, grad, finite = state.server, None, None

    def server_call():
        nonlocal server, grad, finite
        server, grad, metrics = programs.server_step(server, state.method_state, payload)
        finite = metrics["finite"]
        return server, grad

    add("server_step", timed(server_call, steps, 0))
    client, count, bad_step = state.client, state.step, state.bad_step

    def client_call():
        nonlocal client, count, bad_step
        client, count, bad_step = programs.client_backward(
            client, count, vjp, grad, bad_step, finite
        )
        return client, count

    add("client_backward", timed(client_call, steps, 0))
    return state._replace(server=server, client=client, step=count, bad_step=bad_step)


def _bench_compress(args, model, protocol, state, batch, add) -> None:
    """Times ``method.encode`` on the client's real output: forward, and forward + backward."""
    method = protocol.method
    tokens, scores = jax.jit(model.apply_client)(state.client.params["model"], batch["image"])
    labels, key = batch["label"], jax.random.key(4)

    def encode(tokens):
        payload = method.encode(
            {}, state.method_state, tokens, scores, labels, key, num_classes=args.num_classes
        )
        return payload.activations, payload.labels

    forward = jax.jit(encode)

    @jax.jit
    def forward_backward(tokens):
        (activations, soft), vjp = jax.vjp(encode, tokens)
        return activations, soft, vjp((jnp.ones_like(activations), jnp.zeros_like(soft)))[0]

    extra = {}
    if args.method == "adc":  # Lloyd iterations this batch takes (the while loop's trip count)
        plan = method.plan(args.batch, model.seq_len)
        run = partial(kmeans, num_clusters=plan.num_clusters, key=key, max_iters=method.max_iters)
        extra["kmeans_iters"] = int(jax.jit(lambda s: run(s, tol=method.tol).num_iters)(scores))
    add("compress", timed(lambda: forward(tokens), args.steps, 2), **extra)
    add("compress_fwd_bwd", timed(lambda: forward_backward(tokens), args.steps, 2), **extra)


def _cache_size(fn) -> int | None:
    size = getattr(fn, "_cache_size", None)
    return size() if callable(size) else None


def _now() -> float:
    return time.perf_counter()


# ---- The input path ---------------------------------------------------------------------------


def bench_input(args) -> list[dict[str, Any]]:
    """Host→device bytes per step and the on-device augmentation, per batch of ``args.batch``."""
    cfg = vit.get_model_config(args.model)
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 256, (args.batch, 32, 32, cfg.in_chans), dtype=np.uint8)
    full = rng.standard_normal((args.batch, cfg.image_size, cfg.image_size, cfg.in_chans))
    full = full.astype(np.float32)
    base = {"model": args.model, "batch": args.batch, **environment()}
    records = []
    for name, host in (("uint8_32px", stored), ("float32_full", full)):
        result = timed(lambda host=host: jax.device_put(host), args.steps, 1)
        record = {"record": "input", "phase": f"h2d_{name}", "bytes": int(host.nbytes), **result}
        records.append({**record, **base})
    augment_fn = jax.jit(
        partial(augment.train_augment, image_size=cfg.image_size, mean=cfg.mean, std=cfg.std)
    )
    images = jax.device_put(stored)
    keys = iter(jax.random.split(jax.random.key(5), args.steps + 2))
    result = timed(lambda: augment_fn(images, next(keys)), args.steps, 2)
    record = {"record": "input", "phase": "augment", "output_bytes": 4 * int(full.size), **result}
    records.append({**record, **base})
    return records


def main(argv=None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    configure_xla(args.xla_tuned)
    if args.input:
        records = bench_input(args)
    elif args.paired_base:
        records = bench_paired(args)
    elif args.paired_torch:
        records = bench_paired_torch(args)
    else:
        records = bench_config(args)
    for record in records:
        emit(record)
    return records


if __name__ == "__main__":
    main()
