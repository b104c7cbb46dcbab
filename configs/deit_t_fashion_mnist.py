r"""DeiT-Tiny at 224 px on real Fashion-MNIST, split after block 3: ADC (ξ = 0.1) or Base.

For a GPU (or TPU): the model of the paper (`deit_tiny_patch16_224`, 12 blocks, D = 192,
N = 197 tokens) on data prepared offline from the four IDX files. The 28×28 grey images are
shipped to the device as uint8, resized to 224 there and tiled to three channels
(adc_jax.augment); the model is trained from scratch (nothing to download), in the compute dtype of
`model.dtype=auto` (bfloat16 on a GPU/TPU). The budget is the paper's protocol over 2 epochs of
Base: ADC at ξ = 0.1 gets 10× the steps of Base for the same communication.

    python train.py --config configs/deit_t_fashion_mnist.py                        # ADC ξ = 0.1
    python train.py --config configs/deit_t_fashion_mnist.py --config.method.name=base
    python train.py --config configs/deit_t_fashion_mnist.py:runlocal   # tiny model, 4 steps

Fine-tuning ImageNet weights instead (needs the internet once): add
`--config.model.pretrained=timm/deit_tiny_patch16_224.fb_in1k`
`--config.optimizer.learning_rate=1e-4`.

Expected results: not measured yet (test accuracy, images/s and time to `target_accuracy` come
from `benchmarks/gpu.sh` on a GPU). On the 2-core development CPU a DeiT-Tiny step at B = 128
takes seconds, so this config is not meant for a CPU.
"""

from adc_jax.defaults import default_config


def get_config(arg=None):
    c = default_config()
    c.model.name = "deit_tiny_patch16_224"
    c.model.split_index = 3
    c.dataset.name = "fashion_mnist"
    c.dataset.augment = False
    c.method.name = "adc"
    c.method.xi = 0.1
    c.batch_size = 128
    c.eval_batch_size = 1000
    # From scratch with Adam and no schedule (the paper's optimiser); 1e-3 suits the small
    # ViT of vit_fashion_mnist.py, a 12-block DeiT gets a smaller step.
    c.optimizer.learning_rate = 3e-4
    c.budget.base_epochs = 2.0
    c.target_accuracy = 0.8  # summary.json: seconds_to_target (both methods should reach it)
    c.log_every_steps = 50
    c.checkpoint_every_steps = 1000
    c.seed = 0
    if arg == "runlocal":
        c.model.name = "vit_test_patch4_16"  # 16 px RGB: the same resize and grey → RGB path
        c.model.split_index = 2
        c.batch_size = 16
        c.eval_batch_size = 1000
        c.budget.max_steps = 4
        c.log_every_steps = 2
    elif arg:
        raise ValueError(f"Unknown config argument {arg!r}; expected 'runlocal' or none.")
    return c
