"""The sweep runner and its plots: ξ → knob mapping, the grid, skip/resume, figures and tables."""

import csv
import json
import math
import os

import config_kit
import pytest

from adc_jax import paper, plots, sweep
from adc_jax.defaults import load_config
from adc_jax.methods import C3SL, CutShape, Unreachable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_CONFIG = os.path.join(ROOT, "configs", "vit_fashion_mnist.py")
# vit_mini_patch4_28 at batch 128: B·N·D = 128·50·64 = 409 600, ⌈log₂⌉ = 19 index bits.
CUT = CutShape(batch_size=128, seq_len=50, width=64, num_classes=10)


# ---- ξ → knob (pure functions, no training) -------------------------------------------------


@pytest.mark.parametrize(
    "xi,batch,ratio",
    [(0.5, 128, 2), (0.25, 128, 4), (0.1, 128, 8), (0.3, 128, 4), (0.01, 128, 128), (0.1, 100, 10)],
)
def test_c3sl_ratio_is_the_divisor_closest_to_one_over_xi(xi, batch, ratio):
    cut = CutShape(batch_size=batch, seq_len=50, width=64, num_classes=10)
    assert C3SL.knobs_for_xi(xi, cut) == {"ratio": ratio}
    assert batch % ratio == 0


@pytest.mark.parametrize("method", ["topk", "randtopk"])
@pytest.mark.parametrize("xi", [0.05, 0.1, 0.25, 0.5])
def test_topk_rate_hits_the_paper_xi_exactly(method, xi):
    knobs = sweep.method_knobs(method, xi, CUT)
    assert knobs["rate"] == pytest.approx(xi / (1 + 19 / 64))
    assert sweep.paper_xi(method, knobs, CUT) == pytest.approx(xi)


@pytest.mark.parametrize("xi,bits", [(0.1, 3), (0.25, 8), (0.5, 16), (0.01, 1), (1.0, 16)])
def test_quantize_bits(xi, bits):
    assert sweep.method_knobs("quantize", xi, CUT) == {"bits": bits}


def test_knobs_and_the_paper_xi_they_achieve():
    assert sweep.method_knobs("adc", 0.1, CUT) == {"xi": 0.1}
    assert sweep.method_knobs("base", 0.1, CUT) == {}
    assert sweep.method_knobs("bottlenet", 0.1, CUT) == {"compression": 0.1}
    # D′ = round(0.1·64) = 6: BottleNet++ reaches 6/64, C3-SL 1/8 (R must divide B).
    assert sweep.paper_xi("bottlenet", {"compression": 0.1}, CUT) == pytest.approx(6 / 64)
    assert sweep.paper_xi("c3sl", sweep.method_knobs("c3sl", 0.1, CUT), CUT) == 0.125
    assert sweep.paper_xi("quantize", {"bits": 3}, CUT) == pytest.approx(3 / 32)


def test_fedlite_only_above_one_half():
    knobs = sweep.method_knobs("fedlite", 0.5, CUT)
    assert 16 <= knobs["num_centroids"] <= 256 and 8 <= 50 * 64 // knobs["num_subvectors"] <= 64
    assert sweep.paper_xi("fedlite", knobs, CUT) == pytest.approx(0.5, abs=0.01)
    with pytest.raises(Unreachable, match="dense gradient"):
        sweep.method_knobs("fedlite", 0.25, CUT)


def test_bad_targets_fail_clearly():
    with pytest.raises(ValueError, match="Unknown method 'zip'"):
        sweep.method_knobs("zip", 0.1, CUT)
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        sweep.method_knobs("adc", 1.5, CUT)


