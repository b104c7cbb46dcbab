"""Shared helpers of the JAX benchmark scripts: timing, environment, allocator, JSON lines, and
the command line of PyTorch's yardstick (``torch_step.py``).

Timings are wall-clock medians of calls that end in ``jax.block_until_ready``, after warm-up calls
(which include compilation). Every record carries the device and the library versions, so that a
number is never separated from the machine that produced it.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax

# XLA flags that made DeiT training faster on a 2-core x86 CPU (XLA of jax 0.10): YNNPACK only
# for reductions, so that matmuls go to Eigen (faster there in the backward pass) while row
# reductions (LayerNorm, softmax) keep YNNPACK's kernels. CPU-only: GPU and TPU compilers ignore
# them.
TUNED_CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=reduce",)


# The allocator matters on a CPU: XLA allocates each execution's temporary buffers afresh (~2.8 GB
# for a DeiT-Tiny step at batch 64) and frees them at the end, and glibc malloc hands blocks that
# large back to the kernel, so every step pays for fresh pages: ~700k page faults (~1.2 CPU-s) with
# 4 KiB pages. Transparent huge pages for malloc's blocks (a glibc >= 2.35 tunable, read at process
# start) cut the faults to ~2k, but the kernel must then find free 2 MiB pages, and when two
# programs alternate (the split step's three and the fused one) that costs ~1.5 s of system time
# per call. tcmalloc keeps freed memory for reuse: no faults and no system time after warm-up,
# whichever programs alternate, provided it is told never to hand memory back to the kernel
# (TCMALLOC_RELEASE_RATE=0): at its default rate it returns some, and a later step refaults
# it (seen: 0.5–0.7M faults and 0.3–1.5 s more in one step of a few, split or fused alike).
# benchmarks/grid.py preloads it when the system has it (Debian: libtcmalloc-minimal4), else falls
# back to huge pages; PyTorch's runs get the same.
THP_GLIBC_TUNABLES = "glibc.malloc.hugetlb=1"
TCMALLOC_ENV = {"TCMALLOC_RELEASE_RATE": "0"}
TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
LIBRARY_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)
ALLOCATORS = ("auto", "tcmalloc", "thp", "system")


def find_tcmalloc() -> str | None:
    """Path of the system's tcmalloc shared library, or None."""
    for directory in LIBRARY_DIRS:
        for name in TCMALLOC_NAMES:
            path = os.path.join(directory, name)
            if os.path.exists(path):
                return path
    return None


def allocator_env(allocator: str, env: dict[str, str]) -> dict[str, str]:
    """``env`` for subprocesses that allocate with ``allocator`` (one of :data:`ALLOCATORS`).

    ``auto``: tcmalloc if the system has it (with :data:`TCMALLOC_ENV`), else glibc with huge
    pages; ``system``: ``env`` as is.
    """
    if allocator not in ALLOCATORS:
        raise ValueError(f"Unknown allocator {allocator!r}; choose one of {ALLOCATORS}.")
    env = dict(env)
    tcmalloc = find_tcmalloc() if allocator in ("auto", "tcmalloc") else None
    if allocator == "tcmalloc" and tcmalloc is None:
        raise FileNotFoundError(
            f"No tcmalloc in {LIBRARY_DIRS} (Debian/Ubuntu: apt-get install libtcmalloc-minimal4)."
        )
    if tcmalloc is not None:
        env["LD_PRELOAD"] = ":".join([tcmalloc, *_colon_list(env, "LD_PRELOAD")])
        env = {**TCMALLOC_ENV, **env}  # a value already set wins
    elif allocator in ("auto", "thp"):
        env["GLIBC_TUNABLES"] = ":".join([*_colon_list(env, "GLIBC_TUNABLES"), THP_GLIBC_TUNABLES])
    return env


def _colon_list(env: dict[str, str], key: str) -> list[str]:
    return [item for item in env.get(key, "").split(":") if item]


