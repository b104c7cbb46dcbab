"""The training loop: budget, evaluation, checkpoints, metrics, progress (ADC_SPEC §1, §3, §4).

``train_and_evaluate(config, workdir)`` runs one experiment and returns its summary. Everything
it writes lands in ``workdir``:

* ``config.json`` – the config as run;
* ``metrics.jsonl`` – one JSON object per logged step (``step``, ``loss``, ``samples_equivalent``,
  ``bytes_up``, ``bytes_down``, ``steps_per_second``, …) and per evaluation (``test_accuracy``);
* ``summary.json`` – the final test accuracy, steps, bytes per direction, nominal and measured
  ξ, wall time, devices and versions;
* ``checkpoints/`` – orbax checkpoints; a restarted command resumes from the newest by itself.

Durations are converted to steps once, by :func:`plan_steps`; the loop reads metrics back from
the device only on log steps, one step late, so the host never waits on the step in flight.
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

from adc_jax import data as data_lib
from adc_jax import split, vit
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


def build_model(config: ml_collections.ConfigDict, num_classes: int, image_size: int, key):
    """The split ViT and its parameters (pretrained when ``model.pretrained`` is set)."""
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(config.model.dtype)
    if dtype is None:
        raise ValueError(f"model.dtype must be float32 or bfloat16, not {config.model.dtype!r}.")
    if config.model.pretrained:
        from adc_jax import pretrained

        return pretrained.load_timm(
            config.model.pretrained,
            model_name=config.model.name,
            split_index=config.model.split_index,
            num_classes=num_classes,
            key=key,
            image_size=image_size,
            dtype=dtype,
        )
    model = vit.make_model(
        config.model.name,
        split_index=config.model.split_index,
        num_classes=num_classes,
        dtype=dtype,
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
    info = data_lib.dataset_info(config.dataset.name)
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
    cut = CutShape(config.batch_size // clients, model.seq_len, model.width, info.num_classes)
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
    """Opens a split, preparing the dataset first from local raw files when it can."""
    name, data_dir = config.dataset.name, config.dataset.data_dir or None
    spec = data_lib.dataset_info(name)
    if config.dataset.source_dir and not data_lib.is_prepared(name, data_dir):
        if not spec.source_args:
            raise ValueError(f"{name} cannot be prepared from dataset.source_dir.")
        data_lib.prepare(name, data_dir, **{spec.source_args[0]: config.dataset.source_dir})
    data_lib.prepare_if_local(name, data_dir)
    return data_lib.open_split(name, split_name, data_dir)


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
    """``runs/<config file>-<method>[-xi<ξ>]-s<seed>``."""
    name = os.path.splitext(os.path.basename(config_path))[0]
    tag = config.method.name + (f"-xi{config.method.xi:g}" if config.method.name == "adc" else "")
    return os.path.join("runs", f"{name}-{tag}-s{config.seed}")


# ---- Checkpoints ------------------------------------------------------------------------------


class Checkpoints:
    """Orbax checkpoints of the train state in ``workdir/checkpoints``."""

    def __init__(self, workdir: str, every: int):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self._manager = ocp.CheckpointManager(
            os.path.abspath(os.path.join(workdir, "checkpoints")),
            options=ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=every),
        )

    def restore(self, target: split.TrainState) -> split.TrainState | None:
        step = self._manager.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target)
        restored = self._manager.restore(step, args=self._ocp.args.StandardRestore(abstract))
        return jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(restored))

    def save(self, step: int, state: split.TrainState) -> None:
        host = jax.device_get(state)
        self._manager.save(step, args=self._ocp.args.StandardSave(host), force=True)

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


# ---- The loop ---------------------------------------------------------------------------------


class MetricsWriter:
    """JSON lines in ``metrics.jsonl``; only process 0 writes.

    A run resumed from step ``start`` first drops the rows of steps after ``start``: they were
    written by the interrupted process after its last checkpoint and the resumed run writes
    its own, so the file holds one trajectory.
    """

    def __init__(self, workdir: str, start: int = 0):
        self._file = None
        if jax.process_index() == 0:
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

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


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


def _check_finite(step: int, metrics: dict[str, float]) -> None:
    if not math.isfinite(metrics["loss"]):
        raise FloatingPointError(
            f"Loss is {metrics['loss']} at step {step}; lower optimizer.learning_rate or check "
            "the data."
        )


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs one experiment in ``workdir`` (resuming it if it was interrupted)."""
    start_time = time.time()
    exp = setup(config)
    schedule, cost = exp.schedule, exp.cost
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    checkpoints = Checkpoints(workdir, schedule.checkpoint_every)
    state = checkpoints.restore(exp.initial_state) or exp.initial_state
    start = int(state.step)
    state = split.replicate(state, exp.devices)
    writer = MetricsWriter(workdir, start)
    step_fn = exp.programs.fused_step if config.fused_step else exp.programs.split_step
    batches = data_lib.TrainIterator(
        open_data(config, "train"),
        batch_size=config.batch_size,
        seed=config.seed,
        start_step=start,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    progress = _progress(config, schedule.total_steps, start, cost)
    pending = None  # (step, metrics on device) of the last log step, read one step late
    test_accuracy = None
    tick, tick_step = time.time(), start
    try:
        for step in range(start + 1, schedule.total_steps + 1):
            batch = split.shard_batch(next(batches), exp.devices)
            state, metrics = step_fn(state, batch)
            if pending is not None:
                logged_step, logged = pending
                pending = None
                values = _to_python(logged)
                _check_finite(logged_step, values)
                now = time.time()
                rate = (logged_step - tick_step) / max(now - tick, 1e-9)
                tick, tick_step = now, logged_step
                writer.write({**_record(exp, logged_step), **values, "steps_per_second": rate})
                progress.set_postfix(loss=f"{values['loss']:.3f}")
            if step % schedule.log_every == 0 or step == schedule.total_steps:
                pending = (step, metrics)
            if step % schedule.eval_every == 0 and step != schedule.total_steps:
                accuracy = evaluate(exp, state)
                writer.write({**_record(exp, step), "test_accuracy": accuracy})
            if step % schedule.checkpoint_every == 0 or step == schedule.total_steps:
                checkpoints.save(step, split.unreplicate(state))
            progress.update(1)
        if pending is not None:
            values = _to_python(pending[1])
            _check_finite(pending[0], values)
            writer.write({**_record(exp, pending[0]), **values})
        test_accuracy = evaluate(exp, state)
        writer.write({**_record(exp, schedule.total_steps), "test_accuracy": test_accuracy})
    finally:
        batches.close()
        progress.close()
        checkpoints.close()
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
        "bytes_per_step_up": cost.uplink,
        "bytes_per_step_down": cost.downlink,
        "uplink_channel": dataclasses.asdict(exp.protocol.uplink),
        "downlink_channel": dataclasses.asdict(exp.protocol.downlink),
        "wall_seconds": time.time() - start_time,
        "resumed_from_step": start,
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
