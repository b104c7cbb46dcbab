"""Trustworthy runs: a workdir holds one experiment, a diverged run never counts, preemption and
SIGKILL lose nothing, damaged checkpoints and full disks say what to do (docs/runs.md)."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import config_kit
import jax
import numpy as np
import pytest

from adc_jax import runs, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = os.path.join(ROOT, "configs", "vit_fashion_mnist.py")


def make_config(overrides):
    return config_kit.with_fields(config_kit.load("vit_fashion_mnist"), overrides)


@pytest.fixture
def tiny(fashion_dir):
    return make_config(config_kit.tiny_fields(fashion_dir))


def files(workdir):
    """The bytes of the files a refused command must leave alone."""
    names = ("config.json", "run.json", "metrics.jsonl", "summary.json")
    return {name: (workdir / name).read_bytes() for name in names if (workdir / name).exists()}


def rows(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def final_state(config, workdir):
    return train.Checkpoints(str(workdir), 1).restore(train.setup(config).initial_state)


def assert_same_state(a, b):
    assert int(a.step) == int(b.step)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---- A workdir holds one experiment --------------------------------------------------------------


@pytest.fixture
def recorded(tiny, tmp_path):
    """A workdir as a run of ``tiny`` leaves it once its first checkpoint exists (the checkpoint
    itself left out: refusals happen before it is read)."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    record = runs.check_workdir(str(workdir), tiny, train.setup(tiny).cost)
    runs.record_run(str(workdir), record, tiny, 0)
    (workdir / "metrics.jsonl").write_text('{"step": 2, "loss": 2.3}\n')
    (workdir / "checkpoints" / "3").mkdir(parents=True)
    return workdir


