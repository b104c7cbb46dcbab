"""A run's workdir: its identity, when it resumes, divergence and stop signals (docs/runs.md).

A workdir holds one experiment. ``run.json`` records the experiment-defining part of the config
(every field but those in :data:`NOT_DEFINING`), its fingerprint and what one step sends. A later
command in the same workdir resumes only when its own fields match, or when every field that
differs is named in ``config.allow_changes`` and a step still sends the same bytes; anything else
is refused before the workdir is touched. ``diverged.json`` marks a run that stopped on
non-finite values: it is neither resumed nor summarised again.

:class:`StopSignals` turns SIGTERM (a preempted VM, a cluster scheduler) and SIGINT (Ctrl-C) into
a checkpoint at the next step boundary. :class:`RunError` is an error the user can fix: ``train.py``
prints its message, without a traceback unless ``--verbose`` or ``ADC_JAX_VERBOSE=1``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import ml_collections

RUN_FILE = "run.json"
DIVERGED_FILE = "diverged.json"

# Fields that cannot change what a run computes, only when or where it reports, saves or reads.
# Everything else defines the experiment (docs/runs.md says why each of these is left out).
NOT_DEFINING = (
    "progress",
    "log_every_steps",
    "eval_every_steps",
    "eval_batch_size",
    "checkpoint_every_steps",
    "budget.max_steps",
    "dataset.data_dir",
    "dataset.source_dir",
    "distributed",
    "allow_changes",
    "tensorboard",  # what is written beside metrics.jsonl, not what is computed
    "target_accuracy",  # only read when the summary reports the time to reach it
)


class RunError(Exception):
    """An error the user can fix; the message names the file or field and what to do."""


class WorkdirMismatch(RunError):
    """The workdir holds another experiment (or one this command cannot continue)."""


class CheckpointError(RunError):
    """A checkpoint cannot be read, does not fit this run, or cannot be written."""


class RunDiverged(RunError, FloatingPointError):
    """The loss, gradients or parameters stopped being finite; nothing non-finite was saved."""


class RunInterrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT stopped the run after a checkpoint; the same command resumes it.

    A ``KeyboardInterrupt``, so that code catching ``Exception`` (a sweep going on with its next
    run) stops too. ``exit_code`` is the shell's ``128 + signal``: 130 (SIGINT), 143 (SIGTERM).
    """

    def __init__(self, signum: int, step: int, workdir: str):
        self.signum, self.step, self.workdir = signum, step, workdir
        self.exit_code = 128 + signum
        super().__init__(
            f"Stopped by {signal.Signals(signum).name} after step {step}; its checkpoint is in "
            f"{os.path.join(workdir, 'checkpoints')}. Run the same command to resume."
        )


# ---- Identity -------------------------------------------------------------------------------


def identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The experiment-defining fields of ``config``: ``{"dotted.name": value}``, JSON values."""
    flat = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            name = prefix + key
            if isinstance(value, dict):
                walk(value, name + ".")
            elif name not in NOT_DEFINING:
                flat[name] = json.loads(json.dumps(value, default=repr))

    walk(config.copy_and_resolve_references().to_dict(), "")
    return flat


def fingerprint(config: ml_collections.ConfigDict) -> str:
    """SHA-256 (hex) of :func:`identity`: equal for configs that define the same experiment."""
    text = json.dumps(identity(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def allowed_changes(config: ml_collections.ConfigDict) -> list[str]:
    """``config.allow_changes`` as a list: fields (``optimizer.learning_rate``) or sections
    (``budget``, every field under it)."""
    names = str(config.get("allow_changes", "")).split(",")
    return [name.strip() for name in names if name.strip()]


def _is_allowed(field: str, allowed: list[str]) -> bool:
    return any(field == name or field.startswith(name + ".") for name in allowed)


def _differences(recorded: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple]:
    missing = "(not recorded)"
    return {
        name: (recorded.get(name, missing), current.get(name, missing))
        for name in sorted(set(recorded) | set(current))
        if recorded.get(name, missing) != current.get(name, missing)
    }


def _step_cost(cost) -> dict[str, float]:
    return {
        "bytes_up": cost.bytes_up,
        "bytes_down": cost.bytes_down,
        "samples_equivalent": cost.samples_equivalent,
    }


# ---- The workdir ------------------------------------------------------------------------------


def _read_json(path: str) -> Any:
    """The file's JSON, ``None`` if it does not exist; a RunError if it does not parse."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise RunError(
            f"{path} is not valid JSON ({e}): it was cut short or edited. Restore it, or use "
            "another --workdir."
        ) from None


