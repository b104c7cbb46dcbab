"""Times one split-learning training step, program by program (GitHub issues #2 and #8).

One configuration (model, batch, method, ξ) per call; JSON lines on stdout::

    python benchmarks/step.py --model deit_tiny_patch16_224 --batch 32 --method adc --xi 0.1
    python benchmarks/step.py --grid          # B ∈ {32, 64, 128} × {base, adc ξ=.5/.1/.01}
    python benchmarks/step.py --input --batch 128   # the input path only
    python benchmarks/step.py --summarize runs.jsonl  # tables of records written earlier

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
  statistics where the backend has them, else ``process_max_rss``: each configuration of a grid
  runs in its own process so that the maximum RSS is its own).
* ``record="ratio"``: ``compress / step`` (ADC's overhead), ``step / fused_step``.
* ``record="check"``: compilations per program after all the timed calls (1 = no recompilation).
* ``--paired-base`` (an ADC configuration): ``record="paired"``, ``phase`` ∈ ``adc_step``,
  ``adc_fused_step``, ``base_step``, ``base_fused_step``, the four timed alternately in one
  process, and ``record="paired_ratio"`` (``step_over_base``, ``fused_step_over_base``): the
  ratio of ADC's step to Base's without the drift between two processes (the grid adds this run
  for B = 64, ξ = 0.1, the configuration of issue #8's target).
* ``--paired-torch`` (Base, with ``--torch-python``): ``record="paired_torch"``, ``phase`` ∈
  ``fused_step``, ``step`` (ours), ``torch_step``, ``torch_split_step`` (PyTorch's, timed in its
  own process, ``torch_step.py --serve``), one call of each in turn per round with a 0.2 s pause
  between them, and ``record="paired_torch_ratio"`` (``fused_over_torch``, ``split_over_torch``):
  ours over PyTorch's without the drift between two processes run minutes apart (the grid adds
  this run per batch size when it has ``--torch-python`` on a CPU).
* ``record="input"``: host→device bytes per step of a uint8 32×32×3 batch (CIFAR, as the training
  loop ships it) and of a float32 batch at the model's resolution, their ``device_put`` times, and
  the time of the on-device augmentation (:func:`adc_jax.augment.train_augment`: RandAugment,
  colour jitter, resize to the model's size, flip, normalise) per batch.
* with ``--grid`` (or ``--summarize``): ``record="summary"`` (step(ξ)/step(Base), ADC overhead,
  split/fused, images/s) and ``record="target"`` (the performance targets of issue #8, met or
  not); a Markdown table on stderr (stdout with ``--summarize``).

``--dtype bfloat16`` (compute dtype of the model), ``--attention`` (XLA's or cuDNN's attention
kernel) and ``--no-donate`` (no buffer donation) are there so that accelerator choices are visible
in the same script; on a CPU none helps. Records
carry them, and the tables keep each combination (the *variant*) apart; step/Base compares within
a variant, and the targets read the default one (float32, donated). ``benchmarks/gpu.sh`` runs
the set for a GPU.

Environment: unless ``--xla-default``, the XLA CPU flags of ``common.TUNED_CPU_XLA_FLAGS`` are
added to ``XLA_FLAGS``; the grid also runs every process (PyTorch's too) with tcmalloc preloaded
when the system has it, else with glibc's huge-page tunable (``--malloc``; why: the comment in
``benchmarks/common.py``). For a single configuration, set it yourself:
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
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    ALLOCATORS,
    allocator_env,
    configure_xla,
    emit,
    environment,
    peak_memory,
    summary,
    timed,
    timed_interleaved,
)

from adc_jax import augment, split, vit  # noqa: E402
from adc_jax.kmeans import kmeans  # noqa: E402
from adc_jax.methods import ADC, Base, CutShape  # noqa: E402

GRID_BATCHES = (32, 64, 128)
GRID_XIS = (0.5, 0.1, 0.01)
PHASES = ("client_forward", "compress", "server_step", "client_backward", "step", "fused_step")


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
    p.add_argument("--grid", action="store_true", help="the whole grid, one process per config")
    p.add_argument(
        "--torch-python",
        help="with --grid or --paired-torch: an interpreter with torch + timm; runs "
        "benchmarks/torch_step.py per batch size (2 threads) and reports our Base step over "
        "PyTorch's",
    )
    p.add_argument(
        "--malloc",
        choices=ALLOCATORS,
        default="auto",
        help="with --grid: the runs' allocator (JAX's and PyTorch's alike): tcmalloc (preloaded), "
        "thp (glibc with huge pages), system (as the environment has it), auto (tcmalloc if "
        "installed, else thp); see common.allocator_env",
    )
    p.add_argument(
        "--torch-device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="with --torch-python: where PyTorch runs (cpu: 2 threads)",
    )
    p.add_argument(
        "--summarize",
        nargs="+",
        metavar="JSONL",
        help="no timing: the ratios, targets and Markdown tables of records written earlier "
        "(JSON-lines files of this script and torch_step.py)",
    )
    p.add_argument("--batches", type=int, nargs="+", default=list(GRID_BATCHES))
    p.add_argument("--xis", type=float, nargs="+", default=list(GRID_XIS))
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

    ``step(ξ) / step(Base)`` from the grid divides times measured in two processes minutes apart,
    and a shared virtual CPU drifts by several percent over minutes; here each round calls ADC's
    split step, ADC's fused step, Base's split step and Base's fused step once, so that a slow
    spell lands on all four alike.
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

    Ours over PyTorch's from two processes run minutes apart carries the VM's drift (4-5 % between
    grids here); here PyTorch's step runs in a second process (``torch_step.py --serve``, started
    now, same environment) that waits on a pipe while ours runs, and each round calls our fused
    step, PyTorch's step, our split step and PyTorch's split step once.
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

    command = _torch_command(args, args.batch, "--serve")
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


# ---- The grid -------------------------------------------------------------------------------


def _torch_command(args, batch: int, *extra: str) -> list[str]:
    """``benchmarks/torch_step.py`` under ``--torch-python`` for this model, split and batch (2
    threads on a CPU), with ``extra`` arguments."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_step.py")
    device = ["--device", "cuda"] if args.torch_device == "cuda" else ["--threads", "2"]
    return [
        *(args.torch_python, script, "--model", args.model, "--batch", str(batch)),
        *("--split-index", str(args.split_index), "--num-classes", str(args.num_classes)),
        *device,
        *extra,
    ]