@pytest.fixture(scope="module")
def finished(fashion_dir, tmp_path_factory):
    """A finished 6-step ADC run (checkpoints at 3 and 6); tests copy it before changing it."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    config = make_config(config_kit.tiny_fields(fashion_dir))
    summary = train.train_and_evaluate(config, str(workdir))
    return workdir, summary


@pytest.fixture
def workdir(finished, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(finished[0], copy)
    return copy


def test_identity_leaves_out_only_what_cannot_change_results(tiny):
    fields = runs.identity(tiny)
    assert "optimizer.learning_rate" in fields and "budget.steps" in fields
    assert "model.split_index" in fields and "seed" in fields and "fused_step" in fields
    for name in runs.NOT_DEFINING:
        assert name not in fields
    before = runs.fingerprint(tiny)
    tiny.progress, tiny.log_every_steps, tiny.budget.max_steps = True, 7, 3
    tiny.dataset.data_dir = "/elsewhere"
    assert runs.fingerprint(tiny) == before
    tiny.optimizer.learning_rate = 0.01
    assert runs.fingerprint(tiny) != before


def test_default_workdirs_tell_runs_apart(tiny):
    name = train.default_workdir(CONFIG_FILE, tiny)
    assert os.path.basename(name).startswith("vit_fashion_mnist-adc-xi0.25-s0-")
    tiny.progress = True  # reporting only: the same run
    assert train.default_workdir(CONFIG_FILE, tiny) == name
    tiny.optimizer.learning_rate = 0.01
    assert train.default_workdir(CONFIG_FILE, tiny) != name


@pytest.mark.slow
def test_another_learning_rate_is_refused_before_anything_is_written(tiny, recorded):
    workdir = recorded
    before = files(workdir)
    tiny.optimizer.learning_rate = 0.01
    with pytest.raises(runs.WorkdirMismatch) as e:
        train.train_and_evaluate(tiny, str(workdir))
    assert "optimizer.learning_rate: 0.001 (in the workdir) -> 0.01 (now)" in str(e.value)
    assert "--config.allow_changes=optimizer.learning_rate" in str(e.value)
    assert files(workdir) == before


@pytest.mark.slow
def test_another_method_is_refused_even_when_allowed(tiny, recorded):
    """Base on an ADC workdir: refused; allowed by name, still refused since a step sends other
    bytes (the run's bytes would count ADC steps as Base's)."""
    workdir = recorded
    before = files(workdir)
    tiny.method.name = "base"
    with pytest.raises(runs.WorkdirMismatch, match="method.name: 'adc' .* -> 'base'"):
        train.train_and_evaluate(tiny, str(workdir))
    tiny.allow_changes = "method.name"
    with pytest.raises(runs.WorkdirMismatch, match="bytes up"):
        train.train_and_evaluate(tiny, str(workdir))
    assert files(workdir) == before


@pytest.mark.slow
def test_other_split_is_refused_and_an_allowed_one_lists_what_does_not_fit(tiny, workdir):
    before = files(workdir)
    tiny.model.split_index = 1
    with pytest.raises(runs.WorkdirMismatch, match="model.split_index: 2 .* -> 1"):
        train.train_and_evaluate(tiny, str(workdir))
    tiny.allow_changes = "model.split_index"
    with pytest.raises(runs.CheckpointError, match=r"does not fit .*missing: .*unexpected: "):
        train.train_and_evaluate(tiny, str(workdir))
    assert files(workdir) == before


@pytest.mark.slow
def test_a_checkpoint_of_other_shapes_is_listed_not_restored(tiny, workdir):
    target = train.setup(tiny).initial_state
    kernel = target.server.params["model"]["head"]["kernel"]
    params = {**target.server.params["model"], "head": {"kernel": kernel[:, :5], "bias": None}}
    server = target.server._replace(params={**target.server.params, "model": params})
    with pytest.raises(runs.CheckpointError) as e:
        train.Checkpoints(str(workdir), 1).restore(target._replace(server=server))
    assert "missing" not in str(e.value)
    width, classes = kernel.shape
    assert (
        f"server.params.model.head.kernel is float32[{width}, {classes}] in the file, "
        f"float32[{width}, 5] now"
    ) in str(e.value)
    assert "unexpected: server.params.model.head.bias" in str(e.value)


@pytest.mark.slow
def test_max_steps_below_the_checkpoint_is_refused(tiny, workdir):
    tiny.budget.max_steps = 4  # not an identity field, but the run is already at step 6
    with pytest.raises(runs.RunError, match=r"already at step 6, past the 4 steps"):
        train.train_and_evaluate(tiny, str(workdir))


@pytest.mark.slow
def test_a_longer_budget_continues_when_allowed(tiny, workdir, finished):
    tiny.budget.steps = 8
    with pytest.raises(runs.WorkdirMismatch, match="budget.steps: 6 .* -> 8"):
        train.train_and_evaluate(tiny, str(workdir))
    tiny.allow_changes = "budget"
    summary = train.train_and_evaluate(tiny, str(workdir))
    assert summary["resumed_from_step"] == 6 and summary["steps"] == 8
    record = json.loads((workdir / "run.json").read_text())
    assert record["changes"] == [{"fields": {"budget.steps": [6, 8]}, "step": 6}]
    assert record["fingerprint"] == runs.fingerprint(tiny) != finished[1]["fingerprint"]
    logged = [r["step"] for r in rows(workdir) if "loss" in r]
    assert logged == [2, 4, 6, 8]
    # The same command again: nothing differs from run.json any more; it re-evaluates.
    tiny.allow_changes = ""
    assert train.train_and_evaluate(tiny, str(workdir))["resumed_from_step"] == 8


# ---- Divergence ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_divergence_names_the_first_bad_step_saves_nothing_and_is_not_resumed(
    fashion_dir, tmp_path
):
    """Adam at 1e5: step 2 is already non-finite. Logged every 6 steps, checkpointed every 4: the
    device's mark names step 2 when step 4's checkpoint would have been written."""
    config = make_config(
        config_kit.tiny_fields(
            fashion_dir,
            **{"optimizer.learning_rate": 1e5, "budget.steps": 8, "log_every_steps": 6},
            checkpoint_every_steps=4,
        )
    )
    workdir = tmp_path / "run"
    with pytest.raises(runs.RunDiverged, match=r"not finite at step 2 \(seen at step 4\)"):
        train.train_and_evaluate(config, str(workdir))
    assert not runs.has_checkpoint(str(workdir))  # no non-finite state was saved
    assert json.loads((workdir / "diverged.json").read_text())["bad_step"] == 2
    assert not any("loss" in r for r in rows(workdir))
    with pytest.raises(runs.RunDiverged, match="diverged"):  # the same command again
        train.train_and_evaluate(config, str(workdir))
    assert not (workdir / "summary.json").exists()


# ---- Damaged checkpoints, full disks, one paragraph --------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["array data", "metadata"])
def test_a_damaged_checkpoint_offers_the_previous_one(tiny, workdir, damage, capsys):
    step6 = workdir / "checkpoints" / "6"
    if damage == "array data":
        targets = list((step6 / "default" / "ocdbt.process_0" / "d").iterdir())
    else:
        targets = [step6 / "default" / "_METADATA"]
    for path in targets:
        with open(path, "r+b") as f:
            f.truncate(10)
    code = runs.run_command(lambda: train.train_and_evaluate(tiny, str(workdir)))
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert f"The newest checkpoint, step 6 ({step6}), cannot be read" in err
    assert "The previous checkpoint, step 3, reads fine" in err
    moved = workdir / "damaged-checkpoint-6"
    assert f"mv {step6} {moved}" in err
    os.rename(step6, moved)  # as the message says
    summary = train.train_and_evaluate(tiny, str(workdir))
    assert summary["resumed_from_step"] == 3 and summary["steps"] == 6


def test_user_errors_print_one_paragraph_and_verbose_shows_the_traceback(tiny, monkeypatch, capsys):
    tiny.method.xi = 1.5
    assert runs.run_command(lambda: train.train_and_evaluate(tiny, "unused")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "xi (1.5) must be in (0, 1]" in err
    assert "Traceback" not in err and not os.path.exists("unused")
    monkeypatch.setenv("ADC_JAX_VERBOSE", "1")
    with pytest.raises(ValueError, match="xi"):
        runs.run_command(lambda: train.train_and_evaluate(tiny, "unused"))


@pytest.fixture
def small_disk(tmp_path):
    """A 700 KiB tmpfs: room for one checkpoint of the tiny model, not two (needs root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow
def test_a_full_disk_says_so_once_and_keeps_the_last_checkpoint(tiny, small_disk, capsys):
    tiny.checkpoint_every_steps = 1
    workdir = small_disk / "run"
    code = runs.run_command(lambda: train.train_and_evaluate(tiny, str(workdir)))
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.count("No space left on the device") == 1
    assert "run the same command again" in err
    assert [int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()] == [1]
    assert int(final_state(tiny, workdir).step) == 1


# ---- Signals and SIGKILL: nothing is lost -------------------------------------------------------


def command(workdir, overrides):
    args = [sys.executable, os.path.join(ROOT, "train.py"), "--config", CONFIG_FILE]
    args += [f"--config.{k}={v}" for k, v in overrides.items()]
    return [*args, "--workdir", str(workdir)]


def subprocess_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADC_JAX_")}
    env["PYTHONPATH"] = ROOT
    # This test run's compilation cache (tests/conftest.py): the processes compile nothing new.
    env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return {**env, **extra}


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_at_the_next_step_and_exits(fashion_dir, tmp_path, signum):
    overrides = config_kit.tiny_fields(
        fashion_dir, **{"budget.steps": 100_000, "log_every_steps": 1}, checkpoint_every_steps=1000
    )
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        command(workdir, overrides),
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while not any(r.get("step", 0) >= 3 for r in _rows_if_any(workdir)):
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, err[-3000:]
    name = signal.Signals(signum).name
    (line,) = [x for x in err.splitlines() if x.startswith(f"Stopped by {name} after step ")]
    step = int(line.split("after step ")[1].split(";")[0])
    assert step >= 3 and "Traceback" not in err
    assert [s for s in os.listdir(workdir / "checkpoints") if s.isdigit()] == [str(step)]
    assert [r["step"] for r in rows(workdir) if "loss" in r] == list(range(1, step + 1))
    config = make_config({**overrides, "budget.max_steps": step + 1})
    assert train.train_and_evaluate(config, str(workdir))["resumed_from_step"] == step


def _rows_if_any(workdir):
    try:
        return rows(workdir)
    except (FileNotFoundError, ValueError):
        return []


@pytest.mark.slow
def test_sigkill_at_random_steps_and_mid_checkpoint_loses_nothing(fashion_dir, tmp_path):
    """Killed at random points (some while a checkpoint is being written) and restarted until it
    finishes, a run ends bit-identical to an uninterrupted one, one metrics row per logged step."""
    steps = 8
    overrides = config_kit.tiny_fields(
        fashion_dir,
        **{"budget.steps": steps, "log_every_steps": 1, "eval_every_steps": 4},
        checkpoint_every_steps=2,
    )
    whole = tmp_path / "whole"
    train.train_and_evaluate(make_config(overrides), str(whole))

    # One kill of each kind, in random order at random increasing steps (each past the previous
    # one's resume point): after a step, inside a checkpoint write, once a checkpoint is complete.
    rng = random.Random(os.environ.get("ADC_JAX_FAULT_SEED", "0"))
    kills, at = [], 0
    for where in rng.sample(["step", "save", "saved"], 3):
        at += rng.randint(1, 2)
        if where != "step" and at % 2:  # checkpoints are written every 2 steps
            at += 1
        kills.append(f"{where}:{at}")
    parts = tmp_path / "parts"
    for kill in [*kills, None]:
        env = subprocess_env(**({"ADC_JAX_TEST_KILL": kill} if kill else {}))
        done = subprocess.run(
            command(parts, overrides), env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == (-signal.SIGKILL if kill else 0), (kill, done.stderr[-3000:])
        where, _, step = (kill or "").partition(":")
        if where == "save":  # killed inside orbax's write: it never finished
            assert not (parts / "checkpoints" / step).exists(), kills
            assert (parts / "checkpoints" / f"{step}.orbax-checkpoint-tmp").exists(), kills

    config = make_config(overrides)
    assert_same_state(final_state(config, whole), final_state(config, parts))
    logged = [r["step"] for r in rows(parts) if "loss" in r]
    evaluated = [r["step"] for r in rows(parts) if "test_accuracy" in r]
    assert logged == list(range(1, steps + 1)), kills
    assert evaluated == [4, 8], kills
    losses = lambda w: [r["loss"] for r in rows(w) if "loss" in r]
    assert losses(parts) == losses(whole)
    summary = json.loads((parts / "summary.json").read_text())
    assert (
        summary["test_accuracy"]
        == json.loads((whole / "summary.json").read_text())["test_accuracy"]
    )