def _write_json(path: str, value: Any) -> None:
    """Writes ``path`` whole or not at all (a temporary file renamed over it)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def has_checkpoint(workdir: str) -> bool:
    """Whether ``workdir/checkpoints`` holds a finished checkpoint (a directory named a step)."""
    try:
        return any(name.isdigit() for name in os.listdir(os.path.join(workdir, "checkpoints")))
    except FileNotFoundError:
        return False


def check_not_diverged(workdir: str) -> None:
    """Raises :class:`RunDiverged` when ``workdir`` holds a run marked by :func:`mark_diverged`."""
    diverged = _read_json(os.path.join(workdir, DIVERGED_FILE))
    if diverged is not None:
        raise RunDiverged(
            f"{workdir} holds a run that diverged. {diverged['message']} It is not resumed or "
            "summarised again. Start the changed experiment in another --workdir; or, to continue "
            "this one from its last (finite) checkpoint with new settings, delete "
            f"{os.path.join(workdir, DIVERGED_FILE)} and name the changed fields in "
            "--config.allow_changes (docs/runs.md)."
        )


def check_workdir(workdir: str, config: ml_collections.ConfigDict, cost) -> dict[str, Any]:
    """Refuses a workdir this config must not resume; returns the ``run.json`` to record.

    Reads only. Raises :class:`RunDiverged` for a diverged run, :class:`WorkdirMismatch` when
    the workdir's checkpoints belong to an experiment with other defining fields (unless each is
    allowed by ``config.allow_changes`` and a step still sends the same bytes). A workdir without
    a checkpoint has nothing to resume: it starts afresh whatever it held.
    """
    check_not_diverged(workdir)
    current = identity(config)
    record = {
        "fingerprint": fingerprint(config),
        "config": current,
        "step_cost": _step_cost(cost),
        "changes": [],
    }
    if not has_checkpoint(workdir):
        return record
    path = os.path.join(workdir, RUN_FILE)
    old = _read_json(path)
    if old is None:
        raise WorkdirMismatch(
            f"{workdir} holds checkpoints but no {RUN_FILE}: they were written by an older "
            "adc-jax or another program, and nothing says which experiment they belong to. Use "
            "another --workdir."
        )
    diffs = _differences(old["config"], current)
    allowed = allowed_changes(config)
    refused = [name for name in diffs if not _is_allowed(name, allowed)]
    if refused:
        lines = "\n".join(
            f"  {name}: {a!r} (in the workdir) -> {b!r} (now)"
            + ("" if name in refused else " (allowed)")
            for name, (a, b) in diffs.items()
        )
        raise WorkdirMismatch(
            f"{workdir} holds another experiment; these fields differ from its {RUN_FILE}:\n"
            f"{lines}\nResuming would mix two experiments. Use another --workdir (without one, "
            "every setting gets its own), or, to continue this run with the new values, "
            f"name them in --config.allow_changes (e.g. --config.allow_changes={','.join(refused)}"
            "); a longer budget is --config.allow_changes=budget."
        )
    if old["step_cost"] != record["step_cost"]:
        raise WorkdirMismatch(
            f"{workdir} holds a run whose steps send {_cost_text(old['step_cost'])}; with this "
            f"config a step sends {_cost_text(record['step_cost'])}. One run cannot count its "
            "bytes and budget under two settings: use another --workdir."
        )
    record["changes"] = old.get("changes", [])
    if diffs:
        record["changes"].append({"fields": {name: list(pair) for name, pair in diffs.items()}})
    return record


def _cost_text(cost: dict[str, float]) -> str:
    return (
        f"{cost['bytes_up']} bytes up, {cost['bytes_down']} bytes down and "
        f"{cost['samples_equivalent']:g} sample-equivalents"
    )


def record_run(
    workdir: str, record: dict[str, Any], config: ml_collections.ConfigDict, start: int
) -> None:
    """Writes ``run.json`` and ``config.json`` (process 0, once the run is accepted and its
    checkpoint, if any, restored at step ``start``)."""
    if record["changes"] and "step" not in record["changes"][-1]:
        record["changes"][-1]["step"] = start
    _write_json(os.path.join(workdir, RUN_FILE), record)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))


def drop_summary(workdir: str) -> None:
    """Removes ``summary.json``: a run with steps left (a longer budget) must not keep reporting
    the result of its earlier, shorter one."""
    try:
        os.remove(os.path.join(workdir, "summary.json"))
    except FileNotFoundError:
        pass


def mark_diverged(workdir: str, bad_step: int, seen_at: int, last_checkpoint: int) -> str:
    """Writes ``diverged.json``; returns the message that says what happened and what to do."""
    kept = (
        f"the last checkpoint (step {last_checkpoint}) is finite"
        if last_checkpoint
        else "no checkpoint was written"
    )
    message = (
        f"The loss, gradients or parameters were not finite at step {bad_step} (seen at step "
        f"{seen_at}); nothing from then on was saved, and {kept}."
    )
    record = {"bad_step": bad_step, "seen_at": seen_at, "last_checkpoint": last_checkpoint}
    _write_json(os.path.join(workdir, DIVERGED_FILE), {**record, "message": message})
    return message


# ---- Stop signals -----------------------------------------------------------------------------


class StopSignals:
    """SIGTERM and SIGINT ask the training loop to stop at the next step boundary.

    Use as a context manager around the loop and ask :meth:`requested` after every step. The first
    signal only sets :attr:`signum` and puts the previous handlers back, so a second Ctrl-C stops
    at once (the last checkpoint stays usable). Handlers can be installed from the main thread only;
    elsewhere signals keep their usual effect.

    Several processes must stop at the same step: there JAX's preemption service (which catches
    SIGTERM on any process) decides, through
    ``jax.experimental.multihost_utils.reached_preemption_sync_point``, and SIGINT keeps its usual
    effect.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, multiprocess: bool = False):
        self.multiprocess = multiprocess
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if not self.multiprocess and threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _handle(self, signum, frame) -> None:
        del frame
        self.signum = signum
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def requested(self, step: int) -> bool:
        """Whether to stop after ``step`` (every process gets the same answer)."""
        if self.multiprocess:
            from jax.experimental import multihost_utils

            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    self.signum = signal.SIGTERM
            except RuntimeError:  # jax_enable_preemption_service is off: SIGTERM just ends it
                self.multiprocess = False
        return self.signum is not None


