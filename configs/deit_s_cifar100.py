r"""DeiT-Small on CIFAR-100 with ADC.

The paper's protocol (ADC_SPEC §4): ImageNet-pretrained `deit_small_patch16_224`
(timm/deit_small_patch16_224.fb_in1k), new head, split after
block 3, batch 128, Adam 1e-4, RandAugment + ColorJitter + resize to 224 + flip, a budget of 10
epochs of Base counted as ξ·B sample-equivalents per step, evaluation uncompressed.

    python -m adc_jax.data prepare cifar100
    python train.py --config configs/deit_s_cifar100.py --config.method.xi=0.1
    python train.py --config configs/deit_s_cifar100.py --config.method.name=base

Paper's final test accuracy (read off its figures, ±0.005): Base 0.864; ADC ξ=0.01 0.735, 0.05
0.771, 0.1 0.804, 0.2 0.844, 0.3 0.853, 0.4 0.860, 0.5 0.858.
Not yet reproduced by this project (it needs an accelerator: hours on one GPU/TPU per run).
`:runlocal` swaps in a tiny model and a few steps to check the code path on a CPU.
"""

from adc_jax.defaults import paper_config


def get_config(arg=None):
    return paper_config("deit_small_patch16_224", "cifar100", arg)
