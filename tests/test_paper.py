"""The paper's protocol: its configs' method defaults, the release variant, the epoch cap."""

import math
import os

import config_kit
import pytest

from adc_jax import paper, train
from adc_jax.methods import CutShape, method_from_config, step_cost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_CONFIGS = ("deit_t_cifar100", "deit_s_cifar100", "deit_t_food101", "deit_s_food101")


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_run_the_baselines_as_the_authors_did(name):
    config = config_kit.load(name)
    method = config.method
    assert (method.name, method.xi, method.split, method.max_iters) == ("adc", 0.1, "sqrt", 50)
    assert method.key_kind == "gaussian"  # C3-SL's reference keys
    assert method.relu_output and method.weight_init == "torch"  # BottleNet++ as the reference
    assert (method.ratio, method.compression, method.rate, method.bits) == (8, 0.1, 0.1, 3)
    # Each default knob is a point of the authors' grid.
    for field, value in (("ratio", 8), ("compression", 0.1), ("rate", 0.1), ("bits", 3)):
        assert any(f == field and value in grid for f, grid in paper.GRIDS.values())
    assert (config.batch_size, config.budget.base_epochs, config.budget.max_epochs) == (128, 10, 0)
    for m in ("c3sl", "bottlenet", "topk", "randtopk", "quantize"):
        config.method.name = m
        method_from_config(config.method).validate(CutShape(128, 197, 192, 100))


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_release_variant_follows_the_release_code(name):
    config = config_kit.load(name, "release")
    assert (config.method.split, config.method.max_iters) == ("release", 500)
    assert config.budget.max_epochs == 100
    assert config.batch_size == (256 if "food101" in name else 128)
    with pytest.raises(ValueError, match="release"):
        config_kit.load(name, "relase")


def _schedule(config, method_name, xi, train_size):
    config.method.name, config.method.xi = method_name, xi
    cut = CutShape(config.batch_size, 197, 192, 100)
    return train.plan_steps(config, step_cost(method_from_config(config.method), cut), train_size)


def test_epoch_cap_stops_a_run_at_the_right_step():
    config = config_kit.load("deit_t_cifar100", "release")
    per_epoch = 50_000 // 128  # 390 full batches
    # 10 epochs of Base, counted as ξ·B per step: ξ = 0.05 wants 200 epochs, ξ = 0.01 1000.
    for xi in (0.05, 0.01):
        budgeted = math.floor(10 * 50_000 / (xi * 128))
        assert budgeted > 100 * per_epoch
        assert _schedule(config, "adc", xi, 50_000).total_steps == 100 * per_epoch
    # Within the cap, the budget decides.
    assert _schedule(config, "adc", 0.5, 50_000).total_steps == math.floor(10 * 50_000 / 64)
    config.budget.max_epochs = 2.5
    assert _schedule(config, "base", 1.0, 50_000).total_steps == math.floor(2.5 * per_epoch)
    config.budget.max_epochs = 0.0  # no cap: the paper's protocol
    assert _schedule(config, "adc", 0.01, 50_000).total_steps == math.floor(
        10 * 50_000 / (0.01 * 128)
    )


def test_release_sizes_are_budgeted_at_the_nominal_xi():
    config = config_kit.load("deit_t_cifar100", "release")
    cost = step_cost(method_from_config(config.method), CutShape(128, 197, 192, 100))
    assert cost.xi_paper == 0.1  # what the release code counts
    # What it sends: T = 40 of 128 samples, k = 110 of 197 tokens, ≈ ξ^(3/4).
    assert cost.uplink["activations"] == 40 * 110 * 192 * 4
    assert cost.xi_measured == pytest.approx(40 * 110 / (128 * 197), rel=0.01)


def test_results_line_names_the_numbers():
    line = paper.results_line("deit_tiny_patch16_224", "cifar100")
    assert "Base 0.825" in line and "0.1 0.771" in line
    assert "no numbers" in paper.results_line("vit_mini_patch4_28", "fashion_mnist")