def run_grid(args) -> list[dict[str, Any]]:
    """Every configuration in its own process (clean peak memory), then ratios and targets."""
    records = []
    script = os.path.abspath(__file__)
    common = [
        "--model",
        args.model,
        "--split-index",
        str(args.split_index),
        "--num-classes",
        str(args.num_classes),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--dtype",
        args.dtype,
        "--attention",
        args.attention,
    ]
    common += [] if args.donate else ["--no-donate"]
    common += [] if args.xla_tuned else ["--xla-default"]
    common += [] if args.select else ["--no-select"]

    def ours(*run):
        return [sys.executable, script, *common, *run]

    def torch(b):
        return _torch_command(
            args, b, "--steps", str(args.steps), "--warmup", str(args.warmup), "--split"
        )

    # Per batch, processes whose times are divided run back to back (a shared CPU drifts by
    # several percent over minutes): ADC at the targets' ξ = 0.1, Base, PyTorch's step, then the
    # other ξ.
    commands = []
    for b in args.batches:
        adc = {xi: ours("--batch", str(b), "--method", "adc", "--xi", str(xi)) for xi in args.xis}
        commands += [adc.pop(0.1)] if 0.1 in adc else []
        commands.append(ours("--batch", str(b), "--method", "base"))
        commands += [torch(b)] if args.torch_python else []
        commands += adc.values()
    commands += [ours("--batch", str(b), "--input") for b in args.batches]
    if 64 in args.batches and 0.1 in args.xis:  # the target's ratio, also measured paired
        commands.append(ours("--batch", "64", "--method", "adc", "--xi", "0.1", "--paired-base"))
    if args.torch_python and args.torch_device == "cpu":  # ours against PyTorch's, alternated
        paired = ["--method", "base", "--paired-torch", "--torch-python", args.torch_python]
        commands += [ours("--batch", str(b), *paired) for b in args.batches]
    env = allocator_env(args.malloc, os.environ)  # for JAX and PyTorch alike
    for command in commands:
        out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
        for line in out.splitlines():
            record = json.loads(line)
            emit(record)
            records.append(record)
    extra = summarize(records)
    for record in extra:
        emit(record)
    print(markdown(records + extra), file=sys.stderr)
    return records + extra


