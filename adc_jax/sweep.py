r"""Sweeps: a grid of methods × compression ratios ξ × seeds, one workdir per run, and its plots.

    python -m adc_jax.sweep run --config configs/vit_fashion_mnist.py \
        --methods base,adc,c3sl,topk,randtopk,bottlenet,quantize --xi 0.1,0.25,0.5 --seeds 0 \
        --root runs/sweep_fmnist --set budget.base_epochs=1 [--dry-run]
    python -m adc_jax.sweep plot --root runs/sweep_fmnist --out docs/fashion_mnist_sweep

Every run lives in ``<root>/<method>-xi<ξ>-s<seed>`` (Base once, as ``base-xi1-s<seed>``) and is
an ordinary :func:`adc_jax.train.train_and_evaluate` workdir plus a ``sweep.json`` that records
the target ξ, the method knob chosen for it and the paper-compatible ξ that knob achieves. A run
whose ``summary.json`` exists is skipped; any other is (re)started, and ``train_and_evaluate``
resumes it from its last checkpoint by itself. So an interrupted sweep continues when the same
command is given again, and several copies of the command (one per core or machine sharing the
root) split the grid between them: each run is claimed with a lock file first.

Each method has its own compression knob; :func:`method_knobs` maps a target ξ to the knob whose
paper-compatible ξ (ADC_SPEC §3, §5) is closest:

=========  =========================  ==================================================
method     knob                       rule
=========  =========================  ==================================================
adc        ``method.xi``              ξ itself (budgeted at its nominal ξ, as the paper)
c3sl       ``method.ratio``           the divisor R of the batch size closest to 1/ξ
bottlenet  ``method.compression``     ξ (the achieved ξ is round(ξ·D)/D)
topk       ``method.rate``            r solving ξ = ½[r(1 + ⌈log₂(B·N·D)⌉/32) + r]
randtopk   ``method.rate``            as topk
quantize   ``method.bits``            round(32ξ), at least 1
fedlite    ``method.num_subvectors``  the (q, L) closest to ξ; ξ ≥ 0.5 only (the
           ``method.num_centroids``   downlink is the dense gradient), else skipped
base       —                          ξ = 1, one run per seed whatever the ξ grid
=========  =========================  ==================================================

Runs go in the order Base, ADC, then the baselines, each by decreasing ξ (the cheapest runs
first: fewer steps under the paper's budget), so a sweep cut short is missing the baselines'
most expensive corner, not the method under study or a whole ξ. ``--evals N`` (default 10)
spreads N test evaluations over each run, for the accuracy-vs-bytes curves; the config's own
schedule evaluates once per epoch-equivalent of the budget only.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import json
import math
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from adc_jax.methods import METHODS, CutShape, method_from_config

BASE_XI = 1.0
RUN_FILE = "sweep.json"  # what the sweep records in each run's workdir
LOCK_FILE = "sweep.lock"
# Methods in the order the figures list them.
METHOD_ORDER = ("base", "adc", "c3sl", "topk", "randtopk", "bottlenet", "quantize", "fedlite")


class Unreachable(ValueError):
    """A method cannot reach a target ξ with any setting of its knob."""


# ---- ξ → each method's knob ---------------------------------------------------------------


def c3sl_ratio(xi: float, batch_size: int) -> int:
    """The divisor ``R`` of ``batch_size`` closest to ``1/ξ`` (ties: the smaller ``R``)."""
    divisors = [r for r in range(1, batch_size + 1) if batch_size % r == 0]
    return min(divisors, key=lambda r: (abs(r - 1.0 / xi), r))


def topk_rate(xi: float, cut: CutShape) -> float:
    """Top-K's ``r`` with ``ξ = ½[r(1 + ⌈log₂(B·N·D)⌉/32) + r]`` (ADC_SPEC §5)."""
    index_bits = math.ceil(math.log2(cut.batch_size * cut.seq_len * cut.width))
    rate = 2.0 * xi / (2.0 + index_bits / 32)
    if rate > 1.0:
        raise Unreachable(f"Top-K tops out at ξ = {1 + index_bits / 64:.3f} (r = 1); got {xi}.")
    return rate


def quantize_bits(xi: float) -> int:
    """``round(32ξ)`` bits (half up), clipped to the 1..16 the method accepts."""
    return min(16, max(1, math.floor(32 * xi + 0.5)))


