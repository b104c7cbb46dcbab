"""The benchmark scripts' interface: one tiny configuration, JSON lines with the promised fields,
the grid's processes and the tables made from records."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
PHASES = {"client_forward", "compress", "server_step", "client_backward", "step", "fused_step"}
# The tiny split ViT of tests/split_kit.py (16×16 images, 17 tokens, 10 classes), batch 8.
TINY_MODEL = "--model vit_test_patch4_16 --split-index 2 --num-classes 10".split()
TINY = [*TINY_MODEL, "--batch", "8"]


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def step():
    return load("step")


@pytest.fixture(scope="module")
def grid():
    return load("grid")


def test_step_options(step):
    """One configuration per call: the grid's options are grid.py's."""
    args = step.parse_args([])
    assert (args.model, args.batch, args.method, args.xi) == (
        "deit_tiny_patch16_224",
        64,
        "adc",
        0.1,
    )
    assert (args.dtype, args.attention, args.donate, args.select) == ("float32", "auto", True, True)
    args = step.parse_args([*TINY, "--dtype", "bfloat16", "--no-donate", "--method", "base"])
    assert (args.batch, args.dtype, args.donate, args.method) == (8, "bfloat16", False, "base")
    for gone in (["--grid"], ["--summarize", "x.jsonl"], ["--batches", "32"]):
        with pytest.raises(SystemExit):
            step.parse_args(gone)


@pytest.mark.slow
def test_step_benchmark_prints_one_record_per_phase(step, capsys):
    records = step.main([*TINY, "--method", "adc", "--xi", "0.5", "--steps", "1", "--xla-default"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == records  # JSON lines on stdout, one object per line
    times = {r["phase"]: r for r in records if r["record"] == "time"}
    assert PHASES <= set(times)
    for r in times.values():
        assert r["model"] == "vit_test_patch4_16" and r["batch"] == 8
        assert r["method"] == "adc" and r["xi"] == 0.5
        assert r["median_s"] > 0 and r["device"].startswith("cpu") and r["jax"]
        assert (r["num_clusters"], r["num_tokens"]) == (5, 12)  # B = 8, N = 17, ξ = 0.5
    (check,) = [r for r in records if r["record"] == "check"]
    assert set(check["compilations"].values()) == {1}  # no recompilation after the first step
    (memory,) = [r for r in records if r["record"] == "memory"]
    assert memory["peak_bytes"] > 0 and memory["peak_source"] in {"device", "process_max_rss"}
    (ratio,) = [r for r in records if r["record"] == "ratio"]
    assert ratio["split_over_fused"] > 0 and ratio["compress_over_step"] > 0


@pytest.mark.slow
def test_paired_base_alternates_adc_and_base_in_one_process(step, grid):
    argv = [*TINY, "--xi", "0.5"]
    records = step.main([*argv, "--steps", "2", "--xla-default", "--paired-base"])
    assert grid.variant(records[0]) == "float32"
    times = {r["phase"]: r for r in records if r["record"] == "paired"}
    assert set(times) == {"adc_step", "adc_fused_step", "base_step", "base_fused_step"}
    assert all(len(r["times_s"]) == 2 and r["method"] == "adc" for r in times.values())
    (ratio,) = [r for r in records if r["record"] == "paired_ratio"]
    expected = times["adc_step"]["median_s"] / times["base_step"]["median_s"]
    assert ratio["step_over_base"] == pytest.approx(expected)
    with pytest.raises(SystemExit, match="ADC configuration"):
        step.main([*argv, "--method", "base", "--paired-base"])


@pytest.mark.slow
def test_paired_torch_alternates_with_a_second_process(step, monkeypatch, tmp_path):
    # A stand-in for torch_step.py --serve (torch is not a dependency): answers every call with
    # 0.5 s, so the ratios are our medians over 0.5.
    fake = tmp_path / "fake_torch_python"
    answer = 'echo "{\\"phase\\": \\"$p\\", \\"s\\": 0.5}"'
    fake.write_text(f"#!/bin/sh\nwhile read p; do {answer}; done\n")
    fake.chmod(0o755)
    monkeypatch.setattr(step, "HANDOVER_PAUSE_S", 0.0)
    argv = [*TINY, "--steps", "2", "--xla-default", "--paired-torch"]
    records = step.main([*argv, "--method", "base", "--torch-python", str(fake)])
    times = {r["phase"]: r for r in records if r["record"] == "paired_torch"}
    assert set(times) == {"fused_step", "step", "torch_step", "torch_split_step"}
    assert times["torch_step"]["times_s"] == [0.5, 0.5]
    (ratio,) = [r for r in records if r["record"] == "paired_torch_ratio"]
    assert ratio["fused_over_torch"] == pytest.approx(times["fused_step"]["median_s"] / 0.5)
    assert ratio["split_over_torch"] == pytest.approx(times["step"]["median_s"] / 0.5)
    with pytest.raises(SystemExit, match="--method base"):
        step.main([*argv, "--method", "adc", "--torch-python", str(fake)])


def test_grid_summary_and_tables(grid):
    """The ratio summary and tables of grid.py, on hand-made records (a grid takes minutes)."""

    def rec(b, method, xi, dtype="float32", **phases):
        return [
            {"record": "time", "batch": b, "method": method, "xi": xi, "phase": p, "median_s": t}
            | {"dtype": dtype, "donate": True, "device": "cpu:", "jax": "0.10.2"}
            for p, t in phases.items()
        ]

    def torch(b, dtype, compiled=False, **phases):
        return [
            {"record": "time", "batch": b, "phase": p, "median_s": t, "framework": "torch"}
            | {"dtype": dtype, "compile": compiled, "device": "cpu:torch", "torch": "2.14"}
            for p, t in phases.items()
        ]

    base = dict(step=1.0, fused_step=0.9, compress_fwd_bwd=0.0)
    adc = dict(step=0.25, fused_step=0.24, compress_fwd_bwd=0.005)
    records = [
        *rec(64, "base", 1.0, **base),
        *rec(64, "adc", 0.1, **adc),
        *rec(128, "base", 1.0, **base),
        *rec(128, "adc", 0.1, **adc),
        # A bfloat16 variant: compared with its own Base.
        *rec(64, "base", 1.0, "bfloat16", step=0.5, fused_step=0.25, compress_fwd_bwd=0.0),
        *rec(64, "adc", 0.1, "bfloat16", step=0.4, fused_step=0.4, compress_fwd_bwd=0.1),
        # PyTorch's yardstick in float32 at B = 64: Base float32 only, not bfloat16's.
        *torch(64, "float32", step=1.8, split_step=2.0),
        *torch(64, "float32", compiled=True, step=0.1),  # torch.compile's: not the yardstick
        {"record": "memory", "batch": 64, "method": "adc", "xi": 0.1, "peak_bytes": 2.5e9},
        {"record": "paired_ratio", "batch": 64, "xi": 0.1, "step_over_base": 0.31}
        | {"fused_step_over_base": 0.29},
        {"record": "paired_torch_ratio", "batch": 64, "fused_over_torch": 0.97}
        | {"split_over_torch": 1.01},
    ]
    out = grid.summarize(records)
    assert {r["record"] for r in out} == {"summary"}
    rows = {(r["batch"], r["method"], r["variant"]): r for r in out}
    assert len(rows) == 6
    assert rows[(64, "adc", "float32")]["step_over_base"] == pytest.approx(0.25)
    assert rows[(64, "adc", "bfloat16")]["step_over_base"] == pytest.approx(0.8)
    assert rows[(64, "base", "float32")]["split_over_fused"] == pytest.approx(1.0 / 0.9)
    assert rows[(64, "adc", "bfloat16")]["images_per_s"] == pytest.approx(64 / 0.4)
    assert rows[(128, "adc", "float32")]["adc_overhead_over_step"] == pytest.approx(0.02)
    assert rows[(64, "base", "float32")]["device"] == "cpu:"
    assert rows[(64, "base", "float32")]["fused_over_torch"] == pytest.approx(0.5)
    assert rows[(64, "base", "float32")]["split_over_torch"] == pytest.approx(0.5)
    assert "fused_over_torch" not in rows[(64, "base", "bfloat16")]
    assert "fused_over_torch" not in rows[(128, "base", "float32")]
    table = grid.markdown(records + out)
    assert table.startswith("Measured on: cpu: (jax 0.10.2), cpu:torch (torch 2.14).")
    assert "| 64 | adc | 0.1 | float32 |" in table and "| 64 | adc | 0.1 | bfloat16 |" in table
    assert "| 0.250 | 256 | 2.50 |" in table  # step/Base, images/s, peak GB of float32 ADC
    assert "| 64 | float32 | 1.800 | 0.900 | 0.500 | 2.000 | 1.000 | 0.500 |" in table
    assert "| 64 | 0.1 | float32 | 0.310 | 0.290 |" in table
    assert "| 64 | float32 | 0.970 | 1.010 |" in table
    assert "target" not in table.lower()


def test_grid_options(grid):
    """The grid's options are its own; the rest are step.py's, checked by its parser and passed
    to every run, except those the grid sets per run."""
    args = grid.parse_args(["--batches", "16", "--steps", "3", "--dtype", "bfloat16"])
    assert args.batches == [16] and args.xis == list(grid.XIS)
    assert args.step_argv == ["--steps", "3", "--dtype", "bfloat16"]
    assert (args.step.steps, args.step.dtype) == (3, "bfloat16")
    assert grid.parse_args(["--paired-xis"]).paired_xis == []
    assert grid.parse_args(["--summarize", "a.jsonl", "b.jsonl"]).summarize == [
        "a.jsonl",
        "b.jsonl",
    ]
    for per_run in (["--batch", "32"], ["--xi=0.1"], ["--paired-base"], ["--input"]):
        with pytest.raises(SystemExit):  # --batch is not an abbreviation of --batches either
            grid.parse_args(per_run)
    with pytest.raises(SystemExit):
        grid.parse_args(["--no-such-option"])


def stub_runs(grid, monkeypatch) -> list[list[str]]:
    """The commands the grid runs, run by nobody."""
    calls = []

    def run(command, **_):
        calls.append(command)
        return type("Done", (), {"stdout": ""})()

    monkeypatch.setattr(grid.subprocess, "run", run)
    return calls


def test_grid_runs_divided_configurations_back_to_back(grid, monkeypatch):
    """Per batch: Base, PyTorch, then ADC at each ξ (a shared CPU drifts over minutes, and
    ratios divide these times); then the input path and the paired runs. step.py's options
    go to every run of it."""
    calls = stub_runs(grid, monkeypatch)
    argv = ["--batches", "32", "64", "--xis", "0.5", "0.1", "--torch-python", "tp", "--steps", "3"]
    grid.run_grid(grid.parse_args(argv))

    def name(command):
        if command[0] == "tp":
            return f"torch{command[command.index('--batch') + 1]}"
        assert command[1].endswith("step.py") and command[command.index("--steps") + 1] == "3"
        words = command[command.index("--batch") :]
        return " ".join(w for w in words if w not in ("--batch", "--method", "--xi"))

    order = [name(c) for c in calls]
    assert order == [
        "32 base", "torch32", "32 adc 0.5", "32 adc 0.1",
        "64 base", "torch64", "64 adc 0.5", "64 adc 0.1",
        "32 --input", "64 --input",
        "32 adc 0.1 --paired-base", "64 adc 0.1 --paired-base",
        "32 base --paired-torch --torch-python tp --torch-device cpu",
        "64 base --paired-torch --torch-python tp --torch-device cpu",
    ]  # fmt: skip
    torch = calls[1]
    assert torch[torch.index("--steps") + 1] == "3" and "--split" in torch
    assert "--amp" not in torch and torch[torch.index("--threads") + 1] == "2"


def test_grid_on_a_gpu_in_bfloat16(grid, monkeypatch):
    """PyTorch on the GPU with bfloat16 autocast as the yardstick, no alternated PyTorch runs
    (those are for a CPU), no paired runs when --paired-xis is empty."""
    calls = stub_runs(grid, monkeypatch)
    argv = "--batches 128 --xis 0.1 --paired-xis --dtype bfloat16 --xla-default"
    grid.run_grid(
        grid.parse_args([*argv.split(), "--torch-python", "tp", "--torch-device", "cuda"])
    )
    assert len(calls) == 4  # Base, PyTorch, ADC, input
    torch = calls[1]
    assert torch[0] == "tp" and "--amp" in torch and torch[torch.index("--device") + 1] == "cuda"
    assert all("--dtype" in c and "--xla-default" in c for c in calls if c[0] != "tp")


@pytest.mark.slow
def test_tiny_grid_end_to_end(grid, capsys, monkeypatch):
    """A real grid at toy sizes: step.py in its own processes, records passed on, then tables."""
    path = [str(BENCHMARKS.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))  # adc_jax, installed or not
    argv = ["--batches", "8", "--xis", "0.5", "--paired-xis", "--malloc", "system"]
    records = grid.main([*argv, *TINY_MODEL, "--steps", "1", "--warmup", "1", "--xla-default"])
    out = capsys.readouterr()
    assert [json.loads(line) for line in out.out.splitlines()] == records
    rows = {r["method"]: r for r in records if r["record"] == "summary"}
    assert set(rows) == {"base", "adc"} and rows["adc"]["step_over_base"] > 0
    assert {r["record"] for r in records} >= {"time", "memory", "check", "input"}
    assert "| 8 | adc | 0.5 | float32 |" in out.err


def test_summarize_reads_jsonl_files(grid, tmp_path, capsys):
    """``--summarize`` rebuilds the tables from records written earlier (here, by a GPU run)."""
    times = dict(step=0.02, fused_step=0.02, compress_fwd_bwd=0.0)
    gpu = {"device": "gpu:NVIDIA H200", "jax": "0.11.2", "cpu_count": 16}
    records = [
        {"record": "time", "batch": 128, "method": "base", "xi": 1.0, "phase": p, "median_s": t}
        | gpu
        for p, t in times.items()
    ]
    records.append(
        {"record": "input", "batch": 128, "phase": "h2d_uint8_32px", "bytes": 393216}
        | {"median_s": 0.0003}
        | gpu
    )
    path = tmp_path / "gpu.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = grid.main(["--summarize", str(path)])
    (row,) = [r for r in out if r.get("record") == "summary"]
    assert row["images_per_s"] == pytest.approx(6400)
    assert row["device"] == "gpu:NVIDIA H200"  # the machine that measured, not this one
    table = capsys.readouterr().out
    assert table.startswith("Measured on: gpu:NVIDIA H200 (jax 0.11.2).")
    assert "| 128 | base | 1 | float32 |" in table
    assert "| 128 | h2d_uint8_32px | 393216 | 0.300 |" in table


def test_allocator_env(monkeypatch, tmp_path):
    common = load("common")
    fake = tmp_path / "libtcmalloc_minimal.so.4"
    fake.write_bytes(b"")
    monkeypatch.setattr(common, "LIBRARY_DIRS", (str(tmp_path),))
    env = {"LD_PRELOAD": "/x/libother.so", "GLIBC_TUNABLES": "glibc.a=1"}
    assert common.allocator_env("auto", env)["LD_PRELOAD"] == f"{fake}:/x/libother.so"
    assert common.allocator_env("auto", env)["TCMALLOC_RELEASE_RATE"] == "0"
    kept = common.allocator_env("auto", {"TCMALLOC_RELEASE_RATE": "2"})
    assert kept["TCMALLOC_RELEASE_RATE"] == "2"  # a value already set wins
    assert common.allocator_env("thp", env)["GLIBC_TUNABLES"] == "glibc.a=1:glibc.malloc.hugetlb=1"
    assert common.allocator_env("system", env) == env
    fake.unlink()  # no tcmalloc: auto falls back to huge pages, tcmalloc says what to install
    assert common.allocator_env("auto", {})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    with pytest.raises(FileNotFoundError, match="libtcmalloc-minimal4"):
        common.allocator_env("tcmalloc", {})
    with pytest.raises(ValueError, match="Unknown allocator"):
        common.allocator_env("jemalloc", {})


def test_profile_pairs_async_ends():
    profile = load("profile_step")
    trace = [  # a synchronous fusion, and an asynchronous dot that ends 5 ms after its launch
        {"ph": "X", "name": "fusion.1", "ts": 0.0, "dur": 2000.0}
        | {"args": {"hlo_op": "fusion.1", "hlo_module": "jit_f"}},
        {"ph": "X", "name": "dot.2", "ts": 2000.0, "dur": 100.0}
        | {"args": {"hlo_op": "dot.2", "hlo_module": "jit_f"}},
        {"ph": "X", "name": "end: dot.2", "ts": 6900.0, "dur": 100.0, "args": {}},
    ]
    assert profile.op_times(trace, calls=1) == {("jit_f", "fusion.1"): 2.0, ("jit_f", "dot.2"): 5.0}


@pytest.mark.slow
def test_profile_names_instructions(capsys):
    profile = load("profile_step")
    argv = "--method adc --xi 0.5 --xla-default --program client_backward --calls 1"
    records = profile.main([*TINY, *argv.split()])
    ops = [r for r in records if r["record"] == "op"]
    assert ops and {r["kind"] for r in ops} <= set(profile.KINDS)
    assert any(r["kind"] in ("matmul", "fusion+matmul") for r in ops)
    assert any("blocks_1/mlp/fc2" in r["op_name"] for r in ops)  # named by the JAX op
    (program,) = [r for r in records if r["record"] == "program"]
    assert program["hlo_module"] == "jit_client_backward" and program["wall_ms"] > 0
    assert "| kind | ms |" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_script_plumbing_at_toy_sizes(tmp_path, fashion_dir):
    """benchmarks/gpu.sh on a CPU at toy sizes (TINY=1): its PyTorch part (torch_step.py replaced
    by a stand-in that prints its records) and its training part (the configs' :runlocal
    variants through train.py, eval spacing, summaries collected), then the report. The step and
    profile parts call step.py and profile_step.py, tested above in-process."""
    fake = tmp_path / "fake_torch_python"
    record = (
        '{"record": "time", "phase": "%s", "median_s": 0.5, "model": "vit_test_patch4_16", '
        '"batch": 8, "dtype": "bfloat16", "compile": \'$c\', "framework": "torch", '
        '"device": "cuda:NVIDIA H200", "torch": "0"}'
    )
    echo = "".join(f"echo '{record % phase}'\n" for phase in ("step", "split_step"))
    fake.write_text('#!/bin/sh\nc=false; case "$*" in *--compile*) c=true;; esac\n' + echo)
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OUT": str(out),
        "TINY": "1",
        "TORCH_PYTHON": str(fake),
        "DATA_DIR": str(fashion_dir),
        "PYTHON": sys.executable,
        "XLA_FLAGS": "",
    }
    done = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu.sh"), "900", "torch,train"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "FAILED" not in (out / "log.txt").read_text()
    bench = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    assert sorted((r["phase"], r["compile"]) for r in bench) == [
        ("split_step", False), ("split_step", True), ("step", False), ("step", True),
    ]  # fmt: skip
    runs = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert [(r["config"], r["method"]) for r in runs] == [
        ("deit_t_fashion_mnist", "adc"),
        ("deit_t_fashion_mnist", "base"),
        ("vit_fashion_mnist", "adc"),
    ]
    assert all(0 <= r["test_accuracy"] <= 1 and r["images_per_second"] > 0 for r in runs)
    report = (out / "report.md").read_text()
    for line in (
        "| PyTorch | timm, torch.compile | whole | 8 | bfloat16 | 500.00 | 16 |",
        "| deit_t_fashion_mnist | base | 1 | vit_test_patch4_16 | float32 | 4 |",
    ):
        assert line in report, line


def test_gpu_report_tables(tmp_path):
    """The report of a GPU run, from hand-made records: ours (alternated and separate), PyTorch
    eager and compiled, the ratios, the profile and a training run."""
    gpu_report = load("gpu_report")
    gpu = {"device": "gpu:NVIDIA H200", "jax": "0.11.2", "model": "deit_tiny_patch16_224"}
    paired = {"record": "paired", "batch": 256, "method": "adc", "xi": 0.1, "dtype": "bfloat16"}
    torch = {"record": "time", "batch": 256, "dtype": "bfloat16", "framework": "torch"}
    torch |= {"device": "cuda:NVIDIA H200", "torch": "2.11", "model": "deit_tiny_patch16_224"}
    bench = [
        paired | gpu | {"phase": "adc_step", "median_s": 0.018},
        paired | gpu | {"phase": "adc_fused_step", "median_s": 0.015},
        paired | gpu | {"phase": "base_step", "median_s": 0.025},
        paired | gpu | {"phase": "base_fused_step", "median_s": 0.024},
        torch | {"phase": "step", "median_s": 0.03, "compile": False},
        torch | {"phase": "split_step", "median_s": 0.032, "compile": False},
        torch | {"phase": "step", "median_s": 0.02, "compile": True},
    ]
    profile = [
        {"record": "op", "op": "fusion.1", "kind": "fusion", "ms": 2.0, "op_name": "x"},
        {"record": "kind", "kind": "fusion", "ms": 2.0},
        {"record": "program", "hlo_module": "jit_fused_step", "wall_ms": 24.0} | gpu,
    ]
    run = {"config": "deit_t_fashion_mnist", "method": "adc", "xi_nominal": 0.1, "steps": 9375}
    run |= {"model": "deit_tiny_patch16_224", "compute_dtype": "bfloat16"}
    run |= {"test_accuracy": 0.87, "images_per_second": 9000.0, "target_accuracy": 0.85}
    run |= {"seconds_to_target": 61.2, "wall_seconds": 130.0, "device_kind": "NVIDIA H200"}
    for name, records in (("bench", bench), ("profile", profile), ("train", [run])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = gpu_report.report([str(tmp_path)])
    assert "| ours | Base | fused | 256 | bfloat16 | 24.00 | 10667 | 8.1% | alternated |" in text
    assert "| ours | ADC ξ=0.1 | split | 256 | bfloat16 | 18.00 | 14222 | – |" in text  # no MFU
    assert "| PyTorch | timm, eager | whole | 256 | bfloat16 | 30.00 | 8533 | 6.5% |" in text
    assert "our Base fused step / PyTorch (timm, eager, AMP) whole step, time: **0.800**" in text
    assert "PyTorch (timm, torch.compile, AMP) whole step, time: **1.200**" in text
    assert "ADC ξ=0.1 split step / Base split step (alternated in one process): **0.720**" in text
    assert "Base: split / fused step: **1.042**" in text
    assert "`jit_fused_step` (" in text and "| 2.000 | fusion | fusion.1 | x |" in text
    assert "| 0.8700 | 9000 | 61 (≥ 0.85) | 130 | NVIDIA H200 |" in text


def test_gpu_report_flops_and_mfu():
    gpu_report = load("gpu_report")
    from adc_jax import vit

    # DeiT-Tiny: 2.5 GFLOP forward per 224 px image (timm's 1.26 GMACs), 3× for a training step.
    assert gpu_report.train_flops(vit.MODELS["deit_tiny_patch16_224"]) / 1e9 == pytest.approx(
        7.52, abs=0.01
    )
    records = [
        {"record": "time", "phase": "fused_step", "median_s": 0.1, "batch": 1000, "method": "base"}
        | {"xi": 1.0, "dtype": "bfloat16", "model": "deit_tiny_patch16_224"}
        | {"device": "gpu:NVIDIA H200"}
    ]
    table = "\n".join(gpu_report.step_table(records, None))
    # 10 000 images/s × 7.52 GFLOP = 75.2 TFLOP/s of the H200's 989.4: 7.6 %.
    assert "| ours | Base | fused | 1000 | bfloat16 | 100.00 | 10000 | 7.6% |" in table


def test_no_benchmark_script_shadows_a_standard_module():
    """Running a script puts benchmarks/ first on sys.path: a ``profile.py`` there would be what
    ``import torch`` (through cProfile) gets instead of the standard library's."""
    import sys

    names = {path.stem for path in BENCHMARKS.glob("*.py")}
    assert not names & set(sys.stdlib_module_names)


@pytest.mark.slow
def test_input_pipeline_benchmark_measures_both_datasets(tmp_path, capsys):
    bench = load("input_pipeline")
    argv = "--images 24 --cifar-images 64 --batch 8 --batches 2 --workers 0"
    records = bench.main([*argv.split(), "--workdir", str(tmp_path)])
    out = capsys.readouterr()
    assert [json.loads(line) for line in out.out.splitlines()] == records
    inputs = [r for r in records if r["record"] == "input"]
    assert [(r["dataset"], r["workers"]) for r in inputs] == [("cifar100", 0), ("food101", 0)]
    for r in inputs:
        assert r["images_per_second"] > 0 and r["cpu_count"] >= 1 and r["cpu"]
    sizes = {r["format"]: r["bytes_per_image"] for r in records if r["record"] == "format"}
    assert sizes["raw224"] == 224 * 224 * 3 and sizes["jpeg224"] < sizes["original"]
    food = inputs[1]
    assert food["train_images"] == 18 and 1000 < food["stored_bytes_per_image"] < 100_000
    assert "| food101 | JPEG 224x224x3 q90" in out.err
