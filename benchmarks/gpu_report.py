"""The report of ``benchmarks/gpu.sh``: one Markdown page from what the measurement wrote.

    python benchmarks/gpu_report.py OUT_DIR [OUT_DIR ...] > report.md
    python benchmarks/gpu_report.py --collect WORKDIR CONFIG >> OUT_DIR/train.jsonl
    python benchmarks/gpu_report.py --eval-every configs/X.py[:arg] EVALS METHOD

Reads, in each ``OUT_DIR``: ``bench.jsonl`` (records of ``benchmarks/step.py`` and
``benchmarks/torch_step.py``), ``profile.jsonl`` (``benchmarks/profile_step.py``) and
``train.jsonl`` (one line per training run: its ``summary.json`` with the config's name and
target, as ``--collect`` writes it). Parts that are missing are left out. The page has:

* one training step, ours against PyTorch/timm's on the same device: milliseconds, images/s and
  model-FLOPs utilisation (MFU: the model's training FLOPs per image, :func:`train_flops`, times
  images/s, over the device's dense bfloat16 peak, :data:`PEAK_BF16_TFLOPS` or ``--peak-tflops``);
  ADC's step over Base's and split over fused, from the run that alternates them in one process;
* where a step's time goes (the profile's top instructions and the totals by kind);
* the training runs: test accuracy, images/s, seconds to the target accuracy, wall time.

Every number is read from the records; each table names the device and versions they came from.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from adc_jax import vit  # noqa: E402

# Dense bfloat16 matrix peaks from the vendors' datasheets (TFLOP/s, no sparsity), by a substring
# of the device name the records carry. SXM parts for the NVIDIA data-centre GPUs.
PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100": 989.4,
    "A100": 312.0,
    "L40S": 362.1,
    "L4": 121.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,
}


def train_flops(config: vit.ViTConfig) -> float:
    """Model FLOPs of one training step per image: 3 × the forward pass (the backward pass costs
    two forwards), counting 2 per multiply-add of the patch embedding, every block's four
    projections and two attention products over all N tokens, and the head."""
    n, d, m = config.seq_len, config.width, config.mlp_dim
    patches = 2 * config.num_patches * config.patch_size**2 * config.in_chans * d
    block = 2 * n * d * (3 * d + d + 2 * m) + 2 * 2 * n * n * d
    head = 2 * d * config.num_classes
    return 3.0 * (patches + config.depth * block + head)


def peak_tflops(device: str) -> float | None:
    for name, peak in PEAK_BF16_TFLOPS.items():
        if name in device:
            return peak
    return None


def read_jsonl(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def eval_every(config_spec: str, evals: int, method: str) -> int:
    """Steps between test evaluations so that a run of ``config_spec`` (``path[:arg]``) with
    ``method`` evaluates about ``evals`` times (:func:`adc_jax.sweep.with_evals`), whatever its
    number of steps: runs of different methods then get the same number of points."""
    import importlib.util

    from adc_jax import sweep

    path, _, arg = config_spec.partition(":")
    spec = importlib.util.spec_from_file_location("config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    config.method.name = method
    return sweep.with_evals(config, evals).eval_every_steps


def collect(workdir: str, config_name: str) -> dict[str, Any]:
    """A training run's ``summary.json`` with its config's name and target accuracy."""
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    return {**summary, "config": config_name, "target_accuracy": config.get("target_accuracy")}


# ---- The step table -----------------------------------------------------------------------------


def step_rows(records) -> list[dict[str, Any]]:
    """One row per measured step: who, what, batch, dtype, ms, images/s, device."""
    rows = []
    for r in records:
        device, batch = r.get("device", "?"), r.get("batch")
        if r.get("record") == "paired":  # ADC and Base alternated in one process (ours)
            method, _, kind = r["phase"].partition("_")
            rows.append(
                dict(
                    who="ours",
                    what=f"{'ADC ξ=' + format(r['xi'], 'g') if method == 'adc' else 'Base'}",
                    step="fused" if kind == "fused_step" else "split",
                    batch=batch,
                    dtype=r.get("dtype"),
                    model=r.get("model"),
                    median_s=r["median_s"],
                    device=device,
                    source="alternated",
                )
            )
        elif r.get("record") == "time" and r.get("phase") in ("step", "fused_step", "split_step"):
            torch = r.get("framework") == "torch"
            if torch:
                what = "timm, torch.compile" if r.get("compile") else "timm, eager"
                step = "split" if r["phase"] == "split_step" else "whole"
            else:
                what = "Base" if r["method"] == "base" else f"ADC ξ={r['xi']:g}"
                attention = r.get("attention", "auto")
                what += "" if attention == "auto" else f", {attention} attention"
                step = "fused" if r["phase"] == "fused_step" else "split"
            rows.append(
                dict(
                    who="PyTorch" if torch else "ours",
                    what=what,
                    step=step,
                    batch=batch,
                    dtype=r.get("dtype"),
                    model=r.get("model"),
                    median_s=r["median_s"],
                    device=device,
                    source="own process",
                )
            )
    return rows


def step_table(records, peak_override: float | None) -> list[str]:
    rows = step_rows(records)
    if not rows:
        return []
    lines = [
        "## One training step",
        "",
        "| who | what | step | B | dtype | ms | images/s | MFU | measured |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        images = r["batch"] / r["median_s"]
        mfu = "–"
        peak = peak_override or peak_tflops(r["device"])
        # Only Base's (and PyTorch's) step does the model's full work; ADC's does less.
        full_work = r["what"].startswith(("Base", "timm"))
        if peak and r["dtype"] == "bfloat16" and full_work and r["model"] in vit.MODELS:
            flops = train_flops(vit.MODELS[r["model"]]) * images
            mfu = f"{flops / (peak * 1e12):.1%}"
        lines.append(
            f"| {r['who']} | {r['what']} | {r['step']} | {r['batch']} | {r['dtype']} | "
            f"{1e3 * r['median_s']:.2f} | {images:.0f} | {mfu} | {r['source']} |"
        )
    lines += ["", *ratio_lines(rows), ""]
    devices = sorted({r["device"] for r in rows})
    peaks = {d: peak_override or peak_tflops(d) for d in devices}
    lines.append(
        "Devices: "
        + ", ".join(f"{d} (bf16 peak {p} TFLOP/s)" if p else d for d, p in peaks.items())
        + ". MFU: the model's training FLOPs per image "
        + "(3 × forward, `gpu_report.train_flops`) × images/s over that peak, bfloat16 steps of "
        + "the full model only. ms: median of the timed calls, each ending in a device sync."
    )
    return lines


def ratio_lines(rows) -> list[str]:
    def median(who, what, step, source=None):
        times = [
            r["median_s"]
            for r in rows
            if (r["who"], r["what"], r["step"]) == (who, what, step)
            and (source is None or r["source"] == source)
            and r["dtype"] == "bfloat16"
        ]
        return statistics.median(times) if times else None

    out = []

    def ratio(name, a, b):
        if a and b:
            out.append(f"- {name}: **{a / b:.3f}**")

    base_fused, base_split = median("ours", "Base", "fused"), median("ours", "Base", "split")
    for tool in ("timm, eager", "timm, torch.compile"):
        whole, split = median("PyTorch", tool, "whole"), median("PyTorch", tool, "split")
        ratio(f"our Base fused step / PyTorch ({tool}, AMP) whole step, time", base_fused, whole)
        ratio(f"our Base split step / PyTorch ({tool}, AMP) split step, time", base_split, split)
    adc = sorted({r["what"] for r in rows if r["who"] == "ours" and r["what"].startswith("ADC")})
    for what in adc:
        for step in ("split", "fused"):
            ratio(
                f"{what} {step} step / Base {step} step (alternated in one process)",
                median("ours", what, step, "alternated"),
                median("ours", "Base", step, "alternated"),
            )
    for what in ("Base", *adc):
        ratio(
            f"{what}: split / fused step",
            median("ours", what, "split"),
            median("ours", what, "fused"),
        )
    return out


# ---- The profile and the training runs ------------------------------------------------------


def profile_table(records, top: int = 15) -> list[str]:
    ops = [r for r in records if r.get("record") == "op"]
    programs = [r for r in records if r.get("record") == "program"]
    if not programs:
        return []
    p = programs[0]
    lines = [
        "## Where the step's time goes",
        "",
        f"`{p['hlo_module']}` ({p.get('method')}, B = {p.get('batch')}, {p.get('dtype')}, "
        f"{p.get('device')}): {p['wall_ms']:.2f} ms per call; instructions sum to "
        f"{sum(r['ms'] for r in ops):.2f} ms (overlapping ones in full).",
        "",
        "| ms | kind | instruction | from |",
        "|---|---|---|---|",
    ]
    for r in sorted(ops, key=lambda r: -r["ms"])[:top]:
        lines.append(f"| {r['ms']:.3f} | {r['kind']} | {r['op']} | {r['op_name'][:90]} |")
    kinds = [r for r in records if r.get("record") == "kind"]
    lines += ["", "| kind | ms |", "|---|---|"]
    lines += [f"| {r['kind']} | {r['ms']:.2f} |" for r in kinds]
    if not ops:
        lines.append("\nThe trace had no per-instruction events on this backend.")
    return lines


def train_table(runs) -> list[str]:
    if not runs:
        return []
    lines = [
        "## Training runs (`train.py`)",
        "",
        "| config | method | ξ | model | dtype | steps | test accuracy | images/s | "
        "seconds to target | wall s | device |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in runs:
        target = s.get("target_accuracy") or 0
        reached = s.get("seconds_to_target")
        to_target = "–"
        if target:
            to_target = f"{reached:.0f}" if reached else "not reached"
            to_target += f" (≥ {target:g})"
        rate = s.get("images_per_second")
        lines.append(
            f"| {s['config']} | {s['method']} | {s['xi_nominal']:.3g} | {s['model']} | "
            f"{s.get('compute_dtype')} | {s['steps']} | {s['test_accuracy']:.4f} | "
            f"{'–' if rate is None else format(rate, '.0f')} | {to_target} | "
            f"{s['wall_seconds']:.0f} | {s.get('device_kind')} |"
        )
    lines += [
        "",
        "images/s: median over the logged windows of the run (the first holds compilation); "
        "seconds to target: wall time from the start of the process to the first evaluation "
        "at or above the target, evaluations included.",
    ]
    return lines


def report(directories, peak_override: float | None = None) -> str:
    bench, profile, runs = [], [], []
    for d in directories:
        bench += read_jsonl(os.path.join(d, "bench.jsonl"))
        profile += read_jsonl(os.path.join(d, "profile.jsonl"))
        runs += read_jsonl(os.path.join(d, "train.jsonl"))
    versions = sorted(
        {
            f"{r['device']}: jax {r['jax']}" if "jax" in r else f"{r['device']}: torch {r['torch']}"
            for r in bench
            if "device" in r and ("jax" in r or "torch" in r)
        }
    )
    sections = [
        ["# DeiT split learning on an accelerator: measured", "", "; ".join(versions)],
        step_table(bench, peak_override),
        profile_table(profile),
        train_table(runs),
    ]
    return "\n\n".join("\n".join(s) for s in sections if s) + "\n"


def main(argv=None) -> str | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("dirs", nargs="*", help="output folders of benchmarks/gpu.sh")
    p.add_argument("--collect", nargs=2, metavar=("WORKDIR", "CONFIG"))
    p.add_argument("--eval-every", nargs=3, metavar=("CONFIG", "EVALS", "METHOD"))
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak")
    args = p.parse_args(argv)
    if args.collect:
        print(json.dumps(collect(*args.collect)))
        return None
    if args.eval_every:
        path, evals, method = args.eval_every
        print(eval_every(path, int(evals), method))
        return None
    text = report(args.dirs, args.peak_tflops)
    print(text, end="")
    return text


if __name__ == "__main__":
    main()