def configure_xla(tuned: bool) -> None:
    """Adds :data:`TUNED_CPU_XLA_FLAGS` to ``XLA_FLAGS`` unless set there or ``tuned`` is false.

    Must run before JAX starts its backends; afterwards (e.g. inside pytest) it does nothing.
    """
    from jax._src import xla_bridge

    if not tuned or xla_bridge.backends_are_initialized():
        return
    flags = os.environ.get("XLA_FLAGS", "").split()
    names = {f.split("=")[0] for f in flags}
    flags += [f for f in TUNED_CPU_XLA_FLAGS if f.split("=")[0] not in names]
    os.environ["XLA_FLAGS"] = " ".join(flags)


def environment() -> dict[str, Any]:
    """Device, versions and machine state, for every record."""
    import flax
    import jaxlib
    import optax

    device = jax.devices()[0]
    return {
        "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
        "num_devices": jax.device_count(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
        "tcmalloc_release_rate": os.environ.get("TCMALLOC_RELEASE_RATE", ""),
        "load_1min": round(os.getloadavg()[0], 2),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn: Callable[[], Any], steps: int, warmup: int = 1) -> dict[str, Any]:
    """Runs ``fn`` ``warmup`` times, then ``steps`` timed times: median, min and all times (s).

    ``fn`` must return the arrays to wait for; the first warm-up call's time (compilation
    included) is reported as ``first_s``.
    """
    first = None
    for _ in range(warmup):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        first = time.perf_counter() - start if first is None else first
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return summary(times, first)


def timed_interleaved(
    fns: dict[str, Callable[[], Any]], steps: int, warmup: int = 1
) -> dict[str, dict[str, Any]]:
    """:func:`timed` for several functions whose times will be compared, one call of each in
    turn per round: a slow spell of the machine (a shared or virtual CPU has them) then lands on
    all of them alike instead of on whichever happened to run during it."""
    for _ in range(warmup):
        for fn in fns.values():
            jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: summary(t) for name, t in times.items()}


def summary(times: list[float], first: float | None = None) -> dict[str, Any]:
    out = {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "times_s": [round(t, 6) for t in times],
    }
    if first is not None:
        out["first_s"] = round(first, 4)
    return out


def peak_memory() -> dict[str, Any]:
    """Peak memory so far: the device's allocator statistics where it has them, else the
    process's maximum resident set size (CPU: host memory is device memory)."""
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return {"peak_bytes": int(stats["peak_bytes_in_use"]), "peak_source": "device"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return {"peak_bytes": int(rss * scale), "peak_source": "process_max_rss"}


def add_torch_arguments(parser, python_help: str) -> None:
    """``--torch-python`` (help: ``python_help``) and ``--torch-device``, read by
    :func:`torch_command`."""
    parser.add_argument("--torch-python", help=python_help)
    parser.add_argument(
        "--torch-device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="with --torch-python: where PyTorch runs (cpu: 2 threads)",
    )


def torch_command(args, batch: int, *extra: str) -> list[str]:
    """``benchmarks/torch_step.py`` under ``args.torch_python`` at ``args``'s model, split, head
    and dtype (bfloat16: ``--amp``) for ``batch`` images, on ``args.torch_device`` (a CPU: 2
    threads), with ``extra`` arguments."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_step.py")
    device = ["--device", "cuda"] if args.torch_device == "cuda" else ["--threads", "2"]
    amp = ["--amp"] if args.dtype == "bfloat16" else []
    return [
        *(args.torch_python, script, "--model", args.model, "--batch", str(batch)),
        *("--split-index", str(args.split_index), "--num-classes", str(args.num_classes)),
        *device,
        *amp,
        *extra,
    ]


def emit(record: dict[str, Any], stream=None) -> None:
    """One JSON object per line."""
    print(json.dumps(record), file=stream or sys.stdout, flush=True)