DEFAULT_VARIANT = "float32"


def variant(record) -> str:
    """The accelerator choices a record ran with, in words: ``float32`` is the default (float32
    compute, donated buffers, the ADC client's selected-token path)."""
    words = [record.get("dtype", "float32")]
    attention = record.get("attention", "auto")
    words += [] if attention == "auto" else [f"{attention} attention"]
    words += [] if record.get("donate", True) else ["no donation"]
    words += [] if record.get("select_in_client", True) else ["no select"]
    return ", ".join(words)


def _times(records) -> dict[tuple, dict[str, float]]:
    """Median times by (batch, method, ξ, variant) and phase, for our (JAX) records."""
    out: dict[tuple, dict[str, float]] = {}
    for r in records:
        if r.get("record") == "time" and r.get("framework", "jax") == "jax":
            key = (r["batch"], r["method"], r["xi"], variant(r))
            out.setdefault(key, {})[r["phase"]] = r["median_s"]
    return out


def summarize(records) -> list[dict[str, Any]]:
    """Ratios per configuration and the performance targets of issue #8; each target carries the
    environment its numbers were measured in (the first timed record's, not this process's)."""
    env = _measured_env(records)
    times = _times(records)
    out = []
    for (b, method, xi, kind), t in sorted(times.items()):
        base_step = times.get((b, "base", 1.0, kind), {}).get("step")
        row = {
            "record": "summary",
            "batch": b,
            "method": method,
            "xi": xi,
            "variant": kind,
            "step_s": t["step"],
            "fused_step_s": t["fused_step"],
            "images_per_s": b / t["step"],
            "fused_images_per_s": b / t["fused_step"],
            "split_over_fused": t["step"] / t["fused_step"],
            "step_over_base": t["step"] / base_step if base_step else None,
            "adc_overhead_over_step": (
                t["compress_fwd_bwd"] / t["step"] if method == "adc" else None
            ),
        }
        out.append(row)
    torch = {
        (r["batch"], r["phase"]): r["median_s"]
        for r in records
        if r.get("record") == "time" and r.get("framework") == "torch"
    }
    # The targets (and the PyTorch yardstick, float32) are about the default variant.
    out_default = [r for r in out if r["variant"] == DEFAULT_VARIANT]
    for r in out_default:
        torch_step = torch.get((r["batch"], "step"))
        if r["method"] == "base" and torch_step:
            r["torch_step_s"] = torch_step
            r["fused_over_torch"] = r["fused_step_s"] / torch_step
            r["torch_split_step_s"] = torch.get((r["batch"], "split_step"), torch_step)
            r["split_over_torch"] = r["step_s"] / r["torch_split_step_s"]
    adc_128 = [r for r in out_default if r["method"] == "adc" and r["batch"] == 128]
    adc_64 = [
        r for r in out_default if r["method"] == "adc" and r["batch"] == 64 and r["xi"] == 0.1
    ]
    targets = []
    if adc_128:
        worst = max(r["adc_overhead_over_step"] for r in adc_128)
        targets.append(("adc_overhead_over_step_B128", worst, 0.03))
    if adc_64 and adc_64[0]["step_over_base"] is not None:
        targets.append(("adc_xi0.1_step_over_base_B64", adc_64[0]["step_over_base"], 0.30))
    for r in records:
        if r.get("record") == "paired_ratio" and r["batch"] == 64 and r["xi"] == 0.1:
            if variant(r) == DEFAULT_VARIANT:
                targets.append(("adc_xi0.1_step_over_base_B64_paired", r["step_over_base"], 0.30))
    if out_default:
        worst = max(r["split_over_fused"] for r in out_default)
        targets.append(("split_over_fused_max", worst, 1.15))
    for r in out_default:
        if "fused_over_torch" in r:
            targets.append((f"base_fused_over_torch_B{r['batch']}", r["fused_over_torch"], 1.0))
    for r in records:
        if r.get("record") == "paired_torch_ratio" and variant(r) == DEFAULT_VARIANT:
            name = f"base_fused_over_torch_B{r['batch']}_paired"
            targets.append((name, r["fused_over_torch"], 1.0))
    for name, value, limit in targets:
        out.append(
            {
                "record": "target",
                "target": name,
                "value": value,
                "limit": limit,
                "met": value <= limit,
                **env,
            }
        )
    return out


