"""Where the time of one program of the split step goes, instruction by instruction.

    python benchmarks/profile_step.py --batch 64 --method base --program fused_step [--calls 3]

Runs the program ``--calls`` times under ``jax.profiler`` (after compiling it), reads the Perfetto
trace that JAX writes, and sums per HLO instruction (the ``hlo_module``/``hlo_op`` arguments of
the trace's events) the time from its start to its end; an instruction that runs asynchronously
(on a CPU, Eigen's matrix products) ends with an ``end: <name>`` event, and its time runs to
there. Each instruction is named by the JAX operation it comes from (the ``op_name`` metadata
of the optimised HLO) and sorted into a kind: matrix product, convolution, fusion that holds a
matrix product, other fusion, copy/transpose, other. One JSON object per instruction on stdout
(``record="op"``: milliseconds per call), then ``record="kind"`` totals; a Markdown table of the
``--top`` instructions and the totals on stderr.

Instructions that overlap (two threads of a CPU, or streams of a GPU) both count in full, so the
sum can exceed the program's wall time (``record="program"``, the median of the profiled calls).
On a CPU with several cores an instruction's span also holds the time it waited for a core that
another instruction held (seen: a 3 MB copy "taking" 20 ms); for times that add up to the
program, profile on one core (``taskset -c 0 python benchmarks/profile_step.py ...``): that is
how a transposed copy in ADC's merge showed up (``adc_jax.compress.merge``). On a GPU the trace's
kernels carry the same ``hlo_op`` names, so the table says which instructions the step's time
goes to there too.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time
from typing import Any

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step as step_bench  # noqa: E402
from common import configure_xla, emit, environment  # noqa: E402

PROGRAMS = ("fused_step", "client_forward", "server_step", "client_backward")
KINDS = ("matmul", "conv", "fusion+matmul", "fusion", "copy/transpose", "other")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--program", choices=PROGRAMS, default="fused_step")
    p.add_argument("--calls", type=int, default=3, help="profiled calls (after one warm-up)")
    p.add_argument("--top", type=int, default=25, help="instructions in the table")
    known, rest = p.parse_known_args(argv)
    # Model, batch, method, ξ, dtype, donation: as benchmarks/step.py takes them.
    known.config = step_bench.parse_args(rest)
    return known


def program_call(name: str, config) -> tuple[Any, tuple]:
    """The jitted program and arguments for one call of it, on a fresh state (compiled once)."""
    _, protocol, state, batch = step_bench.setup(config)
    programs = step_bench._programs(protocol, config.donate)
    if name == "fused_step":
        return programs.fused_step, (state, batch)
    if name == "client_forward":
        return programs.client_forward, (state, batch)
    payload, vjp = programs.client_forward(state, batch)
    if name == "server_step":
        return programs.server_step, (state.server, state.method_state, payload)
    _, grad, metrics = programs.server_step(state.server, state.method_state, payload)
    args = (state.client, state.step, vjp, grad, state.bad_step, metrics["finite"])
    return programs.client_backward, args


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
    """``name → (kind, op_name)`` for the instructions of an optimised HLO module's text."""
    bodies = {}
    for match in re.finditer(r"^%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo_text, re.S | re.M):
        bodies[match.group(1)] = match.group(2)
    out = {}
    pattern = r"^\s*(?:ROOT )?%?([\w.\-]+) = (?:\([^=]*?\)|\S+) ([\w\-]+)\((.*)$"
    for line in hlo_text.splitlines():
        match = re.match(pattern, line)
        if not match:
            continue
        name, opcode, rest = match.groups()
        meta = re.search(r'op_name="([^"]*)"', rest)
        calls = re.search(r"calls=%?([\w.\-]+)", rest)
        out[name] = (_kind(opcode, bodies.get(calls.group(1), "") if calls else ""), _op_name(meta))
    return out


def _kind(opcode: str, body: str) -> str:
    if opcode == "dot":
        return "matmul"
    if opcode == "convolution":
        return "conv"
    if opcode == "fusion":
        return "fusion+matmul" if re.search(r" (dot|convolution)\(", body) else "fusion"
    if opcode in ("copy", "transpose"):
        return "copy/transpose"
    return "other"


def _op_name(meta) -> str:
    return re.sub(r"^jit\([^)]*\)/", "", meta.group(1)) if meta else ""


def op_times(trace: list[dict], calls: int) -> dict[tuple[str, str], float]:
    """Milliseconds per call by (hlo_module, hlo_op), start to end (``end: `` events included)."""
    starts: dict[str, list[tuple[float, float, str]]] = collections.defaultdict(list)
    ends: dict[str, list[float]] = collections.defaultdict(list)
    for e in trace:
        if e.get("ph") != "X":
            continue
        args = e.get("args", {})
        if e["name"].startswith("end: "):
            ends[e["name"][5:]].append(e["ts"] + e.get("dur", 0.0))
        elif "hlo_op" in args:
            module = args.get("hlo_module", "")
            starts[args["hlo_op"]].append((e["ts"], e["ts"] + e.get("dur", 0.0), module))
    total: dict[tuple[str, str], float] = collections.Counter()
    for op, events in starts.items():
        events.sort()
        finish = sorted(ends.get(op, []))
        for i, (begin, end, module) in enumerate(events):
            if i < len(finish) and finish[i] >= end:
                end = finish[i]
            total[(module, op)] += (end - begin) / 1e3 / calls
    return total


def profile(args) -> list[dict[str, Any]]:
    fn, call_args = program_call(args.program, args.config)
    compiled = fn.lower(*call_args).compile()  # called below: one compilation, its names
    hlo = compiled.as_text()
    instructions = hlo_instructions(hlo)
    module = re.match(r"HloModule ([\w.\-]+)", hlo).group(1)  # the trace's hlo_module

    def call():
        nonlocal call_args
        out = compiled(*call_args)
        jax.block_until_ready(out)
        if args.program != "client_forward":  # argument 0 is donated: carry the new one
            call_args = (out[0], *call_args[1:])
        if args.program == "client_backward":  # and the step count with it
            call_args = (out[0], out[1], *call_args[2:])
        return out

    call()  # warm-up
    walls = []
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            for _ in range(args.calls):
                start = time.perf_counter()
                call()
                walls.append(time.perf_counter() - start)
        (path,) = glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            trace = json.load(f)
    trace = trace["traceEvents"] if isinstance(trace, dict) else trace
    base = {**step_bench._config(args.config), "program": args.program, **environment()}
    records = []
    times = op_times(trace, args.calls)
    for (mod, op), ms in sorted(times.items(), key=lambda kv: -kv[1]):
        if mod != module:
            continue
        kind, op_name = instructions.get(op, ("other", ""))
        records.append(
            {"record": "op", "op": op, "kind": kind, "ms": ms, "op_name": op_name, **base}
        )
    kinds = collections.Counter()
    for r in records:
        kinds[r["kind"]] += r["ms"]
    wall_ms = 1e3 * statistics.median(walls)
    records += [{"record": "kind", "kind": k, "ms": kinds[k], **base} for k in KINDS if kinds[k]]
    records.append({"record": "program", "hlo_module": module, "wall_ms": wall_ms, **base})
    return records


def table(records: list[dict[str, Any]], top: int) -> str:
    ops = [r for r in records if r["record"] == "op"]
    (program,) = [r for r in records if r["record"] == "program"]
    lines = [
        f"{program['hlo_module']}: {program['wall_ms']:.1f} ms per call (median); "
        f"instructions sum to {sum(r['ms'] for r in ops):.1f} ms (overlapping ones in full)",
        "",
        "| ms | kind | instruction | from |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['ms']:.2f} | {r['kind']} | {r['op']} | {r['op_name']} |" for r in ops[:top]]
    lines += ["", "| kind | ms |", "|---|---|"]
    lines += [f"| {r['kind']} | {r['ms']:.1f} |" for r in records if r["record"] == "kind"]
    return "\n".join(lines)


def main(argv=None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    configure_xla(args.config.xla_tuned)
    records = profile(args)
    if not any(r["record"] == "op" for r in records):
        print("The trace has no per-instruction events (hlo_op) on this backend.", file=sys.stderr)
    for record in records:
        emit(record)
    print(table(records, args.top), file=sys.stderr)
    return records


if __name__ == "__main__":
    main()
