r"""The paper's regime on a CPU: pretrained features fine-tuned under a communication budget.

    python -m adc_jax.finetune_proxy --root runs/finetune_proxy [--seeds 0,1] [--dry_run]
    python -m adc_jax.finetune_proxy --root runs/finetune_proxy --report docs/finetune_proxy

The paper fine-tunes ImageNet-pretrained DeiTs; this reproduces that regime with what a CPU and
no download allow (``configs/fashion_mnist_finetune.py``): a ViT pretrained with Base on
Fashion-MNIST's classes 0–4 is fine-tuned, with a new head, on classes 5–9. One command runs every
part, each skipped when already done, so the same command resumes an interrupted one:

1. **Pretraining** (``<root>/pretrain``), exported once as ``pretrained.safetensors`` in timm's
   names (:func:`adc_jax.pretrained.save_timm`), which every fine-tuning run loads.
2. **The grid** (``<root>/grid``): Base, ADC, C3-SL, BottleNet++ (its autoencoder freshly
   initialised inside the pretrained network, as in the paper), Top-K, Random Top-K and
   quantisation at ξ ∈ {0.01, 0.05, 0.1, 0.25, 0.5}, each method's knob solved from ξ
   (:meth:`adc_jax.methods.Method.knobs_for_xi`), over ``--seeds``.
3. **Precision stacked on ADC** (``<root>/stacked``): ADC with a bfloat16 link at 2ξ and an int8
   link at 4ξ, each under a byte budget equal to what ADC in float32 at ξ sent: the same bytes
   buy a larger ξ.
4. **What ADC's two halves cost** (``<root>/ablation``): merging samples only (``T/B = ξ``, all
   tokens) and keeping tokens only (no merging, ``k/N = ξ``), first seed only.
5. **The uncapped protocol** (``<root>/uncapped``): ADC at the two smallest ξ without the epoch
   cap, i.e. all ``1/ξ`` times Base's steps (one seed).

``--report PREFIX`` writes ``PREFIX.png`` (test accuracy against ξ, one line per method, mean ±
std over seeds, with the stacked and ablation runs) and ``PREFIX_tables.md`` from whatever has
finished.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

import ml_collections

from adc_jax import sweep
from adc_jax.defaults import load_config

# The experiment's config, in the repository's configs/ (this driver runs from a clone).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = os.path.join(REPO, "configs", "fashion_mnist_finetune.py")
XIS = (0.01, 0.05, 0.1, 0.25, 0.5)
METHODS = ("base", "adc", "c3sl", "bottlenet", "topk", "randtopk", "quantize")
STACKED = (("bfloat16", 2), ("int8", 4))  # (link, ξ multiplier at the same bytes per step)
STACKED_XIS = (0.01, 0.05, 0.1)
UNCAPPED_XIS = (0.01, 0.05)


def load(arg: str = "", data_dir: str = "") -> ml_collections.ConfigDict:
    """``configs/fashion_mnist_finetune.py[:arg]`` reading its data from ``data_dir``."""
    config = load_config(CONFIG_FILE + (f":{arg}" if arg else ""))
    config.dataset.data_dir = data_dir
    return config


def pretrain(root: str, *, data_dir: str = "", log=print) -> str:
    """Runs (or finds) the pretraining and returns the exported checkpoint's path."""
    from adc_jax import pretrained, train

    workdir = os.path.join(root, "pretrain")
    path = os.path.join(workdir, "pretrained.safetensors")
    if os.path.exists(path):
        return path
    config = load("pretrain", data_dir)
    if not sweep.is_finished(workdir):
        log(f"pretraining in {workdir}")
        train.train_and_evaluate(config, workdir)
    exp = train.setup(config)
    state = train.Checkpoints(workdir, 1).restore(exp.initial_state)
    params = {"client": state.client.params["model"], "server": state.server.params["model"]}
    pretrained.save_timm(path + ".tmp", exp.model, params)
    os.replace(path + ".tmp", path)  # a reader never sees a half-written file
    return path


