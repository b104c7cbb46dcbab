"""Figures and tables from run workdirs, beside the paper's numbers (:mod:`adc_jax.paper`).

    python -m adc_jax.sweep plot --root runs/sweep_fmnist --out docs/fashion_mnist_sweep

writes, for the runs under ``root`` (any :func:`adc_jax.train.train_and_evaluate` workdirs; a
:mod:`adc_jax.sweep` root adds each run's target ξ):

* ``<out>_accuracy.{png,csv,md}`` – final test accuracy against the paper-compatible ξ, one line
  per method, mean ± std over seeds, Base as a horizontal line; for the paper's own settings
  (DeiT-T/S × CIFAR-100/Food-101) the paper's numbers are drawn beside ours, hollow and dashed;
* ``<out>_bytes.{png,csv,md}`` – test accuracy against cumulative bytes (uplink + downlink) for
  chosen runs (default: Base and ADC at each ξ), from the evaluation rows of ``metrics.jsonl``.

Only finished runs (``summary.json`` present) are plotted; the Markdown tables list the others.
matplotlib is imported lazily, with the Agg backend, so this module imports without a display.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from adc_jax import paper

LABELS = {
    "base": "Base",
    "adc": "ADC",
    "c3sl": "C3-SL",
    "topk": "Top-K",
    "randtopk": "Random Top-K",
    "bottlenet": "BottleNet++",
    "quantize": "Quantisation",
    "fedlite": "FedLite",
}
METHOD_ORDER = tuple(LABELS)
COLORS = {m: f"C{i}" for i, m in enumerate(METHOD_ORDER)}
MARKERS = dict(zip(METHOD_ORDER, "o*sv^DPX", strict=True))
GIB = 2.0**30


# ---- Reading runs -----------------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
    """One finished run: its summary, the sweep's target ξ and its evaluation curve."""

    name: str
    method: str
    xi_target: float
    seed: int
    xi_paper: float
    xi_measured: float
    test_accuracy: float
    steps: int
    bytes_up: float
    bytes_down: float
    wall_seconds: float
    resumed: bool  # wall_seconds then covers only the last invocation
    model: str
    dataset: str
    device: str  # e.g. "1× cpu"
    curve: list[tuple[int, float, float]]  # (step, cumulative bytes up + down, test accuracy)


