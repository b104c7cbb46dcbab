"""The same training step in plain PyTorch/timm, as a yardstick for benchmarks/step.py.

Run with an interpreter that has torch and timm (not dependencies of adc-jax)::

    /opt/torchenv/bin/python benchmarks/torch_step.py --batch 64 [--threads 2] [--split]
    python3 benchmarks/torch_step.py --batch 128 --device cuda --split     # on a GPU
    python3 benchmarks/torch_step.py --batch 256 --device cuda --amp [--compile]

``phase="step"``: timm's ``deit_tiny_patch16_224`` (``pretrained=False``, ``--num-classes``
head), forward through all blocks, cross-entropy, backward, ``Adam(1e-4)`` step — the Base step
of benchmarks/step.py. With ``--split`` also ``phase="split_step"``: the client (patch embedding,
CLS, position embedding, blocks ``0..l-1``) and the server (the rest) as two graphs cut with
``detach().requires_grad_()``, the server's gradient at the cut handed back to the client's
backward, one Adam per side — the protocol of the split step without compression. Random
float32 NCHW images, random labels. One JSON object per line, in the format of step.py.

On CUDA each timed call ends in ``torch.cuda.synchronize()`` (as ours end in
``block_until_ready``), and float32 matrix products may use TF32 (``--no-tf32`` to forbid it):
XLA's default precision for float32 dots on such GPUs is TF32 too, so the two compare like for like.

``--amp``: the forward passes and the loss under ``torch.autocast`` in bfloat16 (PyTorch's usual
mixed precision: float32 parameters and optimiser, bfloat16 matrix products and attention),
against our ``--dtype bfloat16``; records say ``dtype="bfloat16"``. ``--compile``: the model's
forward passes (whole, client and server) through ``torch.compile`` (default mode), compiled in
the warm-up calls; records say ``compile=true``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import time

import timm
import torch
import torch.nn.functional as F


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="deit_tiny_patch16_224")
    p.add_argument("--split-index", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--split", action="store_true", help="also time the client/server split step")
    p.add_argument(
        "--serve",
        action="store_true",
        help="no timing loop: after setup, run one call per line read from stdin (step or "
        "split_step) and answer each with a JSON line of its seconds (benchmarks/step.py "
        "--paired-torch alternates these calls with its own)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--no-tf32", dest="tf32", action="store_false", help="CUDA: float32 matmuls in full fp32"
    )
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (mixed precision)")
    p.add_argument("--compile", action="store_true", help="torch.compile the forward passes")
    return p.parse_args(argv)


def environment(threads: int, device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "device": f"cuda:{torch.cuda.get_device_name()}" if device == "cuda" else "cpu:torch",
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
        "tcmalloc_release_rate": os.environ.get("TCMALLOC_RELEASE_RATE", ""),
        "load_1min": round(os.getloadavg()[0], 2),
    }


def timed(fn, steps: int, warmup: int, sync=lambda: None) -> dict:
    """``sync`` waits for the device's queued work (CUDA), as ``block_until_ready`` does in JAX."""
    first = None
    for _ in range(warmup):
        start = time.perf_counter()
        fn()
        sync()
        first = time.perf_counter() - start if first is None else first
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    out = {"median_s": statistics.median(times), "min_s": min(times)}
    out["times_s"] = [round(t, 6) for t in times]
    if first is not None:
        out["first_s"] = round(first, 4)
    return out


class Forwards:
    """The forward passes a step calls (``torch.compile``d with ``--compile``) and the autocast
    context they run in (``--amp``)."""

    def __init__(self, model, split_index: int, device: str, amp: bool, compile_: bool):
        wrap = torch.compile if compile_ else (lambda f: f)
        self.model = wrap(model)
        self.client = wrap(lambda images: client_forward(model, images, split_index))
        self.server = wrap(lambda tokens: server_forward(model, tokens, split_index))
        self.amp = amp
        self.device = device

    def autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=torch.bfloat16)


def base_step(fwd: Forwards, opt, images, labels):
    opt.zero_grad(set_to_none=True)
    with fwd.autocast():
        loss = F.cross_entropy(fwd.model(images), labels)
    loss.backward()
    opt.step()