def _summary(workdir: str) -> dict | None:
    path = os.path.join(workdir, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def stacked_runs(config, grid_root: str, seeds: Sequence[int]) -> list[sweep.Run]:
    """ADC with a low-precision link at a larger ξ, on the byte budget of ADC float32 at ξ.

    Needs the float32 runs' summaries (their bytes); a seed whose float32 run is not finished yet
    is left for the next invocation.
    """
    cut = sweep.cut_shape(config)
    runs = []
    for xi in STACKED_XIS:
        for seed in seeds:
            done = _summary(os.path.join(grid_root, sweep.run_name("adc", xi, seed)))
            if done is None:
                continue
            budget = done["bytes_up"] + done["bytes_down"]
            for link, factor in STACKED:
                target = xi * factor
                runs.append(
                    sweep.Run(
                        "adc",
                        target,
                        seed,
                        (("xi", target),),
                        sweep.paper_xi("adc", {"xi": target}, cut),
                        tag=f"{link}-xi{target:g}-as{xi:g}",
                        overrides=(
                            ("link.uplink.kind", link),
                            ("link.downlink.kind", link),
                            ("budget.bytes", int(budget)),
                        ),
                    )
                )
    return runs


def ablation_runs(config, seeds: Sequence[int]) -> list[sweep.Run]:
    """ADC's halves alone: merge samples only, or keep tokens only, at each ξ of the grid."""
    cut = sweep.cut_shape(config)
    runs = []
    for xi in XIS:
        for half, ratios in (("merge", (xi, 1.0)), ("tokens", (1.0, xi))):
            knobs = {"batch_ratio": ratios[0], "token_ratio": ratios[1]}
            xi_sent = sweep.paper_xi("adc", knobs, cut)
            for seed in seeds:
                runs.append(
                    sweep.Run(
                        "adc",
                        xi_sent,
                        seed,
                        tuple(sorted(knobs.items())),
                        xi_sent,
                        tag=f"{half}-xi{xi:g}",
                        # Budgeted at the ξ it sends, like every method of the grid.
                        overrides=(("method.xi", xi_sent),),
                    )
                )
    return runs


def uncapped_runs(config) -> list[sweep.Run]:
    cut = sweep.cut_shape(config)
    return [
        sweep.Run(
            "adc",
            xi,
            0,
            (("xi", xi),),
            sweep.paper_xi("adc", {"xi": xi}, cut),
            tag=f"uncapped-xi{xi:g}",
            overrides=(("budget.max_epochs", 0.0),),
        )
        for xi in UNCAPPED_XIS
    ]


def run_all(
    root: str, seeds: Sequence[int], *, data_dir: str = "", dry_run: bool = False, log=print
) -> int:
    """Every part, in order; returns the number of failed runs."""
    config = load("", data_dir)
    if dry_run:
        checkpoint = os.path.join(root, "pretrain", "pretrained.safetensors")
    else:
        checkpoint = pretrain(root, data_dir=data_dir, log=log)
    config.model.pretrained = os.path.abspath(checkpoint)
    grid, skipped = sweep.plan_grid(config, METHODS, XIS, seeds)
    for cell in skipped:
        log(f"left out: {cell.method} at ξ {cell.xi_target:g}: {cell.reason}")
    parts = {
        "grid": grid,
        "ablation": ablation_runs(config, seeds[:1]),
        "uncapped": uncapped_runs(config),
    }
    failed = 0
    for part in ("grid", "stacked", "ablation", "uncapped"):
        part_root = os.path.join(root, part)
        runs = parts.get(part) or stacked_runs(config, os.path.join(root, "grid"), seeds)
        if dry_run:
            log(f"{part}: {len(runs)} runs under {part_root}")
            for run in runs:
                log(f"  {run.name}")
            continue
        status = sweep.run_grid(config, runs, part_root, log=log)
        failed += list(status.values()).count("failed")
    return failed


# ---- The report ---------------------------------------------------------------------------------


def report(root: str, prefix: str) -> list[str]:
    """``<prefix>.png`` and ``<prefix>_tables.md`` from the finished runs under ``root``."""
    from adc_jax import plots

    groups = plots.group_runs(plots.load_runs(os.path.join(root, "grid"))[0])
    extra = {}
    for part in ("stacked", "ablation", "uncapped"):
        path = os.path.join(root, part)
        extra[part] = plots.load_runs(path)[0] if os.path.isdir(path) else []
    lines = []
    for part, name, label in (
        ("stacked", "bfloat16", "ADC + bfloat16 link (2ξ at ξ's bytes)"),
        ("stacked", "int8", "ADC + int8 link (4ξ at ξ's bytes)"),
        ("ablation", "merge", "ADC merging samples only"),
        ("ablation", "tokens", "ADC keeping tokens only"),
    ):
        runs = [r for r in extra[part] if r.name.startswith(f"adc-{name}-")]
        if runs:
            lines.append((label, runs))
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    figure = f"{prefix}.png"
    plots.plot_accuracy_vs_xi(
        groups,
        figure,
        title="Fine-tuning a pretrained ViT on new classes (Fashion-MNIST 5–9), 2-core CPU\n"
        "mean ± std over seeds; dotted: ADC variants at their measured ξ",
        extra=lines,
    )
    text = ["## The grid", "", plots.markdown_table(plots.table_rows(groups), groups)]
    for part, runs in extra.items():
        if runs:
            text += ["", f"## {part}", "", _runs_table(runs)]
    tables = f"{prefix}_tables.md"
    with open(tables, "w") as f:
        f.write("\n".join(text))
    return [figure, tables]


def _runs_table(runs) -> str:
    """One row per run name without its seed: measured ξ, accuracy over seeds, steps, bytes."""
    import numpy as np

    by_name: dict[str, list] = {}
    for run in runs:
        by_name.setdefault(run.name.rsplit("-s", 1)[0], []).append(run)
    rows = [
        "| run | ξ measured | test accuracy | seeds | steps | MiB up + down |",
        "|---|---|---|---|---|---|",
    ]
    for name, rs in sorted(by_name.items(), key=lambda kv: kv[1][0].xi_measured):
        acc = np.array([r.test_accuracy for r in rs])
        cell = f"{acc.mean():.4f}" + (f" ± {acc.std(ddof=1):.4f}" if len(rs) > 1 else "")
        total = np.mean([r.bytes_up + r.bytes_down for r in rs]) / 2**20
        rows.append(
            f"| {name} | {rs[0].xi_measured:.4f} | {cell} | {len(rs)} | {rs[0].steps} | "
            f"{total:.1f} |"
        )
    return "\n".join(rows) + "\n"


# ---- Command line -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m adc_jax.finetune_proxy", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--root", required=True, help="one directory for every run")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    parser.add_argument("--data_dir", default="", help="tfds data dir ('' = tfds' default)")
    parser.add_argument("--dry_run", action="store_true", help="list the runs and exit")
    parser.add_argument("--report", default="", help="write PREFIX.png and PREFIX_tables.md")
    args = parser.parse_args(argv)
    if args.report:
        for path in report(args.root, args.report):
            print(path)
        return 0
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    failed = run_all(
        args.root,
        seeds,
        data_dir=args.data_dir,
        dry_run=args.dry_run,
        log=lambda s: print(s, flush=True),
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
