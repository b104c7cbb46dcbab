r"""A small ViT trained from scratch on real Fashion-MNIST, split after block 2, ADC at ξ = 0.25.

The laptop-CPU experiment: it needs no accelerator, no download (Debian's
`dataset-fashion-mnist` files are used when present) and finishes in minutes.

    python train.py --config configs/vit_fashion_mnist.py
    python train.py --config configs/vit_fashion_mnist.py --config.method.name=base

Expected (README, "Results"): ADC ≥ 0.80 and Base ≥ 0.78 test accuracy after a budget of 2 Base
epochs, each in a few minutes on a 2-core CPU. `:runlocal` runs a few steps only.
"""

from adc_jax.defaults import default_config


def get_config(arg=None):
    c = default_config()
    c.model.name = "vit_mini_patch4_28"
    c.model.split_index = 2
    c.dataset.name = "fashion_mnist"
    c.dataset.augment = False
    c.method.name = "adc"
    c.method.xi = 0.25
    c.batch_size = 128
    c.optimizer.learning_rate = 1e-3
    c.budget.base_epochs = 2.0
    c.seed = 0
    if arg == "runlocal":
        c.budget.max_steps = 20
        c.log_every_steps = 5
    return c
