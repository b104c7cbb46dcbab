r"""DeiT-Small on CIFAR-100 with ADC, as in the paper.

ImageNet-pretrained `deit_small_patch16_224` (timm/deit_small_patch16_224.fb_in1k)
with a new head, split after block 3, batch 128, Adam 1e-4, RandAugment + ColorJitter + resize
to 224 + flip, a budget of 10 epochs of Base counted as ξ·B sample-equivalents per step,
evaluation uncompressed; the baselines as the authors ran them (docs/paper_protocol.md).

    python -m adc_jax.data prepare cifar100
    python train.py --config configs/deit_s_cifar100.py --config.method.xi=0.1
    python train.py --config configs/deit_s_cifar100.py --config.method.name=base
    python -m adc_jax.sweep run --config configs/deit_s_cifar100.py \
        --preset paper --root runs/deit_s_cifar100

The paper's numbers for this setting are in `adc_jax/paper.py` (`RESULTS`); this project has not
reproduced them (it needs an accelerator: hours on one GPU/TPU per run). `:release` follows the
authors' release code instead (ADC sizes T/B = √ξ, k/N = ξ^(1/4), 500 K-means iterations, a
100-epoch cap); `:runlocal` swaps in a tiny model and a few steps to check the code path on a CPU.
"""

from adc_jax.defaults import paper_config


def get_config(arg=None):
    return paper_config("deit_small_patch16_224", "cifar100", arg)
