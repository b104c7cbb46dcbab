r"""A grid of split-step configurations, one process each, and tables of their records.

    python benchmarks/grid.py --torch-python /opt/torchenv/bin/python > grid.jsonl 2> grid.md
    python benchmarks/grid.py --batches 128 --xis 0.1 --dtype bfloat16 --steps 20 --xla-default
    python benchmarks/grid.py --batches 8 --xis 0.5 --paired-xis --model vit_test_patch4_16 \
        --split-index 2 --num-classes 10 --steps 1 --warmup 1     # toy sizes: the plumbing
    python benchmarks/grid.py --summarize grid.jsonl [more.jsonl ...] > grid.md

Running: for each batch of ``--batches``, Base and ADC at each ξ of ``--xis`` run
``benchmarks/step.py``, each configuration in its own process (so that a peak memory read from the
process's maximum RSS is the configuration's own); with ``--torch-python``,
``benchmarks/torch_step.py`` times PyTorch/timm's step at the same model, split, batch and dtype as
a yardstick. Then ``step.py --input`` per batch, ``step.py --paired-base`` (ADC's steps and Base's
alternated in one process) per batch at each ξ of ``--paired-xis``, and on a CPU with
``--torch-python`` ``step.py --paired-torch`` (ours and PyTorch's alternated) per batch. Per
batch, the processes whose times are divided run back to back (a shared CPU drifts by several
percent over minutes): Base, PyTorch's step, then ADC at each ξ.

Options other than the grid's own (``--model``, ``--steps``, ``--dtype``, ``--xla-default``, ...)
are ``step.py``'s and go to every one of its runs; those it takes per configuration (``--batch``,
``--method``, ``--xi``, ``--input``, ``--paired-base``, ``--paired-torch``) the grid sets itself.
Every process, PyTorch's too, runs with the allocator of ``--malloc`` (tcmalloc preloaded when the
system has it, else glibc's huge-page tunable; why: the comment in ``benchmarks/common.py``).

The records of the runs go to stdout as they arrive (JSON lines), then the summary records; the
Markdown tables go to stderr. ``--summarize`` makes the same summary and tables (on stdout) from
JSON-lines files of ``step.py`` and ``torch_step.py`` written earlier, without timing anything.

``record="summary"``, one per configuration: the split and fused step's median times and
images/s, split / fused, step / Base's step (the same batch and variant), ADC's encoder (forward
and backward, measured outside the step) over the step, the device; for Base, where an eager
PyTorch step of the same batch and dtype was measured, ours over PyTorch's (fused over whole,
split over split). Configurations that differ in accelerator choices (dtype, attention kernel,
donation, the ADC client's token selection) are kept apart as *variants* (:func:`variant`). The
ratios are reported as measured; what they should be depends on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step  # noqa: E402
from common import ALLOCATORS, add_torch_arguments, allocator_env, emit, torch_command  # noqa: E402

BATCHES = (32, 64, 128)
XIS = (0.5, 0.1, 0.01)
PAIRED_XIS = (0.1,)
PHASES = ("client_forward", "compress", "server_step", "client_backward", "step", "fused_step")
# step.py options that the grid sets per run.
PER_RUN = ("--batch", "--method", "--xi", "--input", "--paired-base", "--paired-torch")
PER_RUN_FLAGS = ("input", "paired_base", "paired_torch")


def parse_args(argv=None) -> argparse.Namespace:
    """The grid's options; the rest, ``step.py``'s, are checked by its parser and kept as
    ``step_argv`` (passed to every run) and ``step`` (parsed)."""
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
        epilog="Other options: those of benchmarks/step.py (python benchmarks/step.py --help).",
        allow_abbrev=False,  # --batch and --xi are step.py's, not abbreviations of ours
    )
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--xis", type=float, nargs="+", default=list(XIS), help="ADC's ξ")
    p.add_argument(
        "--paired-xis",
        type=float,
        nargs="*",
        default=list(PAIRED_XIS),
        help="ADC's ξ for step.py --paired-base, per batch (none: no paired runs)",
    )
    p.add_argument(
        "--malloc",
        choices=ALLOCATORS,
        default="auto",
        help="the runs' allocator (JAX's and PyTorch's alike): tcmalloc (preloaded), thp (glibc "
        "with huge pages), system (as the environment has it), auto (tcmalloc if installed, else "
        "thp); see common.allocator_env",
    )
    p.add_argument(
        "--summarize",
        nargs="+",
        metavar="JSONL",
        help="no timing: the summary and tables of records written earlier (JSON-lines files of "
        "step.py and torch_step.py)",
    )
    add_torch_arguments(
        p,
        "an interpreter with torch + timm: PyTorch's step (benchmarks/torch_step.py) per batch "
        "as a yardstick, and on a CPU step.py --paired-torch per batch",
    )
    args, rest = p.parse_known_args(argv)
    fixed = sorted({word.split("=")[0] for word in rest} & set(PER_RUN))
    args.torch_argv = ["--torch-python", args.torch_python] if args.torch_python else []
    args.torch_argv += ["--torch-device", args.torch_device]
    args.step_argv = rest
    args.step = step.parse_args([*rest, *args.torch_argv])
    fixed += [f"--{name.replace('_', '-')}" for name in PER_RUN_FLAGS if getattr(args.step, name)]
    if fixed:
        names = ", ".join(sorted(set(fixed)))
        p.error(f"{names}: the grid sets these per run; choose --batches, --xis and --paired-xis.")
    return args


# ---- Running --------------------------------------------------------------------------------


def commands(args) -> list[list[str]]:
    """The grid's processes, in the order they run."""
    config = args.step
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "step.py")

    def ours(batch, *run):
        return [sys.executable, script, *args.step_argv, "--batch", str(batch), *run]

    def torch(batch):
        timing = ["--steps", str(config.steps), "--warmup", str(config.warmup)]
        return torch_command(config, batch, *timing, "--split")

    out = []
    for b in args.batches:
        out.append(ours(b, "--method", "base"))
        out += [torch(b)] if config.torch_python else []
        out += [ours(b, "--method", "adc", "--xi", str(xi)) for xi in args.xis]
    out += [ours(b, "--input") for b in args.batches]
    for b in args.batches:
        out += [
            ours(b, "--method", "adc", "--xi", str(xi), "--paired-base") for xi in args.paired_xis
        ]
    if config.torch_python and config.torch_device == "cpu":
        paired = ["--method", "base", "--paired-torch", *args.torch_argv]
        out += [ours(b, *paired) for b in args.batches]
    return out


