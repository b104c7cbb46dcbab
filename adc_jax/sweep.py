r"""Sweeps: a grid of methods × compression ratios ξ × seeds, one workdir per run, and its plots.

    python -m adc_jax.sweep run --config configs/vit_fashion_mnist.py \
        --config.budget.base_epochs=1 --methods base,adc,c3sl,topk,randtopk,bottlenet,quantize \
        --xi 0.1,0.25,0.5 --seeds 0 --root runs/sweep_fmnist [--dry_run]
    python -m adc_jax.sweep run --config configs/deit_t_cifar100.py --preset paper \
        --seeds 0,1,2 --root runs/deit_t_cifar100
    python -m adc_jax.sweep plot --root runs/sweep_fmnist --out docs/fashion_mnist_sweep

The config and its ``--config.x=...`` overrides work exactly as for ``train.py``. Every run lives
in ``<root>/<name>`` and is an ordinary :func:`adc_jax.train.train_and_evaluate` workdir plus a
``sweep.json`` that records the method, its knob, the target ξ and the paper-compatible ξ the
knob achieves. A run whose ``summary.json`` exists is skipped; any other is (re)started, and
``train_and_evaluate`` resumes it from its last checkpoint by itself. So an interrupted sweep
continues when the same command is given again, and several copies of the command (one per core
or machine sharing the root) split the grid between them: each run is claimed with a lock file.

Two kinds of grid:

* **ξ targets** (``--xi``): each method's knob is solved from the target by the method's own
  rule (:meth:`adc_jax.methods.Method.knobs_for_xi`, the inverse of its ``xi_paper``); runs are
  named ``<method>-xi<ξ>-s<seed>``. A method that cannot reach a target (FedLite below 0.5) is
  left out with the reason.
* **The authors' grids** (``--preset paper``): the knob values the paper's authors swept
  (:data:`adc_jax.paper.GRIDS`: C3-SL's R ∈ {2, 4, 8, 16, 32}, Top-K's rate ∈ {0.01 … 0.5}, …);
  runs are named ``<method>-<knob><value>-s<seed>`` and plotted at the ξ their knob achieves.

Base runs once per seed (``base-xi1-s<seed>``). Runs go in the order Base, ADC, then the
baselines, each by decreasing ξ (the cheapest runs first: fewer steps under the paper's budget),
so a sweep cut short is missing the baselines' most expensive corner, not the method under study
or a whole ξ. ``--evals N`` (default 10) spreads N test evaluations over each run, for the
accuracy-vs-bytes curves; the config's own schedule evaluates once per epoch-equivalent only.
"""

from __future__ import annotations

import dataclasses
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

from adc_jax import paper
from adc_jax.methods import METHODS, CutShape, Unreachable, method_from_config

BASE_XI = 1.0
RUN_FILE = "sweep.json"  # what the sweep records in each run's workdir
LOCK_FILE = "sweep.lock"
PRESETS = {"paper": paper.GRIDS}


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
    return METHODS[method].knobs_for_xi(xi, cut)


def paper_xi(method: str, knobs: dict[str, Any], cut: CutShape) -> float:
    """The paper-compatible ξ of ``method`` with ``knobs`` on ``cut``."""
    cfg = ml_collections.ConfigDict({"name": method, **knobs})
    return float(method_from_config(cfg).xi_paper(cut))


def cut_shape(config: ml_collections.ConfigDict) -> CutShape:
    """What one client sends per step under ``config`` (the knobs depend on B, N, D)."""
    from adc_jax import train, vit

    model = vit.get_model_config(config.model.name)
    clients = 1
    if config.devices.per_client:
        clients = len(train.select_devices(config))
    info = train.dataset_info(config)
    dtype = train.compute_dtype(config.model.dtype)
    return CutShape(
        config.batch_size // clients, model.seq_len, model.width, info.num_classes, dtype
    )