def test_grid_order_names_and_left_out_cells():
    config = load_config(FASHION_CONFIG)
    runs, skipped = sweep.plan_grid(
        config, ["base", "topk", "adc", "fedlite"], [0.1, 0.5], seeds=[0, 1]
    )
    names = [r.name for r in runs]
    assert names[:2] == ["base-xi1-s0", "base-xi1-s1"]  # Base once per seed, whatever the grid
    assert names[2:6] == ["adc-xi0.5-s0", "adc-xi0.5-s1", "adc-xi0.1-s0", "adc-xi0.1-s1"]
    assert names[6:] == [
        "topk-xi0.5-s0",
        "topk-xi0.5-s1",
        "fedlite-xi0.5-s0",
        "fedlite-xi0.5-s1",
        "topk-xi0.1-s0",
        "topk-xi0.1-s1",
    ]
    assert [(s.method, s.xi_target) for s in skipped] == [("fedlite", 0.1)]
    run = runs[-1]
    built = run.config(config)
    assert built.method.name == "topk" and built.seed == 1
    assert built.method.rate == pytest.approx(0.1 / (1 + 19 / 64))
    assert config.method.name == "adc"  # the base config is left as it was


def test_paper_preset_runs_the_authors_grids():
    config = load_config(os.path.join(ROOT, "configs", "deit_t_cifar100.py"))
    runs, skipped = sweep.plan_preset(config, "paper", seeds=[0])
    by_method = {}
    for run in runs:
        by_method.setdefault(run.method, []).append(dict(run.knobs))
    assert by_method["base"] == [{}]
    assert [k["ratio"] for k in by_method["c3sl"]] == [2, 4, 8, 16, 32]  # not solved from ξ
    assert [k["bits"] for k in by_method["quantize"]] == [15, 12, 9, 6, 5, 3, 1]
    for method in ("adc", "topk", "randtopk", "bottlenet"):
        field, values = paper.GRIDS[method]
        assert sorted(k[field] for k in by_method[method]) == list(values)
    assert "fedlite" not in by_method and not skipped
    # Named by the knob, plotted at the ξ the knob achieves (Top-K's r = 0.1: ξ = 0.136).
    topk = next(r for r in runs if r.name == "topk-rate0.1-s0")
    assert topk.xi_target == topk.xi_paper == pytest.approx(0.136, abs=5e-4)
    assert [r.name for r in runs][:3] == ["base-xi1-s0", "adc-xi0.5-s0", "adc-xi0.4-s0"]
    _, skipped = sweep.plan_preset(config, "paper", seeds=[0], methods=["adc", "fedlite"])
    assert [(c.method, "no fedlite grid" in c.reason) for c in skipped] == [("fedlite", True)]
    with pytest.raises(ValueError, match="Unknown preset"):
        sweep.plan_preset(config, "papers", seeds=[0])


def test_evaluations_spread_over_the_budget():
    config = load_config(FASHION_CONFIG)
    config.budget.base_epochs = 1.0
    config.method.xi = 0.1  # 4687 steps (60 000 / 12.8)
    assert sweep.with_evals(config, 10).eval_every_steps == 469
    assert sweep.with_evals(config, 0).eval_every_steps == 0
    config.eval_every_steps = 7  # set by the user: kept
    assert sweep.with_evals(config, 10).eval_every_steps == 7


def test_a_failed_run_says_why_and_the_sweep_goes_on(tmp_path):
    config = load_config(FASHION_CONFIG)
    runs, _ = sweep.plan_grid(config, ["base", "adc"], [0.5], seeds=[0])
    lines, trained = [], []

    def train_fn(run_config, workdir):
        trained.append(run_config.method.name)
        if run_config.method.name == "base":
            raise ValueError("Batch size (100) must be divisible by the number of devices (8)")
        summary = {"test_accuracy": 0.5, "steps": 1, "xi_nominal": 0.5, "xi_measured": 0.5}
        (tmp_path / "adc-xi0.5-s0" / "summary.json").write_text(json.dumps(summary))
        return summary

    status = sweep.run_grid(config, runs, str(tmp_path), log=lines.append, train_fn=train_fn)
    assert status == {"base-xi1-s0": "failed", "adc-xi0.5-s0": "finished"}
    assert trained == ["base", "adc"]
    (failed,) = [line for line in lines if "FAILED" in line]
    assert "ValueError: Batch size (100) must be divisible" in failed
    error = (tmp_path / "base-xi1-s0" / "error.txt").read_text()
    assert error.startswith("Traceback") and error.rstrip().endswith("devices (8)")