def fedlite_knobs(xi: float, cut: CutShape) -> dict[str, int]:
    """FedLite's ``(q, L)`` (one group) whose paper ξ is closest to ``xi``.

    ``ξ = ½(ξ_up + 1)``: the downlink is the dense gradient, so only targets ≥ 0.5 are
    reachable. Candidates stay in the range FedLite was designed for, so that a target near 0.5
    does not pick a degenerate 2-centroid codebook: sub-vectors of 8 to D values (``q`` dividing
    ``N·D``) and ``L`` a power of two from 16 to 256 (4- to 8-bit codes); ties go to the
    smaller codebook.
    """
    if xi < 0.5:
        raise Unreachable(f"FedLite sends the dense gradient back, so its ξ ≥ 0.5; got {xi}.")
    size = cut.seq_len * cut.width
    best = None
    for q in range(1, size + 1):
        if size % q or not 8 <= size // q <= cut.width:
            continue
        for L in (16, 32, 64, 128, 256):
            if L > cut.batch_size * q:
                break
            knobs = {"num_subvectors": q, "num_centroids": L, "num_groups": 1}
            key = (abs(_paper_xi("fedlite", knobs, cut) - xi), L * size // q, q)
            if best is None or key < best[0]:
                best = (key, knobs)
    if best is None or best[0][0] > 0.1 * xi:
        raise Unreachable(
            f"FedLite cannot get within 10% of ξ = {xi} with 4- to 8-bit codes on sub-vectors of "
            f"8..D values (N·D = {size})."
        )
    return best[1]


def method_knobs(method: str, xi: float, cut: CutShape) -> dict[str, Any]:
    """The ``config.method`` fields that set ``method`` to the target ``xi`` on ``cut``.

    Raises:
      Unreachable: the method cannot get near ``xi`` (FedLite below 0.5).
      ValueError: unknown method, or ``xi`` outside (0, 1].
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; expected one of {sorted(METHODS)}.")
    if not 0 < xi <= 1:
        raise ValueError(f"Target ξ ({xi}) must be in (0, 1].")
    if method == "base":
        return {}
    if method == "adc":
        return {"xi": float(xi)}
    if method == "c3sl":
        return {"ratio": c3sl_ratio(xi, cut.batch_size)}
    if method == "bottlenet":
        return {"compression": float(xi)}
    if method in ("topk", "randtopk"):
        return {"rate": topk_rate(xi, cut)}
    if method == "quantize":
        return {"bits": quantize_bits(xi)}
    if method == "fedlite":
        return fedlite_knobs(xi, cut)
    raise ValueError(f"No ξ mapping for method {method!r}.")


def _paper_xi(method: str, knobs: dict[str, Any], cut: CutShape) -> float:
    cfg = ml_collections.ConfigDict({"name": method, **knobs})
    return float(method_from_config(cfg).xi_paper(cut))


def cut_shape(config: ml_collections.ConfigDict) -> CutShape:
    """What one client sends per step under ``config`` (the knobs depend on B, N, D)."""
    from adc_jax import data, train, vit

    model = vit.get_model_config(config.model.name)
    clients = 1
    if config.devices.per_client:
        clients = len(train.select_devices(config))
    info = data.dataset_info(config.dataset.name)
    return CutShape(config.batch_size // clients, model.seq_len, model.width, info.num_classes)


# ---- The grid -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
    """One cell of the grid."""

    method: str
    xi_target: float
    seed: int
    knobs: tuple[tuple[str, Any], ...]  # config.method overrides, sorted
    xi_paper: float  # what the knobs achieve (paper-compatible)

    @property
    def name(self) -> str:
        return run_name(self.method, self.xi_target, self.seed)

    def config(self, base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """``base`` with this run's method, knobs and seed."""
        config = base.copy_and_resolve_references()
        config.method.name = self.method
        config.seed = self.seed
        for key, value in self.knobs:
            config.method[key] = value
        return config


def run_name(method: str, xi: float, seed: int) -> str:
    """``<method>-xi<ξ>-s<seed>``, ξ as ``%g`` (0.1, 0.25, 1)."""
    return f"{method}-xi{xi:g}-s{seed}"


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A grid cell left out, and why."""

    method: str
    xi_target: float
    reason: str


def plan_grid(
    config: ml_collections.ConfigDict,
    methods: Sequence[str],
    xis: Sequence[float],
    seeds: Sequence[int],
) -> tuple[list[Run], list[Skipped]]:
    """The runs of the grid (Base, ADC, then the baselines, each by decreasing ξ) and the cells
    left out."""
    cut = cut_shape(config)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"Unknown methods {unknown}; expected some of {sorted(METHODS)}.")
    cells, skipped = [], []
    if "base" in methods:
        cells.append(("base", BASE_XI, {}))
    # ADC (the method under study) before the baselines, each by decreasing ξ (fewest steps).
    baselines = [m for m in methods if m not in ("base", "adc")]
    order = [("adc", xi) for xi in sorted(set(xis), reverse=True) if "adc" in methods]
    order += [(m, xi) for xi in sorted(set(xis), reverse=True) for m in baselines]
    for method, xi in order:
        try:
            cells.append((method, xi, method_knobs(method, xi, cut)))
        except Unreachable as e:
            skipped.append(Skipped(method, xi, str(e)))
    runs = [
        Run(method, xi, seed, tuple(sorted(knobs.items())), _paper_xi(method, knobs, cut))
        for method, xi, knobs in cells
        for seed in seeds
    ]
    return runs, skipped


# ---- Running ------------------------------------------------------------------------------


def with_evals(config: ml_collections.ConfigDict, evals: int) -> ml_collections.ConfigDict:
    """``config`` evaluating about ``evals`` times over its run (for accuracy-vs-bytes curves).

    By default a run evaluates once per epoch-equivalent of its budget, so a 1-epoch budget gives
    one point per run. Left as it is when ``evals`` is 0 or ``eval_every_steps`` is set.
    """
    if evals <= 0 or config.eval_every_steps > 0:
        return config
    from adc_jax import data, train
    from adc_jax.methods import step_cost

    cut = cut_shape(config)
    clients = config.batch_size // cut.batch_size
    cost = step_cost(
        method_from_config(config.method),
        cut,
        train.channel_from_config(config.link.uplink),
        train.channel_from_config(config.link.downlink),
        clients=clients,
    )
    total = train.plan_steps(config, cost, data.dataset_info(config.dataset.name).train_size)
    config = config.copy_and_resolve_references()
    config.eval_every_steps = max(1, math.ceil(total.total_steps / evals))
    return config


def is_finished(workdir: str) -> bool:
    return os.path.exists(os.path.join(workdir, "summary.json"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(workdir: str) -> bool:
    """Takes the run's lock; False if another live sweep process holds it.

    A lock left by a process that has died (same host) is taken over, so a killed sweep never
    blocks its own restart.
    """
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path) as f:
                    owner = json.load(f)
            except (OSError, ValueError):
                owner = {}
            if owner.get("host") == me["host"] and not _pid_alive(int(owner.get("pid", -1))):
                os.remove(path)  # stale: its process is gone
                continue
            return owner == me
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return True
    return False


def release(workdir: str) -> None:
    try:
        os.remove(os.path.join(workdir, LOCK_FILE))
    except FileNotFoundError:
        pass


def run_grid(
    config: ml_collections.ConfigDict,
    runs: Sequence[Run],
    root: str,
    *,
    log: Callable[[str], None] = print,
    evals: int = 0,
    train_fn: Callable[[ml_collections.ConfigDict, str], dict[str, Any]] | None = None,
) -> dict[str, str]:
    """Runs every run of ``runs`` that is not finished; returns ``{name: status}``.

    ``evals`` > 0: evaluate about that many times per run (:func:`with_evals`).
    Status: ``finished`` (ran now), ``skipped`` (already finished), ``busy`` (another sweep
    process holds it) or ``failed`` (the exception is in the run's ``error.txt``; the sweep goes
    on with the next run).
    """
    if train_fn is None:
        from adc_jax.train import train_and_evaluate as train_fn
    os.makedirs(root, exist_ok=True)
    status = {}
    for i, run in enumerate(runs, 1):
        workdir = os.path.join(root, run.name)
        tag = f"[{i}/{len(runs)}] {run.name}"
        if is_finished(workdir):
            log(f"{tag}: skipped (finished: {_accuracy_note(workdir)})")
            status[run.name] = "skipped"
            continue
        if not claim(workdir):
            log(f"{tag}: busy (another sweep process is running it)")
            status[run.name] = "busy"
            continue
        try:
            if is_finished(workdir):  # finished between the check and the claim
                log(f"{tag}: skipped (finished: {_accuracy_note(workdir)})")
                status[run.name] = "skipped"
                continue
            with open(os.path.join(workdir, RUN_FILE), "w") as f:
                json.dump(
                    {**dataclasses.asdict(run), "knobs": dict(run.knobs), "name": run.name},
                    f,
                    indent=2,
                )
            knobs = ", ".join(f"{k}={v:.4g}" for k, v in run.knobs) or "none"
            log(
                f"{tag}: started at {time.strftime('%H:%M:%S')} ({knobs}; paper ξ "
                f"{run.xi_paper:.4g})"
            )
            start = time.time()
            try:
                summary = train_fn(with_evals(run.config(config), evals), workdir)
            except Exception:  # noqa: BLE001 -- one bad cell must not end the sweep
                with open(os.path.join(workdir, "error.txt"), "w") as f:
                    f.write(traceback.format_exc())
                log(f"{tag}: FAILED after {time.time() - start:.0f} s (see {workdir}/error.txt)")
                status[run.name] = "failed"
                continue
            if os.path.exists(error := os.path.join(workdir, "error.txt")):
                os.remove(error)  # from an earlier attempt that failed
            log(
                f"{tag}: finished in {time.time() - start:.0f} s: test accuracy "
                f"{summary['test_accuracy']:.4f}, {summary['steps']} steps, ξ paper "
                f"{summary['xi_nominal']:.4g}, measured {summary['xi_measured']:.4g}"
            )
            status[run.name] = "finished"
        finally:
            release(workdir)
    return status


def _accuracy_note(workdir: str) -> str:
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    return f"test accuracy {summary['test_accuracy']:.4f}, {summary['steps']} steps"


# ---- Config files and overrides -------------------------------------------------------------


def load_config(spec: str) -> ml_collections.ConfigDict:
    """``path/to/config.py`` or ``path/to/config.py:arg`` → ``get_config(arg)``."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"Config file {path!r} does not exist.")
    module_spec = importlib.util.spec_from_file_location("_sweep_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Applies ``key.path=value`` strings, converting to each existing field's type.

    An unknown key fails loudly (a misspelt override must not run a whole sweep).
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set wants key=value, got {item!r}.")
        *parents, leaf = key.strip().split(".")
        node = config
        for part in parents:
            if part not in node:
                raise KeyError(f"Unknown config field {key!r} (no {part!r}).")
            node = node[part]
        if leaf not in node:
            raise KeyError(f"Unknown config field {key!r}.")
        node[leaf] = _convert(node[leaf], text.strip(), key)


def _convert(current: Any, text: str, key: str) -> Any:
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"{key} is a bool; got {text!r}.")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, str):
        return text
    return ast.literal_eval(text)


