"""The paper's numbers, grids and protocol, in one place.

Alvetreti, Pomponi, Di Lorenzo, Scardapane, *Communication Efficient Split Learning of ViTs with
Attention-based Double Compression* (arXiv 2509.15058, EUSIPCO 2026), and the authors' two public
code bases: the research code (``Federico-Alvetreti/Split-Learning_ADC``) and the release that
produced the paper's figures (``Federico-Alvetreti/Attention-based-Double-Compression``,
``scripts/run_paper_experiments.sh``). ``docs/paper_protocol.md`` explains where the two code
bases differ from the paper's text and which behaviour each config reproduces.

Everything else in the project (configs, :mod:`adc_jax.sweep`'s ``--preset paper``,
:mod:`adc_jax.plots`) reads these constants instead of repeating them.
"""

from __future__ import annotations

from typing import Any

# ---- Results (final test accuracy, read off the paper's figures, ±0.005) ----------------------

XI_GRID = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)

# (model, dataset) → Base and ADC's final test accuracy at XI_GRID.
RESULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("deit_tiny_patch16_224", "cifar100"): {
        "base": 0.825,
        "adc": dict(zip(XI_GRID, (0.665, 0.713, 0.771, 0.807, 0.819, 0.822, 0.824), strict=True)),
    },
    ("deit_small_patch16_224", "cifar100"): {
        "base": 0.864,
        "adc": dict(zip(XI_GRID, (0.735, 0.771, 0.804, 0.844, 0.853, 0.860, 0.858), strict=True)),
    },
    ("deit_tiny_patch16_224", "food101"): {
        "base": 0.812,
        "adc": dict(zip(XI_GRID, (0.607, 0.664, 0.736, 0.789, 0.808, 0.813, 0.815), strict=True)),
    },
    ("deit_small_patch16_224", "food101"): {
        "base": 0.839,
        "adc": dict(zip(XI_GRID, (0.714, 0.745, 0.787, 0.821, 0.834, 0.841, 0.841), strict=True)),
    },
}

# The baselines the paper quotes (CIFAR-100, DeiT-T only): method → (ξ, accuracy).
BASELINES: dict[tuple[str, str], dict[str, tuple[float, float]]] = {
    ("deit_tiny_patch16_224", "cifar100"): {
        "topk": (0.136, 0.739),
        "randtopk": (0.136, 0.668),
        "c3sl": (0.125, 0.589),
        "bottlenet": (0.1, 0.629),
    },
}


def reference(model: str, dataset: str) -> dict[str, Any] | None:
    """The paper's Base/ADC numbers (and baselines, where given) for a setting, or ``None``."""
    results = RESULTS.get((model, dataset))
    if results is None:
        return None
    return {**results, "baselines": BASELINES.get((model, dataset), {})}


def results_line(model: str, dataset: str) -> str:
    """One line of the paper's numbers for a setting, for config docstrings and logs."""
    ref = reference(model, dataset)
    if ref is None:
        return f"The paper reports no numbers for {model} on {dataset}."
    adc = ", ".join(f"{xi:g} {acc:.3f}" for xi, acc in ref["adc"].items())
    return f"Paper (final test accuracy): Base {ref['base']:.3f}; ADC at ξ = {adc}."


# ---- The authors' grids -------------------------------------------------------------------------

# method → (config.method field, the values the authors swept). The release's
# run_paper_experiments.sh for every method but quantisation, which only the research code
# swept (slurm/bash/quantization.sh); FedLite is in neither paper sweep.
GRIDS: dict[str, tuple[str, tuple[float, ...]]] = {
    "adc": ("xi", XI_GRID),
    "c3sl": ("ratio", (2, 4, 8, 16, 32)),
    "topk": ("rate", XI_GRID),
    "randtopk": ("rate", XI_GRID),
    "bottlenet": ("compression", XI_GRID),
    "quantize": ("bits", (1, 3, 5, 6, 9, 12, 15)),
}

# ---- The baselines as the authors ran them ------------------------------------------------------

# config.method fields of the paper configs: the reference behaviour of each baseline, and a
# default knob on the authors' grid near ADC's ξ = 0.1 (C3-SL's R = 8 is the authors' default).
REFERENCE_METHOD_OPTIONS: dict[str, Any] = {
    "key_kind": "gaussian",  # C3-SL: Gaussian keys rescaled to unit norm
    "relu_output": True,  # BottleNet++: the decoder ends with a ReLU
    "weight_init": "torch",  # BottleNet++: PyTorch nn.Linear initialisation
    "ratio": 8,  # C3-SL: R
    "compression": 0.1,  # BottleNet++: D'/D
    "rate": 0.1,  # Top-K / Random Top-K
    "alpha": 0.1,  # Random Top-K: mass off the top entries
    "bits": 3,  # quantisation (ξ = 3/32)
}

# ---- The release code's protocol, where it differs from the paper's text -------------------------

RELEASE = {
    "split": "release",  # ADC: T/B = √ξ, k/N = ξ^(1/4) — sends ξ^(3/4), budgets ξ
    "max_iters": 500,  # K-means iterations at most (the research code and the paper: 50)
    "max_epochs": 100.0,  # a cap on passes over the training data, on top of the budget
    "food101_batch_size": 256,  # its Food-101 config (the paper says 128)
}