# ---- The grid -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
    """One cell of the grid."""

    method: str
    xi_target: float  # the ξ the run is plotted at (its knob's paper ξ for a preset grid)
    seed: int
    knobs: tuple[tuple[str, Any], ...]  # config.method overrides, sorted
    xi_paper: float  # what the knobs achieve (paper-compatible)
    tag: str = ""  # the name's middle part; default xi<ξ target>
    overrides: tuple[tuple[str, Any], ...] = ()  # other config fields, as (dotted name, value)

    @property
    def name(self) -> str:
        return run_name(self.method, self.xi_target, self.seed, self.tag)

    def config(self, base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """``base`` with this run's method, knobs, seed and other overrides."""
        config = base.copy_and_resolve_references()
        config.method.name = self.method
        config.seed = self.seed
        for key, value in self.knobs:
            config.method[key] = value
        config.update_from_flattened_dict(dict(self.overrides))
        return config


def run_name(method: str, xi: float, seed: int, tag: str = "") -> str:
    """``<method>-<tag>-s<seed>``, the tag defaulting to ``xi<ξ>`` (ξ as ``%g``: 0.1, 0.25)."""
    return f"{method}-{tag or f'xi{xi:g}'}-s{seed}"


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A grid cell left out, and why."""

    method: str
    xi_target: float
    reason: str


def _check_methods(methods: Sequence[str]) -> None:
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"Unknown methods {unknown}; expected some of {sorted(METHODS)}.")


def _ordered(cells: list[tuple[str, float, dict, str]]) -> list[tuple[str, float, dict, str]]:
    """Base, ADC, then the baselines, each by decreasing ξ."""
    rank = lambda m: 0 if m == "base" else 1 if m == "adc" else 2
    return sorted(cells, key=lambda c: (rank(c[0]), -c[1]))


def _runs(cells, seeds, cut) -> list[Run]:
    return [
        Run(method, xi, seed, tuple(sorted(knobs.items())), paper_xi(method, knobs, cut), tag)
        for method, xi, knobs, tag in _ordered(cells)
        for seed in seeds
    ]


def plan_grid(
    config: ml_collections.ConfigDict,
    methods: Sequence[str],
    xis: Sequence[float],
    seeds: Sequence[int],
) -> tuple[list[Run], list[Skipped]]:
    """The runs of a grid of ξ targets (Base, ADC, then the baselines, each by decreasing ξ)
    and the cells left out."""
    _check_methods(methods)
    cut = cut_shape(config)
    cells = [("base", BASE_XI, {}, "")] if "base" in methods else []
    skipped = []
    for method in (m for m in methods if m != "base"):
        for xi in sorted(set(xis), reverse=True):
            try:
                cells.append((method, xi, method_knobs(method, xi, cut), ""))
            except Unreachable as e:
                skipped.append(Skipped(method, xi, str(e)))
    return _runs(cells, seeds, cut), skipped


def plan_preset(
    config: ml_collections.ConfigDict,
    preset: str,
    seeds: Sequence[int],
    methods: Sequence[str] | None = None,
) -> tuple[list[Run], list[Skipped]]:
    """The runs of a preset's knob grids (default: Base and every method the preset has)."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; expected one of {sorted(PRESETS)}.")
    grids = PRESETS[preset]
    methods = list(methods) if methods else ["base", *grids]
    _check_methods(methods)
    cut = cut_shape(config)
    cells = [("base", BASE_XI, {}, "")] if "base" in methods else []
    skipped = []
    for method in (m for m in methods if m != "base"):
        if method not in grids:
            skipped.append(Skipped(method, math.nan, f"the {preset} preset has no {method} grid"))
            continue
        field, values = grids[method]
        for value in values:
            knobs = {field: value}
            cells.append((method, paper_xi(method, knobs, cut), knobs, f"{field}{value:g}"))
    return _runs(cells, seeds, cut), skipped


# ---- Running ------------------------------------------------------------------------------


def with_evals(config: ml_collections.ConfigDict, evals: int) -> ml_collections.ConfigDict:
    """``config`` evaluating about ``evals`` times over its run (for accuracy-vs-bytes curves).

    By default a run evaluates once per epoch-equivalent of its budget, so a 1-epoch budget gives
    one point per run. Left as it is when ``evals`` is 0 or ``eval_every_steps`` is set.
    """
    if evals <= 0 or config.eval_every_steps > 0:
        return config
    from adc_jax import train
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
    total = train.plan_steps(config, cost, train.dataset_info(config).train_size)
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
                    {
                        **dataclasses.asdict(run),
                        "knobs": dict(run.knobs),
                        "overrides": dict(run.overrides),
                        "name": run.name,
                    },
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
            except Exception as e:  # noqa: BLE001 -- one bad cell must not end the sweep
                with open(os.path.join(workdir, "error.txt"), "w") as f:
                    f.write(traceback.format_exc())
                log(
                    f"{tag}: FAILED after {time.time() - start:.0f} s: {type(e).__name__}: {e} "
                    f"(traceback in {workdir}/error.txt)"
                )
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


# ---- Command line ---------------------------------------------------------------------------


def _define_flags(fv, argv: list[str]):
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config",
        None,
        "Experiment config file (as for train.py).",
        flag_values=fv,
        lock_config=True,
        sys_argv=argv,  # where it finds the --config.x overrides to define
    )
    flags.DEFINE_list(
        "methods", None, "Methods (default: base,adc; with --preset, all).", flag_values=fv
    )
    flags.DEFINE_list("xi", ["0.1", "0.25", "0.5"], "Target ξ values.", flag_values=fv)
    flags.DEFINE_list("seeds", ["0"], "Seeds.", flag_values=fv)
    flags.DEFINE_enum(
        "preset", None, sorted(PRESETS), "Knob grids instead of --xi.", flag_values=fv
    )
    flags.DEFINE_string("root", None, "One workdir per run under this directory.", flag_values=fv)
    flags.DEFINE_integer(
        "evals",
        10,
        "Test evaluations per run, evenly spaced (0: the config's schedule, one per "
        "epoch-equivalent of the budget); ignored when eval_every_steps is set.",
        flag_values=fv,
    )
    flags.DEFINE_bool("dry_run", False, "List the grid and exit.", flag_values=fv)
    flags.DEFINE_string(
        "out", None, "plot: output prefix, e.g. docs/fashion_mnist_sweep.", flag_values=fv
    )
    flags.DEFINE_list(
        "bytes_runs",
        None,
        "plot: groups for the bytes figure, as method or method-xi<ξ> (default: base,adc).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "note", "", "plot: text for the tables, e.g. the machine used.", flag_values=fv
    )


