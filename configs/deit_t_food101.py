r"""DeiT-Tiny on Food-101 with ADC.

The paper's protocol (ADC_SPEC §4): ImageNet-pretrained `deit_tiny_patch16_224`
(timm/deit_tiny_patch16_224.fb_in1k), new head, split after
block 3, batch 128, Adam 1e-4, RandAugment + ColorJitter + resize to 224 + flip, a budget of 10
epochs of Base counted as ξ·B sample-equivalents per step, evaluation uncompressed.

    python -m adc_jax.data prepare food101
    python train.py --config configs/deit_t_food101.py --config.method.xi=0.1
    python train.py --config configs/deit_t_food101.py --config.method.name=base

Paper's final test accuracy (read off its figures, ±0.005): Base 0.812; ADC ξ=0.01 0.607, 0.05
0.664, 0.1 0.736, 0.2 0.789, 0.3 0.808, 0.4 0.813, 0.5 0.815.
Not yet reproduced by this project (it needs an accelerator: hours on one GPU/TPU per run).
`:runlocal` swaps in a tiny model and a few steps to check the code path on a CPU.
"""

from adc_jax.defaults import paper_config


def get_config(arg=None):
    return paper_config("deit_tiny_patch16_224", "food101", arg)