def run_grid(args) -> list[dict[str, Any]]:
    """Runs :func:`commands`, passing their records on, then the summary and tables."""
    env = allocator_env(args.malloc, os.environ)  # for JAX and PyTorch alike
    records = []
    for command in commands(args):
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


# ---- Reporting ------------------------------------------------------------------------------


def variant(record) -> str:
    """The accelerator choices a record ran with, in words: the compute dtype, then any choice
    other than the default (``auto`` attention, donated buffers, the ADC client's selected-token
    path)."""
    words = [record.get("dtype", "float32")]
    attention = record.get("attention", "auto")
    words += [] if attention == "auto" else [f"{attention} attention"]
    words += [] if record.get("donate", True) else ["no donation"]
    words += [] if record.get("select_in_client", True) else ["no select"]
    return ", ".join(words)


def _ours(record) -> bool:
    return record.get("record") == "time" and record.get("framework", "jax") == "jax"


def _key(record) -> tuple:
    return record["batch"], record["method"], record["xi"], variant(record)


def _times(records) -> dict[tuple, dict[str, float]]:
    """Median times by (batch, method, ξ, variant) and phase, for our (JAX) records."""
    out: dict[tuple, dict[str, float]] = {}
    for r in records:
        if _ours(r):
            out.setdefault(_key(r), {})[r["phase"]] = r["median_s"]
    return out


def summarize(records) -> list[dict[str, Any]]:
    """One ``record="summary"`` per configuration of our records (see the module's doc)."""
    times = _times(records)
    devices = {_key(r): r.get("device") for r in records if _ours(r) and r["phase"] == "step"}
    # PyTorch's eager steps by batch and dtype (torch.compile's are gpu_report.py's business).
    torch = {
        (r["batch"], r.get("dtype", "float32"), r["phase"]): r["median_s"]
        for r in records
        if r.get("record") == "time" and r.get("framework") == "torch" and not r.get("compile")
    }
    out = []
    for key, t in sorted(times.items()):
        b, method, xi, kind = key
        base_step = times.get((b, "base", 1.0, kind), {}).get("step")
        row = {
            "record": "summary",
            "batch": b,
            "method": method,
            "xi": xi,
            "variant": kind,
            "device": devices.get(key),
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
        # The yardstick: PyTorch's step at the same dtype, against ours with no other choice.
        torch_step = torch.get((b, kind, "step"))
        if method == "base" and torch_step:
            row["torch_step_s"] = torch_step
            row["fused_over_torch"] = row["fused_step_s"] / torch_step
            row["torch_split_step_s"] = torch.get((b, kind, "split_step"), torch_step)
            row["split_over_torch"] = row["step_s"] / row["torch_split_step_s"]
        out.append(row)
    return out


def measured_on(records) -> list[str]:
    """The devices and library versions the records were measured with, in words."""
    found = set()
    for r in records:
        if r.get("record") in ("time", "paired", "paired_torch", "input") and "device" in r:
            library = f"jax {r['jax']}" if "jax" in r else f"torch {r.get('torch', '?')}"
            found.add(f"{r['device']} ({library})")
    return sorted(found)


def markdown(records) -> str:
    """The summary as Markdown tables (times in seconds)."""
    times = _times(records)
    header = ["B", "method", "ξ", "variant", *PHASES, "split/fused", "step/Base", "images/s"]
    header += ["peak GB"]
    devices = measured_on(records)
    lines = [f"Measured on: {', '.join(devices)}.", ""] if devices else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    summaries = {
        (r["batch"], r["method"], r["xi"], r["variant"]): r
        for r in records
        if r["record"] == "summary"
    }
    peaks = {
        _key(r): r["peak_bytes"]
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
            "| B | dtype | PyTorch step | our fused step | ratio | PyTorch split | our split | "
            "ratio |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in compared:
            lines.append(
                f"| {r['batch']} | {r['variant']} | {r['torch_step_s']:.3f} | "
                f"{r['fused_step_s']:.3f} | {r['fused_over_torch']:.3f} | "
                f"{r['torch_split_step_s']:.3f} | {r['step_s']:.3f} | {r['split_over_torch']:.3f} |"
            )
    paired = [r for r in records if r.get("record") == "paired_ratio"]
    if paired:
        lines += ["", "| B | ξ | variant | ADC step / Base step, one process | fused |"]
        lines.append("|---|---|---|---|---|")
        for r in sorted(paired, key=lambda r: (r["batch"], -r["xi"], variant(r))):
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
    return run_grid(args)


if __name__ == "__main__":
    main()