def _message(error: BaseException) -> str:
    """The innermost message of an error that wraps another (AttributeError(KeyError(...)))."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return str(text)


USAGE = """usage: python -m adc_jax.sweep run --config FILE[:arg] [--config.x=...] --root DIR
           [--methods m,...] [--xi 0.1,...] [--preset paper] [--seeds 0,...] [--evals N]
           [--dry_run]
       python -m adc_jax.sweep plot --root DIR --out PREFIX [--bytes_runs ...] [--note ...]"""


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m adc_jax.sweep {run, plot} ...`` (see the module docstring)."""
    from absl import flags

    words = list(sys.argv[1:] if argv is None else argv)
    fv = flags.FlagValues()
    _define_flags(fv, ["adc_jax.sweep", *words])
    try:
        command = fv(["adc_jax.sweep", *words])[1:]
        if command not in (["run"], ["plot"]):
            raise flags.Error(f"expected one command, run or plot; got {command or 'none'}")
        if fv.root is None or (command == ["run"] and fv.config is None):
            raise flags.Error("run needs --config and --root; plot needs --root and --out")
        if command == ["plot"] and fv.out is None:
            raise flags.Error("plot needs --out")
        config = fv.config
        if command == ["run"]:
            config.method  # noqa: B018 -- a config file that failed to load raises here
    except (flags.Error, AttributeError, KeyError, ValueError, OSError) as e:
        # A misspelt --config.x (ml_collections says "did you mean"), a bad value or config
        # argument, a missing config file: one message, not a traceback.
        print(f"{_message(e)}\n{USAGE}", file=sys.stderr)
        return 2

    if command == ["plot"]:
        from adc_jax import plots

        written = plots.plot_sweep(fv.root, fv.out, bytes_runs=fv.bytes_runs, note=fv.note)
        for path in written:
            print(path)
        return 0

    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    seeds = [int(s) for s in fv.seeds]
    if fv.preset:
        runs, skipped = plan_preset(config, fv.preset, seeds, fv.methods)
    else:
        xis = [float(x) for x in fv.xi]
        runs, skipped = plan_grid(config, fv.methods or ["base", "adc"], xis, seeds)
    for cell in skipped:
        print(f"left out: {cell.method} at ξ {cell.xi_target:g}: {cell.reason}")
    if fv.dry_run:
        print(f"{len(runs)} runs under {fv.root}:")
        for run in runs:
            state = "finished" if is_finished(os.path.join(fv.root, run.name)) else "to run"
            knobs = ", ".join(f"{k}={v:.4g}" for k, v in run.knobs) or "-"
            print(f"  {run.name:28s} {knobs:36s} paper ξ {run.xi_paper:.4f}  {state}")
        return 0
    os.makedirs(fv.root, exist_ok=True)
    with open(os.path.join(fv.root, "sweep_command.txt"), "a") as f:
        f.write(" ".join(["python -m adc_jax.sweep", *words]) + "\n")
    from adc_jax.runs import RunInterrupted

    try:
        status = run_grid(
            config, runs, fv.root, evals=fv.evals, log=lambda line: print(line, flush=True)
        )
    except RunInterrupted as e:  # SIGTERM / SIGINT: the run in progress saved a checkpoint
        print(f"{e} The same sweep command resumes the sweep.", flush=True)
        return e.exit_code
    counts = {s: list(status.values()).count(s) for s in sorted(set(status.values()))}
    print("sweep done: " + ", ".join(f"{n} {s}" for s, n in counts.items()), flush=True)
    return 1 if "failed" in status.values() else 0


if __name__ == "__main__":
    sys.exit(main())