def _measured_env(records) -> dict[str, Any]:
    keys = environment().keys()
    for r in records:
        if r.get("record") == "time" and "device" in r:
            return {k: r[k] for k in keys if k in r}
    return {}


def markdown(records) -> str:
    """The grid as Markdown tables (times in seconds)."""
    times = _times(records)
    header = ["B", "method", "ξ", "variant", *PHASES, "split/fused", "step/Base", "images/s"]
    header += ["peak GB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    summaries = {
        (r["batch"], r["method"], r["xi"], r["variant"]): r
        for r in records
        if r["record"] == "summary"
    }
    peaks = {
        (r["batch"], r["method"], r["xi"], variant(r)): r["peak_bytes"]
        for r in records
        if r.get("record") == "memory" and r.get("framework", "jax") == "jax"
    }
    nan = float("nan")
    for key, t in sorted(times.items()):
        s = summaries.get(key, {})
        ratio = s.get("step_over_base")
        cells = [str(key[0]), key[1], f"{key[2]:g}", key[3]]
        cells += [f"{t.get(p, nan):.4f}" for p in PHASES]
        cells += [f"{s.get('split_over_fused', nan):.3f}"]
        cells += [f"{ratio:.3f}" if ratio is not None else "–"]
        cells += [f"{s.get('images_per_s', nan):.0f}", f"{peaks.get(key, nan) / 1e9:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    inputs = [r for r in records if r.get("record") == "input"]
    if inputs:
        lines += ["", "| B | input path | host→device bytes | median ms |", "|---|---|---|---|"]
        for r in sorted(inputs, key=lambda r: (r["batch"], r["phase"])):
            size = r.get("bytes", "–")
            lines.append(f"| {r['batch']} | {r['phase']} | {size} | {1e3 * r['median_s']:.3f} |")
    compared = [r for r in records if r.get("record") == "summary" and "torch_step_s" in r]
    if compared:
        lines += [
            "",
            "| B | PyTorch step | our fused step | ratio | PyTorch split | our split | ratio |",
        ]
        lines.append("|---|---|---|---|---|---|---|")
        for r in compared:
            lines.append(
                f"| {r['batch']} | {r['torch_step_s']:.3f} | {r['fused_step_s']:.3f} | "
                f"{r['fused_over_torch']:.3f} | {r['torch_split_step_s']:.3f} | "
                f"{r['step_s']:.3f} | {r['split_over_torch']:.3f} |"
            )
    paired = [r for r in records if r.get("record") == "paired_ratio"]
    if paired:
        lines += ["", "| B | ξ | variant | ADC step / Base step, one process | fused |"]
        lines.append("|---|---|---|---|---|")
        for r in paired:
            lines.append(
                f"| {r['batch']} | {r['xi']:g} | {variant(r)} | {r['step_over_base']:.3f} | "
                f"{r['fused_step_over_base']:.3f} |"
            )
    paired_torch = [r for r in records if r.get("record") == "paired_torch_ratio"]
    if paired_torch:
        lines += ["", "| B | variant | our fused / PyTorch's step, alternated | split / split |"]
        lines.append("|---|---|---|---|")
        for r in sorted(paired_torch, key=lambda r: r["batch"]):
            lines.append(
                f"| {r['batch']} | {variant(r)} | {r['fused_over_torch']:.3f} | "
                f"{r['split_over_torch']:.3f} |"
            )
    targets = [r for r in records if r.get("record") == "target"]
    if targets:
        lines.append("\nIssue #8's targets (set for its 2-core CPU; default variant only):")
    for r in targets:
        verdict = "met" if r["met"] else "NOT met"
        lines.append(f"\n{r['target']}: {r['value']:.4f} (limit {r['limit']}) {verdict}")
    return "\n".join(lines)


def report(paths: Sequence[str]) -> list[dict[str, Any]]:
    """Summary records and Markdown tables (on stdout) of JSON-lines files written earlier."""
    records = []
    for path in paths:
        with open(path) as f:
            records += [json.loads(line) for line in f if line.strip()]
    extra = summarize(records)
    print(markdown(records + extra))
    return records + extra


def main(argv=None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.summarize:
        return report(args.summarize)
    configure_xla(args.xla_tuned)
    if args.grid:
        return run_grid(args)
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