def client_forward(model, images, split_index):
    x = model.patch_embed(images)
    x = model._pos_embed(x)  # prepends CLS, adds the position embedding (DeiT v1 order)
    x = model.norm_pre(x)
    for block in model.blocks[:split_index]:
        x = block(x)
    return x


def server_forward(model, tokens, split_index):
    x = tokens
    for block in model.blocks[split_index:]:
        x = block(x)
    return model.forward_head(model.norm(x))


def split_step(fwd: Forwards, client_opt, server_opt, images, labels):
    client_opt.zero_grad(set_to_none=True)
    server_opt.zero_grad(set_to_none=True)
    with fwd.autocast():
        tokens = fwd.client(images)
    received = tokens.detach().requires_grad_()  # what crosses the cut
    with fwd.autocast():
        loss = F.cross_entropy(fwd.server(received), labels)
    loss.backward()
    server_opt.step()
    tokens.backward(received.grad)  # the gradient sent back
    client_opt.step()


def split_optimizers(model, split_index):
    """One Adam for the client's parameters (patch embedding, CLS, positions, blocks before the
    cut) and one for the server's."""
    client_params = [
        *model.patch_embed.parameters(),
        model.cls_token,
        model.pos_embed,
        *model.blocks[:split_index].parameters(),
    ]
    ids = {id(p) for p in client_params}
    server_params = [p for p in model.parameters() if id(p) not in ids]
    return (
        torch.optim.Adam(client_params, lr=1e-4, eps=1e-8),
        torch.optim.Adam(server_params, lr=1e-4, eps=1e-8),
    )


def serve(model, fwd: Forwards, opt, images, labels, split_index, sync) -> int:
    """One call per stdin line (``step``: the Base step; ``split_step``), each answered with
    ``{"phase": ..., "s": seconds}`` on stdout; returns at the end of stdin."""
    client_opt, server_opt = split_optimizers(model, split_index)
    calls = {
        "step": lambda: base_step(fwd, opt, images, labels),
        "split_step": lambda: split_step(fwd, client_opt, server_opt, images, labels),
    }
    for line in sys.stdin:
        phase = line.strip()
        start = time.perf_counter()
        calls[phase]()
        sync()
        print(json.dumps({"phase": phase, "s": time.perf_counter() - start}), flush=True)
    return 0


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    cuda = args.device == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    sync = torch.cuda.synchronize if cuda else lambda: None
    model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes)
    model.to(device).train()
    size = model.default_cfg["input_size"]
    images = torch.randn(args.batch, *size, device=device)
    labels = torch.randint(0, args.num_classes, (args.batch,), device=device)
    base = {
        "model": args.model,
        "split_index": args.split_index,
        "batch": args.batch,
        "method": "base",
        "xi": 1.0,
        "dtype": "bfloat16" if args.amp else "float32",
        "compile": args.compile,
        "framework": "torch",
        **environment(args.threads, args.device),
    }
    if cuda:
        base["tf32"] = args.tf32
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, eps=1e-8)
    fwd = Forwards(model, args.split_index, args.device, args.amp, args.compile)
    if args.serve:
        return serve(model, fwd, opt, images, labels, args.split_index, sync)
    result = timed(lambda: base_step(fwd, opt, images, labels), args.steps, args.warmup, sync)
    print(json.dumps({"record": "time", "phase": "step", **result, **base}), flush=True)
    if args.split:
        client_opt, server_opt = split_optimizers(model, args.split_index)

        def step():
            split_step(fwd, client_opt, server_opt, images, labels)

        result = timed(step, args.steps, args.warmup, sync)
        print(json.dumps({"record": "time", "phase": "split_step", **result, **base}), flush=True)
    if cuda:
        peak, source = torch.cuda.max_memory_allocated(), "device"
    else:
        peak, source = 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "process_max_rss"
    memory = {"record": "memory", "peak_bytes": peak, "peak_source": source, **base}
    print(json.dumps(memory), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