# ---- Errors a user can fix ------------------------------------------------------------------


def is_disk_full(error: BaseException) -> bool:
    """An OSError ENOSPC, or an orbax/tensorstore error that carries one in its text."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    return "No space left on device" in str(error)


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message says what to do: config and data (ValueError, the dataset not
    prepared), files and disks (OSError), and :class:`RunError`."""
    from adc_jax.data import DatasetNotPreparedError

    return (RunError, ValueError, OSError, DatasetNotPreparedError)


def run_command(fn: Callable[[], Any]) -> int:
    """Calls ``fn`` as ``train.py`` does and returns the process's exit code.

    0 when it returns; 1 after printing one paragraph on stderr for an error a user can fix (the
    traceback instead when :func:`verbose`); 130 or 143 after a stop by SIGINT or SIGTERM (the
    checkpoint is saved). Any other error is a bug and propagates with its traceback.
    """
    quiet = _QuietOrbaxErrors()
    if not verbose():
        logging.getLogger("absl").addFilter(quiet)
    try:
        fn()
    except RunInterrupted as e:
        print(e, file=sys.stderr)
        return e.exit_code
    except user_errors() as e:
        if verbose():
            raise
        print(f"error: {explain(e)}", file=sys.stderr)
        return 1
    finally:
        logging.getLogger("absl").removeFilter(quiet)
    return 0


class _QuietOrbaxErrors(logging.Filter):
    """Drops orbax's error logs: a failed checkpoint write logs its error with a traceback from
    each of orbax's background threads, and the exception raised in the main thread (printed as
    one paragraph) says the same."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR or "orbax" not in record.pathname


def verbose() -> bool:
    """``ADC_JAX_VERBOSE=1``: show tracebacks of errors a user can fix (``train.py --verbose``)."""
    return os.environ.get("ADC_JAX_VERBOSE", "") not in ("", "0")


def explain(error: BaseException) -> str:
    """One paragraph for an error a user can fix (see ``train.py``)."""
    if is_disk_full(error) and not isinstance(error, RunError):
        where = getattr(error, "filename", None) or "the workdir"
        text = (
            f"No space left on the device while writing {where}. Free some space (or give another "
            "--workdir on a larger disk) and run the same command again: the run resumes from "
            "its last complete checkpoint."
        )
    elif isinstance(error, OSError) and error.filename:
        text = f"{error.strerror or error}: {error.filename}."
    else:
        text = str(error).strip() or type(error).__name__
    return f"{text}\n(--verbose or ADC_JAX_VERBOSE=1 shows the traceback.)"


# ---- Test hook --------------------------------------------------------------------------------


def fault_point(where: str, step: int, before: Callable[[], Any] | None = None) -> None:
    """``ADC_JAX_TEST_KILL=<where>:<step>`` makes this process SIGKILL itself here.

    For the fault-injection test (tests/test_runs.py): ``step:<n>`` after step ``n`` was
    dispatched and handled, ``save:<n>`` while the checkpoint of step ``n`` is being written,
    ``saved:<n>`` once it is complete (``before`` waits for it). Unset: nothing happens.
    """
    if os.environ.get("ADC_JAX_TEST_KILL") == f"{where}:{step}":
        if before is not None:
            before()
        os.kill(os.getpid(), signal.SIGKILL)
