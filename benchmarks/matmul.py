"""The matrix products of a DeiT training step, one by one, in JAX and in PyTorch (issue #8).

Each ``Dense`` layer of a ViT block does three products per training step on ``R = B·N`` token
rows: the forward ``x @ W`` (``[R, in] × [in, out]``), the input gradient ``g @ Wᵀ`` and the
weight gradient ``xᵀ @ g`` (``[in, R] × [R, out]``: a contraction over the R rows, with both
operands stored row-major). This script times each of them for the four layers of a block
(``qkv``, ``proj``, ``fc1``, ``fc2``), so that a gap between our step and PyTorch's can be
placed::

    python benchmarks/matmul.py --torch-python /opt/torchenv/bin/python   # both, and a table
    python benchmarks/matmul.py [--framework torch]                         # one, JSON lines

``role`` ∈ ``forward``, ``input_grad``, ``weight_grad``; for JAX also ``weight_grad_nn``: the
same weight gradient with ``x`` already stored transposed (``[in, R] × [R, out]`` as a plain
row-major product), which shows what the layout costs XLA, and ``weight_grad_openblas``: the
weight gradient through :func:`adc_jax.cpu_kernels.matmul` (what the model uses on a CPU).
Medians of ``--steps`` calls after two warm-up calls; JAX calls end in ``block_until_ready``,
float32, random normal operands.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

LAYERS = ("qkv", "proj", "fc1", "fc2")
ROLES = ("forward", "input_grad", "weight_grad", "weight_grad_nn", "weight_grad_openblas")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--framework", choices=("jax", "torch"), default="jax")
    p.add_argument("--rows", type=int, default=64 * 197, help="B·N (default: B = 64, DeiT)")
    p.add_argument("--width", type=int, default=192, help="D (DeiT-Tiny: 192)")
    p.add_argument("--mlp-dim", type=int, default=768)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--threads", type=int, default=2, help="PyTorch's threads")
    p.add_argument("--torch-python", help="also run PyTorch with this interpreter; a table last")
    return p.parse_args(argv)


def layer_shapes(width: int, mlp_dim: int) -> dict[str, tuple[int, int]]:
    """``(in, out)`` features of each Dense layer of a block."""
    return {
        "qkv": (width, 3 * width),
        "proj": (width, width),
        "fc1": (width, mlp_dim),
        "fc2": (mlp_dim, width),
    }


def _products_jax(rows, fan_in, fan_out):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from adc_jax import cpu_kernels

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((rows, fan_in), np.float32))
    x_t = jnp.asarray(rng.standard_normal((fan_in, rows), np.float32))
    g = jnp.asarray(rng.standard_normal((rows, fan_out), np.float32))
    w = jnp.asarray(rng.standard_normal((fan_in, fan_out), np.float32))
    products = {
        "forward": (jax.jit(lambda x, w: x @ w), x, w),
        "input_grad": (jax.jit(lambda g, w: g @ w.T), g, w),
        "weight_grad": (jax.jit(lambda x, g: x.T @ g), x, g),
        "weight_grad_nn": (jax.jit(lambda x_t, g: x_t @ g), x_t, g),
    }
    if cpu_kernels.status().startswith("openblas"):
        kernel = jax.jit(lambda x, g: cpu_kernels.matmul(x, g, trans_a=True))
        products["weight_grad_openblas"] = (kernel, x, g)
    return {role: (lambda f=f, a=a, b=b: f(a, b)) for role, (f, a, b) in products.items()}


def _products_torch(rows, fan_in, fan_out):
    import torch

    x, g = torch.randn(rows, fan_in), torch.randn(rows, fan_out)
    w = torch.randn(fan_in, fan_out)
    return {
        "forward": lambda: x @ w,
        "input_grad": lambda: g @ w.t(),
        "weight_grad": lambda: x.t() @ g,
    }


def _framework(args):
    """The records' environment, the products' maker and the timer (``timed`` of common.py, which
    waits for JAX's arrays, or of torch_step.py) for ``args.framework``."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if args.framework == "jax":
        from common import configure_xla, environment, timed

        configure_xla(True)
        return {"framework": "jax", **environment()}, _products_jax, timed
    import torch
    from torch_step import environment, timed

    torch.set_num_threads(args.threads)
    env = {"framework": "torch", **environment(args.threads, "cpu")}
    return env, _products_torch, timed


def run(args) -> list[dict]:
    env, make, timed = _framework(args)
    records = []
    for layer, (fan_in, fan_out) in layer_shapes(args.width, args.mlp_dim).items():
        for role, fn in make(args.rows, fan_in, fan_out).items():
            seconds = timed(fn, args.steps, 2)["median_s"]
            flops = 2 * args.rows * fan_in * fan_out
            record = {"record": "matmul", "layer": layer, "role": role, "rows": args.rows}
            record |= {"in": fan_in, "out": fan_out, "median_s": seconds}
            record |= {"gflop_per_s": flops / seconds / 1e9, **env}
            print(json.dumps(record), flush=True)
            records.append(record)
    return records


def table(records: list[dict]) -> str:
    """Milliseconds per product, JAX beside PyTorch, and the block's totals per role."""
    ms = {(r["framework"], r["layer"], r["role"]): 1e3 * r["median_s"] for r in records}
    roles = sorted(
        {r["role"] for r in records},
        key=ROLES.index,
    )
    lines = ["| role | " + " | ".join(f"{layer} JAX / PyTorch" for layer in LAYERS) + " | block |"]
    lines.append("|---|" + "---|" * (len(LAYERS) + 1))
    for role in roles:
        cells, totals = [], {"jax": 0.0, "torch": 0.0}
        for layer in LAYERS:
            pair = []
            for framework in ("jax", "torch"):
                value = ms.get((framework, layer, role))
                totals[framework] += value or 0.0
                pair.append(f"{value:.1f}" if value is not None else "–")
            cells.append(" / ".join(pair))
        total = " / ".join(f"{totals[f]:.1f}" if totals[f] else "–" for f in ("jax", "torch"))
        lines.append(f"| {role} | " + " | ".join(cells) + f" | {total} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    records = run(args)
    if args.torch_python:
        command = [args.torch_python, os.path.abspath(__file__), "--framework", "torch"]
        command += ["--rows", str(args.rows), "--width", str(args.width)]
        command += ["--mlp-dim", str(args.mlp_dim), "--steps", str(args.steps)]
        command += ["--threads", str(args.threads)]
        out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
        for line in out.splitlines():
            print(line, flush=True)
            records.append(json.loads(line))
        print(table(records), file=sys.stderr)
    return records


if __name__ == "__main__":
    main()