def _read_json(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_run(workdir: str) -> RunResult | None:
    """A finished run's results, or ``None`` if ``workdir`` has no ``summary.json``."""
    summary = _read_json(os.path.join(workdir, "summary.json"))
    if summary is None:
        return None
    planned = _read_json(os.path.join(workdir, "sweep.json")) or {}
    config = _read_json(os.path.join(workdir, "config.json")) or {}
    curve = {}
    metrics = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(metrics):
        with open(metrics) as f:
            for line in f:
                row = json.loads(line)
                if "test_accuracy" in row and row["test_accuracy"] is not None:
                    # A resumed run re-evaluates its last step: keep the last row per step.
                    total = row["bytes_up"] + row["bytes_down"]
                    curve[row["step"]] = (row["step"], total, row["test_accuracy"])
    return RunResult(
        name=os.path.basename(os.path.normpath(workdir)),
        method=planned.get("method", summary["method"]),
        xi_target=float(planned.get("xi_target", summary["xi_nominal"])),
        seed=int(planned.get("seed", config.get("seed", 0))),
        xi_paper=float(summary["xi_nominal"]),
        xi_measured=float(summary["xi_measured"]),
        test_accuracy=float(summary["test_accuracy"]),
        steps=int(summary["steps"]),
        bytes_up=float(summary["bytes_up"]),
        bytes_down=float(summary["bytes_down"]),
        wall_seconds=float(summary.get("wall_seconds", math.nan)),
        resumed=bool(summary.get("resumed_from_step", 0)),
        model=summary.get("model", ""),
        dataset=summary.get("dataset", ""),
        device=f"{summary.get('num_devices', '?')}× {summary.get('device_kind', '?')}",
        curve=[curve[s] for s in sorted(curve)],
    )


def load_runs(root: str) -> tuple[list[RunResult], list[str]]:
    """The finished runs under ``root`` and the names of the unfinished ones."""
    finished, unfinished = [], []
    for name in sorted(os.listdir(root)):
        workdir = os.path.join(root, name)
        if not os.path.isdir(workdir):
            continue
        run = load_run(workdir)
        if run is not None:
            finished.append(run)
        elif os.path.exists(os.path.join(workdir, "sweep.json")) or os.path.exists(
            os.path.join(workdir, "config.json")
        ):
            unfinished.append(name)
    return finished, unfinished


# ---- Aggregating over seeds --------------------------------------------------------------------


@dataclasses.dataclass
class Group:
    """The runs of one (method, target ξ) cell, over seeds."""

    method: str
    xi_target: float
    runs: list[RunResult]

    @property
    def key(self) -> str:
        return f"{self.method}-xi{self.xi_target:g}"

    def _values(self, field: str) -> np.ndarray:
        return np.array([getattr(r, field) for r in self.runs], dtype=np.float64)

    def mean(self, field: str) -> float:
        return float(self._values(field).mean())

    def std(self, field: str) -> float:
        """Sample standard deviation over seeds (0 for one seed)."""
        values = self._values(field)
        return float(values.std(ddof=1)) if len(values) > 1 else 0.0

    def curve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(bytes, accuracy mean, accuracy std)`` at the steps every seed evaluated."""
        steps = set.intersection(*({s for s, _, _ in r.curve} for r in self.runs))
        steps = sorted(steps)
        by_run = [{s: (b, a) for s, b, a in r.curve} for r in self.runs]
        x = np.array([by_run[0][s][0] for s in steps], dtype=np.float64)
        acc = np.array([[run[s][1] for s in steps] for run in by_run], dtype=np.float64)
        std = acc.std(axis=0, ddof=1) if len(self.runs) > 1 else np.zeros(len(steps))
        return x, acc.mean(axis=0), std


def group_runs(runs: Iterable[RunResult]) -> list[Group]:
    """Runs grouped by (method, target ξ), in the figures' method order then by ξ."""
    groups: dict[tuple[str, float], list[RunResult]] = {}
    for run in runs:
        groups.setdefault((run.method, run.xi_target), []).append(run)
    order = lambda key: (
        METHOD_ORDER.index(key[0]) if key[0] in METHOD_ORDER else len(METHOD_ORDER),
        key[0],
        key[1],
    )
    return [
        Group(m, xi, sorted(rs, key=lambda r: r.seed))
        for (m, xi), rs in sorted(groups.items(), key=lambda kv: order(kv[0]))
    ]


def select_groups(groups: Sequence[Group], selection: Sequence[str] | None) -> list[Group]:
    """Groups named by ``selection``: a method (all its ξ) or ``method-xi<ξ>``; default Base+ADC."""
    selection = list(selection or ("base", "adc"))
    chosen = [g for g in groups if g.method in selection or g.key in selection]
    return chosen


# ---- Tables -----------------------------------------------------------------------------------

TABLE_COLUMNS = (
    "method",
    "xi_target",
    "xi_paper",
    "xi_measured",
    "accuracy_mean",
    "accuracy_std",
    "n_seeds",
    "steps",
    "gib_up",
    "gib_down",
    "wall_seconds",
)


def table_rows(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """One row per group with :data:`TABLE_COLUMNS` (means over seeds)."""
    return [
        {
            "method": g.method,
            "xi_target": g.xi_target,
            "xi_paper": g.mean("xi_paper"),
            "xi_measured": g.mean("xi_measured"),
            "accuracy_mean": g.mean("test_accuracy"),
            "accuracy_std": g.std("test_accuracy"),
            "n_seeds": len(g.runs),
            "steps": round(g.mean("steps")),
            "gib_up": g.mean("bytes_up") / GIB,
            "gib_down": g.mean("bytes_down") / GIB,
            "wall_seconds": g.mean("wall_seconds"),
        }
        for g in groups
    ]


def write_csv(rows: Sequence[dict[str, Any]], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TABLE_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in TABLE_COLUMNS})


def _accuracy_cell(row: dict[str, Any]) -> str:
    """``mean ± std``; the mean alone for one seed (a spread of one run is not a measurement)."""
    if row["n_seeds"] < 2:
        return f"{row['accuracy_mean']:.4f}"
    return f"{row['accuracy_mean']:.4f} ± {row['accuracy_std']:.4f}"


def _readable_ticks(values: Iterable[float], min_ratio: float = 1.15) -> list[float]:
    """Sorted ``values`` thinned so that no two ticks sit closer than ``min_ratio`` on a log axis;
    of two close values the shorter one to write (0.1 rather than 0.0938) is kept."""
    kept: list[float] = []
    for value in sorted(values):
        if kept and value / kept[-1] < min_ratio:
            if len(f"{value:.3g}") < len(f"{kept[-1]:.3g}"):
                kept[-1] = value
            continue
        kept.append(value)
    return kept


def markdown_table(rows: Sequence[dict[str, Any]], groups: Sequence[Group] = ()) -> str:
    """The rows as a Markdown table (accuracy as mean ± std; ``*``: wall time of a resumed run)."""
    resumed = {g.key for g in groups if any(r.resumed for r in g.runs)}
    lines = [
        "| method | ξ target | ξ paper | ξ measured | test accuracy | seeds | steps | GiB up | "
        "GiB down | wall time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        key = f"{row['method']}-xi{row['xi_target']:g}"
        lines.append(
            f"| {LABELS.get(row['method'], row['method'])} | {row['xi_target']:g} | "
            f"{row['xi_paper']:.4f} | {row['xi_measured']:.4f} | "
            f"{_accuracy_cell(row)} | {row['n_seeds']} | "
            f"{row['steps']} | {row['gib_up']:.3f} | {row['gib_down']:.3f} | "
            f"{row['wall_seconds']:.0f}{'*' if key in resumed else ''} |"
        )
    return "\n".join(lines) + "\n"


def paper_markdown(reference: dict[str, Any]) -> str:
    """The paper's numbers for a setting, as drawn in the accuracy figure."""
    lines = ["| method | ξ | test accuracy (paper) |", "|---|---|---|"]
    lines.append(f"| Base | 1 | {reference['base']:.3f} |")
    lines += [f"| ADC | {xi:g} | {acc:.3f} |" for xi, acc in reference["adc"].items()]
    lines += [
        f"| {LABELS[m]} | {xi:g} | {acc:.3f} |" for m, (xi, acc) in reference["baselines"].items()
    ]
    return "\n".join(lines) + "\n"


# ---- Figures ----------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _setting(groups: Sequence[Group]) -> tuple[str, str]:
    runs = [r for g in groups for r in g.runs]
    models = sorted({r.model for r in runs})
    datasets = sorted({r.dataset for r in runs})
    return ", ".join(models), ", ".join(datasets)


def plot_accuracy_vs_xi(
    groups: Sequence[Group],
    path: str,
    *,
    title: str | None = None,
    extra: Sequence[tuple[str, Sequence[RunResult]]] = (),
) -> None:
    """Final test accuracy against the paper-compatible ξ (log axis), mean ± std over seeds.

    ``extra``: more lines, ``(label, runs)``, drawn thin and dotted against each run's measured
    ξ (variants of a method, such as ADC with a low-precision link).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8), constrained_layout=True)
    model, dataset = _setting(groups)
    reference = paper.reference(model, dataset)
    ticks = set()
    by_method: dict[str, list[Group]] = {}
    for g in groups:
        by_method.setdefault(g.method, []).append(g)
    for method, gs in by_method.items():
        label = LABELS.get(method, method)
        color = COLORS.get(method, "k")
        if method == "base":
            for g in gs:
                mean, std = g.mean("test_accuracy"), g.std("test_accuracy")
                ax.axhline(mean, color=color, lw=1.5, label=f"{label} (ξ = 1): {mean:.3f}")
                if std > 0:
                    ax.axhspan(mean - std, mean + std, color=color, alpha=0.12, lw=0)
            continue
        gs = sorted(gs, key=lambda g: g.mean("xi_paper"))
        x = [g.mean("xi_paper") for g in gs]
        ticks.update(x)
        ax.errorbar(
            x,
            [g.mean("test_accuracy") for g in gs],
            yerr=[g.std("test_accuracy") for g in gs],
            color=color,
            marker=MARKERS.get(method, "o"),
            ms=8 if method == "adc" else 6,
            lw=2.2 if method == "adc" else 1.3,
            capsize=3,
            label=label,
            zorder=3 if method == "adc" else 2,
        )
    for i, (label, runs) in enumerate(extra):
        by_xi: dict[float, list[RunResult]] = {}
        for run in runs:
            by_xi.setdefault(round(run.xi_measured, 6), []).append(run)
        gs = [Group("extra", xi, rs) for xi, rs in sorted(by_xi.items())]
        ax.errorbar(
            [g.mean("xi_measured") for g in gs],
            [g.mean("test_accuracy") for g in gs],
            yerr=[g.std("test_accuracy") for g in gs],
            color=f"C{len(COLORS) + i}",
            marker="x",
            ls=":",
            lw=1.2,
            capsize=2,
            label=label,
        )
    if reference is not None:
        adc = reference["adc"]
        ax.plot(
            list(adc),
            list(adc.values()),
            ls="--",
            color=COLORS["adc"],
            marker="o",
            mfc="none",
            alpha=0.8,
            label="ADC (paper)",
        )
        ax.axhline(
            reference["base"],
            ls=":",
            color=COLORS["base"],
            label=f"Base (paper): {reference['base']}",
        )
        for method, (xi, acc) in reference["baselines"].items():
            ax.plot(
                [xi],
                [acc],
                ls="none",
                marker=MARKERS.get(method, "o"),
                mfc="none",
                mew=1.5,
                ms=8,
                color=COLORS.get(method, "k"),
                label=f"{LABELS[method]} (paper)",
            )
        ticks.update(adc)
    ax.set_xscale("log")
    if ticks:
        ticks = _readable_ticks(ticks)
        ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks], rotation=45 if len(ticks) > 6 else 0)
        ax.minorticks_off()
    ax.set_xlabel("compression ratio ξ (paper-compatible, log scale)")
    ax.set_ylabel("final test accuracy")
    seeds = sorted({len(g.runs) for g in groups})
    spread = "1 seed" if seeds == [1] else f"mean ± std over {'/'.join(map(str, seeds))} seeds"
    ax.set_title(
        title
        or f"{dataset}, {model}: accuracy vs ξ ({spread})"
        + ("\nhollow/dashed: paper's numbers" if reference else ""),
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", ncol=2 if len(ax.get_legend_handles_labels()[0]) > 7 else 1)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _tint(color: str, amount: float) -> tuple[float, float, float]:
    """``color`` mixed with white (``amount`` 0: unchanged, 1: white)."""
    from matplotlib.colors import to_rgb

    return tuple(c + (1.0 - c) * amount for c in to_rgb(color))


def plot_accuracy_vs_bytes(groups: Sequence[Group], path: str, *, title: str | None = None) -> None:
    """Test accuracy at every evaluation against cumulative bytes up + down (log axis)."""
    from matplotlib.ticker import FuncFormatter

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8), constrained_layout=True)
    methods_xis: dict[str, list[float]] = {}
    for g in groups:
        methods_xis.setdefault(g.method, []).append(g.xi_target)
    most_points = 0
    for g in groups:
        x, mean, std = g.curve()
        if len(x) == 0:
            continue
        most_points = max(most_points, len(x))
        xis = sorted(methods_xis[g.method])
        # Tints of the method's colour by ξ (darkest: the strongest compression), so that one
        # method's lines read as a family.
        tint = 0.0 if len(xis) == 1 else 0.6 * xis.index(g.xi_target) / (len(xis) - 1)
        label = LABELS.get(g.method, g.method) + (
            "" if g.method == "base" else f" ξ={g.xi_target:g}"
        )
        color = _tint(COLORS.get(g.method, "k"), tint)
        ax.plot(
            x / GIB,
            mean,
            marker=MARKERS.get(g.method, "o"),
            ms=4 if len(x) > 2 else 9,
            color=color,
            mec="k" if len(x) <= 2 else color,
            mew=0.5,
            lw=1.8 if g.method == "base" else 1.4,
            label=label,
        )
        if len(g.runs) > 1:
            ax.fill_between(x / GIB, mean - std, mean + std, color=color, alpha=0.15, lw=0)
    model, dataset = _setting(groups)
    ax.set_xscale("log")
    # Readable numbers also when the runs span less than a decade (equal budgets do).
    plain = FuncFormatter(lambda v, _: f"{v:.3g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("cumulative communication, uplink + downlink (GiB, log scale)")
    ax.set_ylabel("test accuracy")
    default = f"{dataset}, {model}: test accuracy vs bytes sent"
    if most_points <= 1:
        default += "\n(one evaluation per run: `sweep run --evals N` gives curves)"
    ax.set_title(title or default, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ---- Everything for one root --------------------------------------------------------------------


def _write_markdown(path: str, heading: str, body: str) -> None:
    with open(path, "w") as f:
        f.write(f"# {heading}\n\n{body}")


def plot_sweep(
    root: str, out: str, *, bytes_runs: Sequence[str] | None = None, note: str = ""
) -> list[str]:
    """Writes both figures with their CSV and Markdown tables; returns the paths written.

    The Markdown tables start with the sweep's commands (``root/sweep_command.txt``, appended to
    by every ``python -m adc_jax.sweep run``; each distinct command once), the devices the runs
    used and ``note`` (e.g. the machine).
    """
    runs, unfinished = load_runs(root)
    if not runs:
        raise FileNotFoundError(f"No finished runs (summary.json) under {root!r}.")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    groups = group_runs(runs)
    model, dataset = _setting(groups)
    notes = (
        f"Runs under `{root}`: {dataset}, {model}. Accuracy: final test accuracy (uncompressed "
        "evaluation), mean ± sample std over seeds (the value alone for one seed). ξ paper: "
        "the paper-compatible ratio used for the budget; ξ measured: (ξ_up + ξ_down)/2 from "
        "exact bytes. GiB: cumulative over the run. Wall time: seconds per run (`*`: the run "
        "was resumed and this counts only its last invocation).\n"
    )
    devices = sorted({r.device for r in runs})
    notes += f"\nDevices: {', '.join(devices)} (per run).\n"
    command_file = os.path.join(root, "sweep_command.txt")
    if os.path.exists(command_file):
        with open(command_file) as f:
            commands = [line.strip() for line in f if line.strip()]
        commands = list(dict.fromkeys(commands))  # each distinct command once, first run first
        if commands:
            label = "Command" if len(commands) == 1 else "Commands (in the order first run)"
            notes += f"\n{label}:\n\n```\n" + "\n".join(commands) + "\n```\n"
    if note:
        notes += f"\n{note.strip()}\n"
    if unfinished:
        notes += "\nUnfinished (not plotted): " + ", ".join(f"`{n}`" for n in unfinished) + ".\n"
    written = []

    rows = table_rows(groups)
    plot_accuracy_vs_xi(groups, out + "_accuracy.png")
    write_csv(rows, out + "_accuracy.csv")
    body = notes + "\n" + markdown_table(rows, groups)
    reference = paper.reference(model, dataset)
    if reference is not None:
        body += "\nThe paper's numbers for this setting (adc_jax/paper.py):\n\n"
        body += paper_markdown(reference)
    _write_markdown(out + "_accuracy.md", "Final test accuracy vs compression ratio ξ", body)
    written += [out + "_accuracy.png", out + "_accuracy.csv", out + "_accuracy.md"]

    chosen = select_groups(groups, bytes_runs)
    if chosen:
        rows = table_rows(chosen)
        plot_accuracy_vs_bytes(chosen, out + "_bytes.png")
        write_csv(rows, out + "_bytes.csv")
        _write_markdown(
            out + "_bytes.md",
            "Test accuracy vs cumulative communication",
            notes + "\n" + markdown_table(rows, chosen),
        )
        written += [out + "_bytes.png", out + "_bytes.csv", out + "_bytes.md"]
    return written


__all__ = [
    "Group",
    "RunResult",
    "group_runs",
    "load_run",
    "load_runs",
    "markdown_table",
    "plot_accuracy_vs_bytes",
    "plot_accuracy_vs_xi",
    "plot_sweep",
    "select_groups",
    "table_rows",
]
