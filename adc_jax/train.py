"""The training loop: budget, evaluation, checkpoints, metrics, progress.

The protocol and the budget are those of docs/method.md §1 and §3 (the paper's settings:
docs/paper_protocol.md).

``train_and_evaluate(config, workdir)`` runs one experiment and returns its summary. Everything
it writes lands in ``workdir``:

* ``config.json`` – the config as run;
* ``run.json`` – the run's identity: its experiment-defining fields and their fingerprint (see
  :mod:`adc_jax.runs` and docs/runs.md: a workdir holds one experiment);
* ``metrics.jsonl`` – one JSON object per logged step (``step``, ``loss``, ``samples_equivalent``,
  ``bytes_up``, ``bytes_down``, ``steps_per_second``, ``images_per_second``, …) and per evaluation
  (``test_accuracy``, ``wall_seconds`` since the process started);
* ``summary.json`` – the final test accuracy, steps, bytes per direction, nominal and measured
  ξ, compute dtype, images/s, time to ``target_accuracy``, wall time, devices and versions;
* ``checkpoints/`` – orbax checkpoints of finite states only; a restarted command resumes from
  the newest by itself, and SIGTERM or SIGINT writes one at the next step boundary;
* ``diverged.json`` – only when the loss, gradients or parameters stopped being finite.

Durations are converted to steps once, by :func:`plan_steps`; the loop reads metrics back from
the device only on log steps, one step late, so the host never waits on the step in flight. The
step programs mark the first non-finite step on the device (``TrainState.bad_step``); the loop
reads it with the metrics and before every evaluation and checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from adc_jax import accelerator, runs, split, tensorboard_writer, vit
from adc_jax import data as data_lib
from adc_jax.augment import eval_preprocess, train_augment
from adc_jax.link import Channel
from adc_jax.methods import CutShape, StepCost, method_from_config, step_cost

# ---- Steps from the budget ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Every duration of a run, in steps."""

    total_steps: int
    eval_every: int
    log_every: int
    checkpoint_every: int
    steps_per_epoch_equivalent: int  # steps that consume one epoch of Base's budget