def test_lock_is_exclusive_but_a_dead_owner_is_taken_over(tmp_path):
    workdir = str(tmp_path / "run")
    assert sweep.claim(workdir) and sweep.claim(workdir)  # re-entrant for its owner
    lock = os.path.join(workdir, sweep.LOCK_FILE)
    host = json.load(open(lock))["host"]
    json.dump({"host": host, "pid": 1}, open(lock, "w"))  # a live process that is not us
    assert not sweep.claim(workdir)
    json.dump({"host": host, "pid": 2**22 + 7}, open(lock, "w"))  # no such process
    assert sweep.claim(workdir)
    sweep.release(workdir)
    assert not os.path.exists(lock)


# ---- A tiny grid end to end ---------------------------------------------------------------------


@pytest.fixture
def tiny_args(fashion_dir):
    """CLI overrides: the tiny test ViT on real Fashion-MNIST, 3 steps, evaluated at 2 and 3."""
    overrides = config_kit.tiny_fields(
        fashion_dir, **{"budget.steps": 3, "eval_every_steps": 2, "log_every_steps": 1}
    )
    del overrides["checkpoint_every_steps"]
    args = ["--config", FASHION_CONFIG, "--methods", "base,adc", "--xi", "0.25", "--seeds", "0"]
    return args + config_kit.as_flags(overrides)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_tiny_grid_runs_skips_resumes_and_plots(tiny_args, tmp_path, capsys, monkeypatch):
    root = str(tmp_path / "sweep")
    assert sweep.main(["run", *tiny_args, "--root", root, "--dry_run"]) == 0
    assert "base-xi1-s0" in capsys.readouterr().out and not os.path.exists(root)

    assert sweep.main(["run", *tiny_args, "--root", root]) == 0
    out = capsys.readouterr().out
    assert "[1/2] base-xi1-s0: started" in out and "[2/2] adc-xi0.25-s0: finished" in out
    for name in ("base-xi1-s0", "adc-xi0.25-s0"):
        recorded = json.load(open(os.path.join(root, name, "sweep.json")))
        summary = json.load(open(os.path.join(root, name, "summary.json")))
        assert summary["steps"] == 3 and recorded["xi_paper"] == summary["xi_nominal"]
        assert not os.path.exists(os.path.join(root, name, sweep.LOCK_FILE))
    assert recorded["method"] == "adc" and recorded["knobs"] == {"xi": 0.25}

    # Finished runs are skipped without training; a run without its summary is run again and
    # resumes from its final checkpoint (it only re-evaluates).
    os.remove(os.path.join(root, "adc-xi0.25-s0", "summary.json"))
    from adc_jax import train

    calls = []
    real = train.train_and_evaluate
    monkeypatch.setattr(train, "train_and_evaluate", lambda c, w: calls.append(w) or real(c, w))
    assert sweep.main(["run", *tiny_args, "--root", root]) == 0
    out = capsys.readouterr().out
    assert "base-xi1-s0: skipped" in out and "adc-xi0.25-s0: finished" in out
    assert [os.path.basename(w) for w in calls] == ["adc-xi0.25-s0"]
    summary = json.load(open(os.path.join(root, "adc-xi0.25-s0", "summary.json")))
    assert summary["resumed_from_step"] == 3

    # Figures and tables.
    out_prefix = str(tmp_path / "docs" / "tiny")
    assert sweep.main(["plot", "--root", root, "--out", out_prefix]) == 0
    for suffix in ("accuracy", "bytes"):
        with open(f"{out_prefix}_{suffix}.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        rows = read_csv(f"{out_prefix}_{suffix}.csv")
        assert [(r["method"], float(r["xi_target"])) for r in rows] == [
            ("base", 1.0),
            ("adc", 0.25),
        ]
        assert all(int(r["steps"]) == 3 and int(r["n_seeds"]) == 1 for r in rows)
        assert float(rows[1]["xi_paper"]) == 0.25 and 0 < float(rows[1]["xi_measured"]) < 1
        table = open(f"{out_prefix}_{suffix}.md").read()
        assert "| Base | 1 | 1.0000 | 1.0000 |" in table and "| ADC | 0.25 | 0.2500 |" in table
    # The bytes figure reads the evaluation rows: steps 2 and 3, the resumed re-evaluation once.
    run = plots.load_run(os.path.join(root, "adc-xi0.25-s0"))
    assert [s for s, _, _ in run.curve] == [2, 3]


# ---- Plots from synthetic runs (seeds, the paper's reference) ------------------------------


def test_plots_average_seeds_and_draw_the_paper_reference(tmp_path):
    root = str(tmp_path / "runs")
    for seed, (base, adc) in enumerate([(0.80, 0.70), (0.82, 0.74)]):
        config_kit.fake_run(root, "base", 1.0, seed, base)
        config_kit.fake_run(root, "adc", 0.1, seed, adc)
    config_kit.fake_run(root, "topk", 0.1, 0, 0.6)
    os.makedirs(os.path.join(root, "c3sl-xi0.1-s0"))  # started, never finished
    open(os.path.join(root, "c3sl-xi0.1-s0", "sweep.json"), "w").write("{}")

    with open(os.path.join(root, "sweep_command.txt"), "w") as f:  # a resumed sweep, then more
        f.write("sweep run --seeds 0\nsweep run --seeds 0\nsweep run --seeds 1\n")

    written = plots.plot_sweep(root, str(tmp_path / "out" / "fig"), bytes_runs=["adc"])
    assert len(written) == 6
    rows = read_csv(tmp_path / "out" / "fig_accuracy.csv")
    assert [r["method"] for r in rows] == ["base", "adc", "topk"]
    assert float(rows[1]["accuracy_mean"]) == pytest.approx(0.72)
    assert float(rows[1]["accuracy_std"]) == pytest.approx(math.sqrt(2) * 0.02)
    assert [int(r["n_seeds"]) for r in rows] == [2, 2, 1]
    table = (tmp_path / "out" / "fig_accuracy.md").read_text()
    assert "| ADC | 0.1 | 0.1000 | 0.1100 | 0.7200 ± 0.0283 | 2 |" in table
    assert "| Top-K | 0.1 | 0.1000 | 0.1100 | 0.6000 | 1 |" in table  # no spread for one seed
    assert "paper" in table and "| ADC | 0.1 | 0.771 |" in table and "| Top-K | 0.136 |" in table
    assert "Unfinished (not plotted): `c3sl-xi0.1-s0`" in table
    assert "```\nsweep run --seeds 0\nsweep run --seeds 1\n```" in table
    assert [r["method"] for r in read_csv(tmp_path / "out" / "fig_bytes.csv")] == ["adc"]


def test_paper_reference_only_for_the_papers_settings():
    assert paper.reference("deit_small_patch16_224", "food101")["adc"][0.1] == 0.787
    assert paper.reference("deit_tiny_patch16_224", "cifar100")["baselines"]["c3sl"] == (
        0.125,
        0.589,
    )
    assert paper.reference("vit_mini_patch4_28", "fashion_mnist") is None


def test_xi_ticks_do_not_overlap():
    # BottleNet++ and quantisation land at ξ 0.0938 beside ADC's 0.1: one tick, the round one.
    assert plots._readable_ticks([0.5, 0.1, 0.0938, 0.125, 0.25, 0.1]) == [0.1, 0.125, 0.25, 0.5]
    assert plots._readable_ticks([0.01, 0.1, 1.0]) == [0.01, 0.1, 1.0]


def test_command_line_takes_train_py_config_flags_and_refuses_bad_ones(capsys):
    args = ["run", "--config", FASHION_CONFIG, "--root", "unused", "--dry_run", "--xi", "0.5"]
    assert sweep.main([*args, "--config.batch_size=64", "--methods", "c3sl"]) == 0
    assert "c3sl-xi0.5-s0" in capsys.readouterr().out
    assert sweep.main([*args, "--config.budget.epochs=1"]) == 2
    assert 'Did you mean "max_epochs"' in capsys.readouterr().err
    assert sweep.main(["run", "--root", "unused"]) == 2
    assert "run needs --config" in capsys.readouterr().err
    assert sweep.main(["run", "--config", "configs/missing.py", "--root", "unused"]) == 2
    assert "missing.py" in capsys.readouterr().err
