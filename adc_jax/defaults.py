"""The fields every experiment config has, with their defaults and meaning.

Experiment files under ``configs/`` start from :func:`default_config` and change what differs, so
a locked config always has every field and a misspelt ``--config.x=...`` override fails loudly.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections


def channel_config(kind: str = "identity") -> ml_collections.ConfigDict:
    """One direction of the link (see :class:`adc_jax.link.Channel`)."""
    return ml_collections.ConfigDict(
        {
            "kind": kind,  # identity | bfloat16 | int8 | quantize | awgn
            "bits": 8,  # quantize: bits per value
            "snr_min_db": 10.0,  # awgn: SNR drawn uniformly in [min, max] dB per transmission
            "snr_max_db": 10.0,
        }
    )


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.name = "vit_mini_patch4_28"  # a name from adc_jax.vit.MODELS
    c.model.split_index = 2  # l: the client holds blocks 1..l
    # '' trains from scratch; else a local .safetensors path or a hub id such as
    # 'timm/deit_tiny_patch16_224.fb_in1k' (the head is replaced for the dataset's classes).
    c.model.pretrained = ""
    c.model.fresh_head = False  # a new head even when the class count is the checkpoint's
    # Compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU) | float32 | bfloat16. Parameters,
    # optimiser state, logits and loss stay float32; the tokens sent across the cut (and the
    # gradient sent back) are in this dtype, and the byte counts follow it.
    c.model.dtype = "auto"
    # Attention of the blocks that do not return the CLS row: auto (cuDNN's fused kernel on a GPU
    # in bfloat16, else XLA) | xla | cudnn (adc_jax.vit.dot_product_attention).
    c.model.attention = "auto"

    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = "fashion_mnist"  # fashion_mnist | cifar10 | cifar100 | food101
    c.dataset.data_dir = ""  # tfds data_dir; '' = tfds' default (~/tensorflow_datasets)
    c.dataset.source_dir = ""  # raw files to prepare from ('' = the dataset's default place)
    # '' = every class; else e.g. '5-9' or '0,2,4': train and evaluate on these classes only,
    # relabelled 0..k-1 in that order (fine-tuning on classes a pretrained model has not seen).
    c.dataset.classes = ""
    c.dataset.train_examples = 0  # > 0: train on the first N examples (of those classes) only
    c.dataset.augment = False  # RandAugment(2, 9) + ColorJitter(0.4, 0.4, 0.4) + flip (paper)

    c.method = ml_collections.ConfigDict()
    # base | adc | c3sl | bottlenet | topk | randtopk | quantize | fedlite
    c.method.name = "adc"
    # Method options; each method reads the fields that match its own (adc_jax.methods).
    c.method.xi = 0.25  # adc: compression ratio T·k/(B·N)
    # adc: sqrt (T/B = k/N = √ξ) | fifth (T/B = ξ^(1/5), k/N = ξ^(4/5)) | release (T/B = √ξ,
    # k/N = ξ^(1/4): the authors' release code, which sends ξ^(3/4) while budgeting ξ)
    c.method.split = "sqrt"
    # adc: T/B and k/N given apart (both > 0) instead of xi, e.g. to merge samples only
    # (token_ratio = 1) or keep tokens only (batch_ratio = 1); 0 = from xi
    c.method.batch_ratio = 0.0
    c.method.token_ratio = 0.0
    c.method.max_iters = 50  # adc / fedlite: Lloyd iterations at most
    c.method.ratio = 4  # c3sl: R samples superposed into one
    c.method.key_kind = "unitary"  # c3sl: unitary (exact inverse at R = 1) | gaussian (reference)
    c.method.compression = 0.25  # bottlenet: D'/D
    c.method.relu_output = False  # bottlenet: paper-faithful final ReLU on the decoder
    c.method.weight_init = "flax"  # bottlenet: flax (LeCun normal) | torch (the reference's)
    c.method.rate = 0.1  # topk / randtopk: fraction r of the N·D values kept per sample
    c.method.alpha = 0.1  # randtopk: probability mass on the non-top entries
    c.method.bits = 8  # quantize: bits per value
    c.method.num_subvectors = 64  # fedlite: q sub-vectors per flattened activation
    c.method.num_centroids = 16  # fedlite: L centroids per group
    c.method.num_groups = 1  # fedlite: R groups of sub-vector positions
    c.method.correction = 5e-5  # fedlite: λ of the gradient correction λ(x − x̃)

    c.link = ml_collections.ConfigDict()
    c.link.uplink = channel_config()
    c.link.downlink = channel_config()

    c.batch_size = 128  # global batch; must divide among the devices (and by c3sl's R)
    c.seed = 0

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1e-3  # Adam, no weight decay, no schedule (paper)
    c.optimizer.eps = 1e-8

    c.budget = ml_collections.ConfigDict()
    # Paper protocol: stop when the sample-equivalents (ξ·B per step) would exceed this many
    # epochs of uncompressed training.
    c.budget.base_epochs = 2.0
    c.budget.bytes = 0  # > 0: stop at this many bytes (uplink + downlink) instead
    c.budget.steps = 0  # > 0: exactly this many steps instead
    c.budget.max_steps = 0  # > 0: a hard cap on top of the budget (quick runs)
    # > 0: also stop after this many passes over the training data (the authors' release code
    # caps at 100, which cuts the smallest ξ short of their budget).
    c.budget.max_epochs = 0.0

    c.log_every_steps = 50
    # > 0: summary.json reports seconds_to_target, the wall time of the first evaluation whose
    # test accuracy reaches it (null if none does).
    c.target_accuracy = 0.0
    c.eval_every_steps = 0  # 0 = every epoch-equivalent of the budget (and always at the end)
    c.checkpoint_every_steps = 500  # also at the end; a restarted run resumes from the last
    # A workdir holds one experiment: resuming with other defining fields is refused unless they
    # are named here, comma-separated, e.g. "budget" or "optimizer.learning_rate" (docs/runs.md).
    c.allow_changes = ""
    c.eval_batch_size = 512  # divides among 1, 2, 4, 8, … devices; the last batch is padded

    c.devices = ml_collections.ConfigDict()
    c.devices.count = 0  # local devices to use; 0 = all
    c.devices.per_client = False  # True: every device is a client that compresses its own batch
    c.fused_step = False  # one program per step instead of the three-message protocol

    # Client and server as separate processes over gRPC (python -m adc_jax.net; docs/network.md).
    c.net = ml_collections.ConfigDict()
    c.net.num_clients = 1  # clients of one server; client i reads slice i of every global batch
    c.net.sync_every = 0  # > 0: average the client halves through the server this often (SplitFed)
    c.net.sync_timeout = 60.0  # seconds a sync round waits for missing clients, then averages
    c.net.rpc_timeout = 60.0  # seconds per call, plus its bytes' time on a shaped link
    c.net.retry_seconds = 300.0  # a client gives up after this long without a successful call
    c.net.idle_timeout = 600.0  # the server stops after this long without a request
    # The client's link to the server, shaped in its transport: Mbit/s (0 = unlimited) and
    # one-way latency in milliseconds, per direction.
    c.net.up_mbps = 0.0
    c.net.down_mbps = 0.0
    c.net.up_latency_ms = 0.0
    c.net.down_latency_ms = 0.0
    c.net.max_train_seconds = 0.0  # > 0: a client stops training after this much training time
    c.net.eval_every_seconds = 0.0  # > 0: evaluate each time this much training time has passed
    c.distributed = False  # call jax.distributed.initialize() (multi-host TPU/GPU)
    c.progress = True  # a progress bar on stderr
    # TensorBoard event files beside metrics.jsonl, when tensorboardX is installed
    # (pip install 'adc-jax[tensorboard]'); skipped silently when it is not.
    c.tensorboard = True
    return c


def paper_config(model: str, dataset: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """The paper's protocol for a timm DeiT on a dataset (see ``docs/paper_protocol.md``).

    ImageNet-pretrained weights with a new head, split after block 3, batch 128, Adam 1e-4,
    RandAugment + ColorJitter + resize + flip, a budget of 10 Base epochs, ADC at ξ = 0.1, and
    the baselines as the authors ran them (:data:`adc_jax.paper.REFERENCE_METHOD_OPTIONS`).

    ``arg``: ``"release"`` reproduces the authors' release code instead (ADC's ``release``
    split, 500 K-means iterations, a 100-epoch cap, batch 256 on Food-101); ``"runlocal"``
    keeps the code path but swaps in the tiny test ViT and a few steps.
    """
    from adc_jax import paper

    c = default_config()
    c.model.name = model
    c.model.pretrained = f"timm/{model}.fb_in1k"
    c.model.split_index = 3
    c.dataset.name = dataset
    c.dataset.augment = True
    c.method.name = "adc"
    c.method.xi = 0.1
    c.method.update(paper.REFERENCE_METHOD_OPTIONS)
    c.batch_size = 128
    c.optimizer.learning_rate = 1e-4
    c.budget.base_epochs = 10.0
    c.log_every_steps = 100
    c.checkpoint_every_steps = 1000
    if arg == "release":
        c.method.split = paper.RELEASE["split"]
        c.method.max_iters = paper.RELEASE["max_iters"]
        c.budget.max_epochs = paper.RELEASE["max_epochs"]
        if dataset == "food101":
            c.batch_size = paper.RELEASE["food101_batch_size"]
    elif arg == "runlocal":
        c.model.name = "vit_test_patch4_16"
        c.model.pretrained = ""
        c.model.split_index = 2
        c.batch_size = 16
        c.eval_batch_size = 16
        c.budget.max_steps = 4
        c.log_every_steps = 2
    elif arg:
        raise ValueError(
            f"Unknown config argument {arg!r}; expected 'release', 'runlocal' or none."
        )
    return c


def load_config(spec: str) -> ml_collections.ConfigDict:
    """``path/to/config.py`` or ``path/to/config.py:arg`` → that file's ``get_config(arg)``.

    For code and notebooks; command lines load configs with ``--config`` flags (and
    ``--config.x=...`` overrides) instead.
    """
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"Config file {path!r} does not exist.")
    module_spec = importlib.util.spec_from_file_location("_adc_jax_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)