def plan_steps(config: ml_collections.ConfigDict, cost: StepCost, train_size: int) -> Schedule:
    """Converts the budget (paper sample-equivalents, bytes or steps) into a step count.

    Paper protocol: each step consumes ``ξ·B`` sample-equivalents and training stops before the
    total exceeds ``budget.base_epochs`` epochs of Base (``base_epochs · train_size``), so
    ``steps = floor(base_epochs · train_size / (ξ·B))``: ξ = 0.1 buys 10× the steps of Base.
    ``budget.max_epochs`` caps the steps at that many passes over the training data (each of
    ``train_size // B`` full batches), ``budget.max_steps`` at a step count.
    """
    budget = config.budget
    per_epoch = max(1, math.floor(train_size / cost.samples_equivalent))
    if budget.steps > 0:
        total = int(budget.steps)
    elif budget.bytes > 0:
        total = math.floor(budget.bytes / (cost.bytes_up + cost.bytes_down))
    else:
        if budget.base_epochs <= 0:
            raise ValueError("Set budget.base_epochs, budget.bytes or budget.steps above 0.")
        total = math.floor(budget.base_epochs * train_size / cost.samples_equivalent)
    if budget.max_epochs > 0:
        total = min(total, math.floor(budget.max_epochs * (train_size // config.batch_size)))
    if budget.max_steps > 0:
        total = min(total, int(budget.max_steps))
    if total < 1:
        raise ValueError(f"The budget allows no training step ({budget}).")
    every = lambda n: max(1, min(int(n), total))
    return Schedule(
        total_steps=total,
        eval_every=every(config.eval_every_steps or per_epoch),
        log_every=every(config.log_every_steps),
        checkpoint_every=every(config.checkpoint_every_steps),
        steps_per_epoch_equivalent=per_epoch,
    )


# ---- Setup ------------------------------------------------------------------------------------


def channel_from_config(cfg: ml_collections.ConfigDict) -> Channel:
    return Channel(
        kind=cfg.kind, bits=cfg.bits, snr_min_db=cfg.snr_min_db, snr_max_db=cfg.snr_max_db
    )


def select_devices(config: ml_collections.ConfigDict) -> list[jax.Device]:
    devices = jax.local_devices()
    if jax.process_count() > 1 and config.devices.count:
        raise ValueError("devices.count must be 0 (all devices) when several processes run.")
    count = config.devices.count or len(devices)
    if count > len(devices):
        raise ValueError(f"devices.count ({count}) exceeds the local devices ({len(devices)}).")
    devices = devices[:count]
    per_process = config.batch_size // jax.process_count()
    if config.batch_size % jax.process_count() or per_process % len(devices):
        raise ValueError(
            f"Batch size ({config.batch_size}) must be divisible by the number of devices "
            f"({len(devices) * jax.process_count()}); change batch_size or devices.count."
        )
    return devices


COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str, platform: str | None = None):
    """``model.dtype`` as a dtype. ``"auto"``: bfloat16 on a GPU or TPU (their matrix units run
    it at several times float32's rate), float32 on a CPU (where bfloat16 made our step slower);
    ``platform`` defaults to JAX's default backend."""
    if name == "auto":
        return jnp.float32 if (platform or jax.default_backend()) == "cpu" else jnp.bfloat16
    if name not in COMPUTE_DTYPES:
        raise ValueError(
            f"model.dtype must be auto, float32 or bfloat16, not {name!r} "
            "(e.g. --config.model.dtype=float32)."
        )
    return COMPUTE_DTYPES[name]


def build_model(config: ml_collections.ConfigDict, num_classes: int, image_size: int, key):
    """The split ViT and its parameters (pretrained when ``model.pretrained`` is set).

    The compute dtype is resolved here, once (:func:`compute_dtype`); the model carries it.
    """
    dtype = compute_dtype(config.model.dtype)
    if config.model.pretrained:
        from adc_jax import pretrained

        model, params = pretrained.load_timm(
            config.model.pretrained,
            model_name=config.model.name,
            split_index=config.model.split_index,
            num_classes=num_classes,
            key=key,
            image_size=image_size,
            dtype=dtype,
            fresh_head=config.model.fresh_head,
        )
        return dataclasses.replace(model, attention=config.model.attention), params
    model = vit.make_model(
        config.model.name,
        split_index=config.model.split_index,
        num_classes=num_classes,
        dtype=dtype,
        attention=config.model.attention,
    )
    return model, model.init(key)


@dataclasses.dataclass
class Experiment:
    """Everything :func:`train_and_evaluate` builds before the first step."""

    config: ml_collections.ConfigDict
    info: Any
    model: vit.SplitViT
    protocol: split.Protocol
    programs: split.Programs
    devices: list
    cost: StepCost
    schedule: Schedule
    initial_state: split.TrainState
    test_source: Any


def setup(config: ml_collections.ConfigDict, *, open_test: bool = True) -> Experiment:
    """Validates the config and builds model, method, protocol, programs and the schedule.

    ``open_test=False`` leaves ``test_source`` None (a split-learning server holds no data).
    """
    if config.distributed:
        initialize_distributed()
    accelerator.warn_if_cpu_fallback()  # after distributed init: it starts JAX's backends
    info = dataset_info(config)
    test_source = open_data(config, "test") if open_test else None
    method = method_from_config(config.method)
    devices = select_devices(config)
    key = jax.random.key(config.seed)
    model_key, state_key = jax.random.split(key)
    model_cfg = vit.get_model_config(config.model.name)
    model, params = build_model(config, info.num_classes, model_cfg.image_size, model_key)
    channels, image_channels = model.config.in_chans, info.image_shape[-1]
    if channels != image_channels and not (channels == 3 and image_channels == 1):
        raise ValueError(
            f"Model {config.model.name} takes {channels}-channel images; "
            f"{config.dataset.name} has {image_channels}."
        )
    # Grey images are tiled to RGB for an RGB model.
    norm = dict(
        image_size=model.config.image_size,
        mean=model.config.mean,
        std=model.config.std,
        to_rgb=channels != image_channels,
    )

    def preprocess(images, key):
        if config.dataset.augment:
            return train_augment(images, key, **norm)
        return eval_preprocess(images, **norm)

    tx = optax.adam(config.optimizer.learning_rate, eps=config.optimizer.eps)
    protocol = split.Protocol(
        client_apply=model.apply_client,
        server_apply=model.apply_server,
        method=method,
        num_classes=info.num_classes,
        client_tx=tx,
        server_tx=tx,
        uplink=channel_from_config(config.link.uplink),
        downlink=channel_from_config(config.link.downlink),
        preprocess=preprocess,
        eval_preprocess=lambda images: eval_preprocess(images, **norm),
        per_client=config.devices.per_client,
    )
    # What one client sees: the global batch, or one device's share of it.
    clients = len(devices) * jax.process_count() if config.devices.per_client else 1
    cut = CutShape(
        config.batch_size // clients, model.seq_len, model.width, info.num_classes, model.dtype
    )
    method.validate(cut)
    method.validate_device_batch(config.batch_size // jax.process_count() // len(devices))
    cost = step_cost(method, cut, protocol.uplink, protocol.downlink, clients=clients)
    schedule = plan_steps(config, cost, info.train_size)
    state = split.init_state(protocol, state_key, params["client"], params["server"], cut)
    return Experiment(
        config=config,
        info=info,
        model=model,
        protocol=protocol,
        # Several processes: map over every device of every process (each feeds its own).
        programs=split.pmap_programs(protocol, devices if jax.process_count() == 1 else None),
        devices=devices,
        cost=cost,
        schedule=schedule,
        initial_state=state,
        test_source=test_source,
    )


def open_data(config: ml_collections.ConfigDict, split_name: str):
    """Opens a split (only ``dataset.classes`` when set, and the first ``dataset.train_examples``
    of the training split when set), preparing the dataset first from local raw files when it
    can."""
    name, data_dir = config.dataset.name, config.dataset.data_dir or None
    spec = data_lib.dataset_info(name)
    if config.dataset.source_dir and not data_lib.is_prepared(name, data_dir):
        if not spec.source_args:
            raise ValueError(f"{name} cannot be prepared from dataset.source_dir.")
        data_lib.prepare(name, data_dir, **{spec.source_args[0]: config.dataset.source_dir})
    data_lib.prepare_if_local(name, data_dir)
    source = data_lib.open_split(name, split_name, data_dir)
    classes = data_lib.parse_classes(config.dataset.classes)
    if classes:
        source = data_lib.class_subset(source, classes, spec.num_classes)
    limit = config.dataset.train_examples
    if split_name == "train" and 0 < limit < len(source):
        source = data_lib.Subset(source, np.arange(limit))
    return source


def dataset_info(config: ml_collections.ConfigDict) -> data_lib.DatasetSpec:
    """The dataset's :class:`~adc_jax.data.DatasetSpec`; with ``dataset.classes`` or
    ``dataset.train_examples``, the class count and split sizes of what is used (read from the
    data)."""
    info = data_lib.dataset_info(config.dataset.name)
    classes = data_lib.parse_classes(config.dataset.classes)
    if not classes and not 0 < config.dataset.train_examples < info.train_size:
        return info
    sizes = {split: len(open_data(config, split)) for split in ("train", "test")}
    return dataclasses.replace(
        info,
        num_classes=len(classes) or info.num_classes,
        train_size=sizes["train"],
        test_size=sizes["test"],
    )


def initialize_distributed() -> None:
    """``jax.distributed.initialize()``, from the cluster's environment (TPU pods, SLURM, …).

    Without a cluster manager (e.g. several processes on one machine), set
    ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``ADC_NUM_PROCESSES`` and
    ``ADC_PROCESS_ID``. CPU processes exchange collectives through gloo.
    """
    if jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if "ADC_NUM_PROCESSES" in os.environ:
        kwargs["num_processes"] = int(os.environ["ADC_NUM_PROCESSES"])
        kwargs["process_id"] = int(os.environ["ADC_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)


def default_workdir(config_path: str, config: ml_collections.ConfigDict) -> str:
    """``runs/<config file>-<method>[-xi<ξ>]-s<seed>-<fingerprint>``.

    The readable part names the usual knobs; the first 8 hex digits of the config's fingerprint
    (:func:`adc_jax.runs.fingerprint`) tell apart runs that differ in any other defining field.
    """
    name = os.path.splitext(os.path.basename(config_path))[0]
    tag = config.method.name + (f"-xi{config.method.xi:g}" if config.method.name == "adc" else "")
    return os.path.join("runs", f"{name}-{tag}-s{config.seed}-{runs.fingerprint(config)[:8]}")


# ---- Checkpoints ------------------------------------------------------------------------------


class Checkpoints:
    """Orbax checkpoints of the train state in ``workdir/checkpoints``.

    Orbax writes each one into a temporary directory and renames it when complete, so a process
    killed while saving leaves the previous checkpoint as the newest. Errors come out as
    :class:`adc_jax.runs.CheckpointError` naming the directory and what to do.
    """

    def __init__(self, workdir: str, every: int):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=every),
            item_handlers=ocp.StandardCheckpointHandler(),  # lets item_metadata read shapes
        )
        self._saving: int | None = None  # the step whose write may still be in flight
        self._closed = False
        _quiet_leftover_callbacks()

    def restore(self, target: split.TrainState) -> split.TrainState | None:
        """The newest checkpoint as ``target``'s pytree, or None when there is none.

        Raises a CheckpointError when it cannot be read (naming the previous checkpoint, if that
        one reads), when its arrays do not match ``target``'s names, shapes and dtypes, or when
        it holds non-finite values.
        """
        step = self._manager.latest_step()
        if step is None:
            return None
        try:
            stored = self._manager.item_metadata(step)
        except Exception as e:  # noqa: BLE001 -- any failure to read means a damaged checkpoint
            raise self._damaged(step, e, target) from None
        self._check_fits(step, stored, target)
        try:
            restored = self._read(step, target)
        except Exception as e:  # noqa: BLE001
            raise self._damaged(step, e, target) from None
        bad = [name for name, x in _named_leaves(restored).items() if not np.isfinite(x).all()]
        if bad:
            raise runs.CheckpointError(
                f"The checkpoint of step {step} ({self._path(step)}) holds non-finite values "
                f"({', '.join(bad[:3])}{', …' if len(bad) > 3 else ''}): the run it belongs to "
                "diverged before divergence was checked at every step. Start again in another "
                "--workdir (with a lower optimizer.learning_rate)."
            )
        return restored

    def _read(self, step: int, target: split.TrainState) -> split.TrainState:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target)
        restored = self._manager.restore(step, args=self._ocp.args.StandardRestore(abstract))
        return jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(restored))

    def _path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _check_fits(self, step: int, stored, target: split.TrainState) -> None:
        """Lists missing, unexpected and mismatched arrays instead of orbax's tracebacks."""
        spec = lambda x: f"{np.dtype(x.dtype).name}{list(np.shape(x))}"  # float32[32, 10]
        have = {x.name: spec(x) for x in jax.tree.leaves(stored)}
        want = {name: spec(x) for name, x in _named_leaves(target).items()}
        problems = []
        for label, names in (
            ("missing", sorted(set(want) - set(have))),
            ("unexpected", sorted(set(have) - set(want))),
        ):
            if names:
                more = f" and {len(names) - 3} more" if len(names) > 3 else ""
                problems.append(f"{label}: {', '.join(names[:3])}{more}")
        changed = [name for name in sorted(set(have) & set(want)) if have[name] != want[name]]
        for name in changed[:3]:
            problems.append(f"{name} is {have[name]} in the file, {want[name]} now")
        if problems:
            raise runs.CheckpointError(
                f"The checkpoint of step {step} ({self._path(step)}) does not fit this run's "
                f"state ({'; '.join(problems)}). It was written for another model, split or "
                "method, or by another version of adc-jax. Use another --workdir."
            )

    def _damaged(self, step: int, error: Exception, target) -> runs.CheckpointError:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        reason = reason if len(reason) <= 300 else reason[:300] + " …"
        earlier = [s for s in sorted(self._manager.all_steps(), reverse=True) if s < step]
        offer = "No earlier checkpoint is kept: start again in another --workdir."
        for previous in earlier:
            try:
                self._read(previous, target)
            except Exception:  # noqa: BLE001, S112 -- try the next older one
                continue
            damaged = os.path.join(os.path.dirname(self.directory), f"damaged-checkpoint-{step}")
            offer = (
                f"The previous checkpoint, step {previous}, reads fine: to resume from it, move "
                f"the damaged one aside (mv {self._path(step)} {damaged}) and run the same "
                "command again."
            )
            break
        return runs.CheckpointError(
            f"The newest checkpoint, step {step} ({self._path(step)}), cannot be read: {reason}. "
            "It was damaged after it was written (a copy cut short, a full or failing disk); a "
            f"process killed while saving leaves no such checkpoint. {offer}"
        )

    def save(self, step: int, host_state: split.TrainState) -> None:
        """Starts writing ``host_state`` (already on the host and checked finite)."""
        try:
            self._manager.save(step, args=self._ocp.args.StandardSave(host_state), force=True)
        except Exception as e:  # noqa: BLE001 -- the previous write may have failed, or this one
            raise self._write_error(e) from None
        self._saving = step
        runs.fault_point("save", step)
        runs.fault_point("saved", step, before=self._manager.wait_until_finished)

    def _write_error(self, error: Exception) -> runs.CheckpointError:
        step = f"step {self._saving} or later" if self._saving is not None else "a step"
        if runs.is_disk_full(error):
            return runs.CheckpointError(
                f"No space left on the device while writing the checkpoint of {step} in "
                f"{self.directory}. Free some space (or give another --workdir on a larger disk) "
                "and run the same command again: the run resumes from its last complete checkpoint."
            )
        reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        return runs.CheckpointError(
            f"Could not write the checkpoint of {step} in {self.directory}: {reason}. The "
            "previous checkpoint is kept; fix the cause and run the same command again."
        )

    def close(self, *, raise_errors: bool = True) -> None:
        """Waits for the write in flight (once); ``raise_errors=False`` when already failing."""
        if self._closed:
            return
        self._closed = True
        try:
            self._manager.wait_until_finished()
            self._manager.close()
        except Exception as e:  # noqa: BLE001
            if raise_errors:
                raise self._write_error(e) from None


def _quiet_leftover_callbacks() -> None:
    """Drops the "Event loop is closed" errors of a failed orbax read or write (process-wide).

    Orbax gives up at the first array that fails and closes its event loop; tensorstore then
    completes the other arrays' reads or writes and each callback raises into the closed loop:
    one traceback per array (172 for the tiny test model) through ``sys.unraisablehook``, in
    background threads, around the one error that matters (which orbax raises). Nothing else
    raises this error into that hook.
    """
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_errors", False):
        return

    def hook(unraisable):
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_loop_errors = True
    sys.unraisablehook = hook


def _named_leaves(tree) -> dict[str, Any]:
    """``{"client.params.model.…": leaf}``: the names orbax gives the arrays of a saved pytree."""

    def name(path) -> str:
        return ".".join(
            str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path
        )

    return {name(path): x for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ---- The loop ---------------------------------------------------------------------------------


class MetricsWriter:
    """JSON lines in ``metrics.jsonl``; only process 0 writes.

    A run resumed from step ``start`` first drops the rows of steps after ``start``: they were
    written by the interrupted process after its last checkpoint and the resumed run writes
    its own, so the file holds one trajectory. ``tensorboard``: every row also goes to
    TensorBoard event files beside it when tensorboardX is installed
    (:mod:`adc_jax.tensorboard_writer`).
    """

    def __init__(self, workdir: str, start: int = 0, tensorboard: bool = False):
        self._file = None
        self._events = None
        if jax.process_index() == 0:
            if tensorboard:
                self._events = tensorboard_writer.open_writer(workdir, start)
            path = os.path.join(workdir, "metrics.jsonl")
            kept = []
            if os.path.exists(path):
                with open(path) as f:
                    kept = [line for line in f if _row_step(line) <= start]
            with open(path, "w") as f:
                f.writelines(kept)
            self._file = open(path, "a")  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._events is not None:
            self._events.write(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._events is not None:
            self._events.close()


def _row_step(line: str) -> float:
    """The step of a ``metrics.jsonl`` line; a torn last line (killed mid-write) counts as after."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _to_python(metrics) -> dict[str, float]:
    return {k: float(np.asarray(v).reshape(-1)[0]) for k, v in jax.device_get(metrics).items()}


def evaluate(exp: Experiment, state: split.TrainState) -> float:
    """Uncompressed test accuracy over the whole test split."""
    correct = count = 0.0
    for batch in data_lib.eval_batches(
        exp.test_source,
        batch_size=exp.config.eval_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    ):
        out = exp.programs.evaluate(state, split.shard_batch(batch, exp.devices))
        out = _to_python(out)
        correct, count = correct + out["correct"], count + out["count"]
    return correct / max(count, 1.0)


def _record(exp: Experiment, step: int) -> dict[str, Any]:
    """Cumulative communication after ``step`` steps."""
    cost = exp.cost
    return {
        "step": step,
        "samples_equivalent": step * cost.samples_equivalent,
        "bytes_up": step * cost.bytes_up,
        "bytes_down": step * cost.bytes_down,
    }


def versions() -> dict[str, str]:
    import flax
    import orbax.checkpoint

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else "",
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax": orbax.checkpoint.__version__,
        "numpy": np.__version__,
    }


def _host_scalar(x: jax.Array) -> int:
    """The value of a replicated scalar (this process's first copy); waits for it."""
    return int(np.asarray(x.addressable_data(0)).reshape(-1)[0])


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs one experiment in ``workdir`` (resuming it if it was interrupted).

    Refuses, before writing anything, a workdir that holds another experiment or a diverged run
    (:func:`adc_jax.runs.check_workdir`), a checkpoint that cannot be read or does not fit, and a
    budget that ends before the checkpoint's step. Stops with :class:`adc_jax.runs.RunDiverged`
    at the first non-finite step (nothing non-finite is saved) and with
    :class:`adc_jax.runs.RunInterrupted` after saving on SIGTERM or SIGINT.
    """
    start_time = time.time()
    exp = setup(config)
    schedule, cost = exp.schedule, exp.cost
    train_source = open_data(config, "train")
    record = runs.check_workdir(workdir, config, cost)
    os.makedirs(workdir, exist_ok=True)
    checkpoints = Checkpoints(workdir, schedule.checkpoint_every)
    try:
        state = checkpoints.restore(exp.initial_state) or exp.initial_state
    except BaseException:
        checkpoints.close(raise_errors=False)
        raise
    start = int(state.step)
    if start > schedule.total_steps:
        checkpoints.close(raise_errors=False)
        raise runs.RunError(
            f"{workdir} holds a run already at step {start}, past the {schedule.total_steps} "
            f"steps of this budget (budget.max_steps = {config.budget.max_steps}); a run cannot "
            f"be shortened. Raise budget.max_steps to {start} or more (0: no cap) to continue "
            "it, or use another --workdir."
        )
    if jax.process_index() == 0:
        runs.record_run(workdir, record, config, start)
        if start < schedule.total_steps:
            runs.drop_summary(workdir)

    state = split.replicate(state, exp.devices)
    writer = MetricsWriter(workdir, start, tensorboard=config.tensorboard)
    step_fn = exp.programs.fused_step if config.fused_step else exp.programs.split_step
    batches = data_lib.TrainIterator(
        train_source,
        batch_size=config.batch_size,
        seed=config.seed,
        start_step=start,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    progress = _progress(config, schedule.total_steps, start, cost)
    pending = None  # (step, metrics on device) of the last log step, read one step late
    test_accuracy = None
    saved = start  # the newest checkpoint's step (all of them are finite)
    tick, tick_step = time.time(), start

    def check_finite(bad_step: int, seen_at: int) -> None:
        """Stops the run (marking the workdir) if a step was not finite."""
        if bad_step:
            message = f"The loss, gradients or parameters were not finite at step {bad_step}."
            if jax.process_index() == 0:
                message = runs.mark_diverged(workdir, bad_step, seen_at, saved)
            raise runs.RunDiverged(
                f"{message} Lower optimizer.learning_rate (now {config.optimizer.learning_rate:g}) "
                f"or check the data, and start again in another --workdir (docs/runs.md)."
            )

    def write_pending() -> None:
        """Writes the last log step's row, after checking that the run was finite up to it."""
        nonlocal pending, tick, tick_step
        if pending is None:
            return
        (logged_step, logged), pending = pending, None
        values = _to_python(logged)
        check_finite(int(values.pop("bad_step")), logged_step)
        values.pop("finite")
        now = time.time()
        rate = (logged_step - tick_step) / max(now - tick, 1e-9)
        tick, tick_step = now, logged_step
        writer.write(
            {
                **_record(exp, logged_step),
                **values,
                "steps_per_second": rate,
                "images_per_second": rate * config.batch_size,
            }
        )
        progress.set_postfix(loss=f"{values['loss']:.3f}")

    def save(step: int) -> None:
        nonlocal saved
        write_pending()  # a checkpoint never gets ahead of the rows it resumes after
        host = jax.device_get(split.unreplicate(state))
        check_finite(int(host.bad_step), step)
        checkpoints.save(step, host)
        saved = step

    try:
        with runs.StopSignals(multiprocess=jax.process_count() > 1) as stop:
            for step in range(start + 1, schedule.total_steps + 1):
                batch = split.shard_batch(next(batches), exp.devices)
                state, metrics = step_fn(state, batch)
                write_pending()
                last = step == schedule.total_steps
                if step % schedule.log_every == 0 or last:
                    pending = (step, metrics)
                if step % schedule.eval_every == 0 or last:
                    write_pending()
                    check_finite(_host_scalar(state.bad_step), step)
                    accuracy = evaluate(exp, state)
                    writer.write({**_record(exp, step), **_eval_row(accuracy, start_time)})
                    if last:
                        test_accuracy = accuracy
                if step % schedule.checkpoint_every == 0 or last:
                    save(step)
                runs.fault_point("step", step)
                progress.update(1)
                if stop.requested(step) and not last:  # at the last step, finishing is quicker
                    if saved != step:
                        save(step)
                    checkpoints.close()
                    raise runs.RunInterrupted(stop.signum, step, workdir)
        if test_accuracy is None:  # resumed at the end: the row of the last evaluation is there
            test_accuracy = evaluate(exp, state)
        checkpoints.close()
    except BaseException:
        checkpoints.close(raise_errors=False)
        raise
    finally:
        batches.close()
        progress.close()
        writer.close()

    summary = {
        **_record(exp, schedule.total_steps),
        "test_accuracy": test_accuracy,
        "steps": schedule.total_steps,
        "method": config.method.name,
        "model": config.model.name,
        "dataset": config.dataset.name,
        "batch_size": config.batch_size,
        "xi_nominal": cost.xi_paper,
        "xi_measured": cost.xi_measured,
        "compute_dtype": jnp.dtype(exp.model.dtype).name,
        **_speed(os.path.join(workdir, "metrics.jsonl"), config.target_accuracy),
        "bytes_per_step_up": cost.uplink,
        "bytes_per_step_down": cost.downlink,
        "uplink_channel": dataclasses.asdict(exp.protocol.uplink),
        "downlink_channel": dataclasses.asdict(exp.protocol.downlink),
        "wall_seconds": time.time() - start_time,
        "resumed_from_step": start,
        "fingerprint": record["fingerprint"],
        "num_devices": len(exp.devices) * jax.process_count(),
        "device_kind": exp.devices[0].device_kind,
        "platform": exp.devices[0].platform,
        "versions": versions(),
    }
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(
            f"{config.method.name} (ξ {cost.xi_paper:.3g}, measured {cost.xi_measured:.3g}): "
            f"test accuracy {test_accuracy:.4f} after {schedule.total_steps} steps, "
            f"{summary['bytes_up'] / 2**20:.1f} MiB up, {summary['bytes_down'] / 2**20:.1f} MiB "
            f"down, {summary['wall_seconds']:.0f} s on {summary['num_devices']} "
            f"{summary['device_kind']} device(s). Outputs in {workdir}."
        )
    return summary


def _eval_row(accuracy: float, start_time: float) -> dict[str, float]:
    return {"test_accuracy": accuracy, "wall_seconds": time.time() - start_time}


def _speed(metrics_path: str, target_accuracy: float) -> dict[str, float | None]:
    """``images_per_second`` (the median over the log rows: the first row's compilation and the
    rows that include an evaluation are outliers) and, with a ``target_accuracy`` > 0,
    ``seconds_to_target``: the ``wall_seconds`` of the first evaluation that reaches it (None if
    none does; a resumed run's rows count from the start of the process that wrote them)."""
    rows = []
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    rates = [r["images_per_second"] for r in rows if "images_per_second" in r]
    out = {"images_per_second": float(np.median(rates)) if rates else None}
    if target_accuracy > 0:
        reached = [
            r["wall_seconds"]
            for r in rows
            if r.get("test_accuracy", -1.0) >= target_accuracy and "wall_seconds" in r
        ]
        out["seconds_to_target"] = reached[0] if reached else None
    return out


def _progress(config, total: int, start: int, cost: StepCost):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=start,
        unit="step",
        desc=f"{config.method.name} ξ={cost.xi_paper:.3g}",
        disable=not config.progress or jax.process_index() != 0,
        file=sys.stderr,
    )
