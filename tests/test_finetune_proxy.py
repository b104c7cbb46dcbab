"""The fine-tuning experiment's driver: its runs, the stacked runs' byte budget, the report."""

import json
import os

import config_kit
import pytest

from adc_jax import finetune_proxy as proxy


@pytest.mark.slow
def test_the_runs_of_every_part(fashion_dir, tmp_path, capsys):
    assert proxy.run_all(str(tmp_path), [0, 1], data_dir=str(fashion_dir), dry_run=True) == 0
    out = capsys.readouterr().out
    # Base once per seed, then 6 methods × 5 ξ × 2 seeds; the stacked runs wait for the grid.
    assert "grid: 62 runs" in out and "stacked: 0 runs" in out
    assert "ablation: 10 runs" in out and "uncapped: 2 runs" in out
    for name in ("base-xi1-s1", "c3sl-xi0.01-s0", "adc-merge-xi0.05-s0", "adc-uncapped-xi0.01-s0"):
        assert f"  {name}\n" in out
    config = proxy.load("", str(fashion_dir))
    assert (config.dataset.classes, config.dataset.train_examples) == ("5-9", 2500)
    assert config.model.fresh_head and config.budget.max_epochs == 10 * config.budget.base_epochs
    assert proxy.load("pretrain").method.name == "base"


@pytest.mark.slow
def test_stacked_runs_spend_the_bytes_of_adc_in_float32(fashion_dir, tmp_path):
    config = proxy.load("", str(fashion_dir))
    grid = tmp_path / "grid"
    config_kit.fake_run(str(grid), "adc", 0.05, 0, 0.7)
    summary = json.loads((grid / "adc-xi0.05-s0" / "summary.json").read_text())
    runs = proxy.stacked_runs(config, str(grid), seeds=[0, 1])  # seed 1 has no float32 run yet
    assert [r.name for r in runs] == ["adc-bfloat16-xi0.1-as0.05-s0", "adc-int8-xi0.2-as0.05-s0"]
    for run, link in zip(runs, ("bfloat16", "int8"), strict=True):
        built = run.config(config)
        assert built.link.uplink.kind == built.link.downlink.kind == link
        assert built.budget.bytes == summary["bytes_up"] + summary["bytes_down"]
    assert runs[1].config(config).method.xi == pytest.approx(0.2)


def test_report_draws_the_grid_and_tabulates_the_variants(tmp_path):
    root = str(tmp_path)
    for seed, (base, adc) in enumerate(((0.9, 0.8), (0.92, 0.82))):
        config_kit.fake_run(os.path.join(root, "grid"), "base", 1.0, seed, base)
        config_kit.fake_run(os.path.join(root, "grid"), "adc", 0.1, seed, adc)
    config_kit.fake_run(
        os.path.join(root, "stacked"), "adc", 0.4, 0, 0.85, name="adc-int8-xi0.4-as0.1-s0"
    )
    figure, tables = proxy.report(root, str(tmp_path / "docs" / "proxy"))
    with open(figure, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    text = open(tables).read()
    assert "| ADC | 0.1 |" in text and "0.8100 ± 0.0141" in text
    assert "## stacked" in text and "| adc-int8-xi0.4-as0.1 | 0.4400 | 0.8500 | 1 |" in text