# ---- Command line ---------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m adc_jax.sweep {run, plot} ...`` (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m adc_jax.sweep",
        description="Run a grid of split-learning experiments and plot it.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run (or resume) a grid of methods × ξ × seeds")
    r.add_argument("--config", required=True, help="config file, optionally path.py:arg")
    r.add_argument("--methods", type=_names, default=["base", "adc"], help="comma-separated")
    r.add_argument("--xi", type=_floats, default=[0.1, 0.25, 0.5], help="target ξ values")
    r.add_argument("--seeds", type=_ints, default=[0], help="comma-separated seeds")
    r.add_argument("--root", required=True, help="one workdir per run under this directory")
    r.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. budget.base_epochs=1 (repeatable)",
    )
    r.add_argument(
        "--evals",
        type=int,
        default=10,
        help="test evaluations per run, evenly spaced (0: the config's schedule, one per "
        "epoch-equivalent of the budget); ignored when eval_every_steps is set",
    )
    r.add_argument("--dry-run", action="store_true", help="list the grid and exit")
    p = sub.add_parser("plot", help="figures and tables from a sweep's root")
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True, help="output prefix, e.g. docs/fashion_mnist_sweep")
    p.add_argument(
        "--bytes-runs",
        type=_names,
        default=None,
        help="groups for the bytes figure, as method or method-xi<ξ> (default: base,adc)",
    )
    p.add_argument("--note", default="", help="text for the tables, e.g. the machine used")
    args = parser.parse_args(argv)

    if args.command == "plot":
        from adc_jax import plots

        written = plots.plot_sweep(args.root, args.out, bytes_runs=args.bytes_runs, note=args.note)
        for path in written:
            print(path)
        return 0

    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    config = load_config(args.config)
    apply_overrides(config, args.set)
    runs, skipped = plan_grid(config, args.methods, args.xi, args.seeds)
    for cell in skipped:
        print(f"left out: {cell.method} at ξ {cell.xi_target:g}: {cell.reason}")
    if args.dry_run:
        print(f"{len(runs)} runs under {args.root}:")
        for run in runs:
            state = "finished" if is_finished(os.path.join(args.root, run.name)) else "to run"
            knobs = ", ".join(f"{k}={v:.4g}" for k, v in run.knobs) or "-"
            print(f"  {run.name:28s} {knobs:36s} paper ξ {run.xi_paper:.4f}  {state}")
        return 0
    os.makedirs(args.root, exist_ok=True)
    with open(os.path.join(args.root, "sweep_command.txt"), "a") as f:
        words = sys.argv[1:] if argv is None else list(argv)
        f.write(" ".join(["python -m adc_jax.sweep", *words]) + "\n")
    from adc_jax.runs import RunInterrupted

    try:
        status = run_grid(
            config, runs, args.root, evals=args.evals, log=lambda line: print(line, flush=True)
        )
    except RunInterrupted as e:  # SIGTERM / SIGINT: the run in progress saved a checkpoint
        print(f"{e} The same sweep command resumes the sweep.", flush=True)
        return e.exit_code
    counts = {s: list(status.values()).count(s) for s in sorted(set(status.values()))}
    print("sweep done: " + ", ".join(f"{n} {s}" for s, n in counts.items()), flush=True)
    return 1 if "failed" in status.values() else 0


if __name__ == "__main__":
    sys.exit(main())
