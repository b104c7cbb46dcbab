"""Split-learning methods behind one interface (see :mod:`adc_jax.methods.core`)."""

from __future__ import annotations

import dataclasses

from adc_jax.methods.adc import ADC
from adc_jax.methods.bottlenet import BottleNet
from adc_jax.methods.c3sl import C3SL
from adc_jax.methods.core import (
    CutShape,
    Method,
    Payload,
    StepCost,
    Unreachable,
    payload_shapes,
    step_cost,
)
from adc_jax.methods.fedlite import FedLite
from adc_jax.methods.quantize import Quantize
from adc_jax.methods.topk import RandTopK, TopK

Base = Method

METHODS: dict[str, type[Method]] = {
    "base": Base,
    "adc": ADC,
    "c3sl": C3SL,
    "bottlenet": BottleNet,
    "topk": TopK,
    "randtopk": RandTopK,
    "quantize": Quantize,
    "fedlite": FedLite,
}


def make_method(name: str, **kwargs) -> Method:
    """Builds a method by its config name with its hyper-parameters; clear error if unknown."""
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; expected one of {sorted(METHODS)}.")
    try:
        return METHODS[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"Bad options for method {name!r}: {e}") from e


def method_from_config(cfg) -> Method:
    """The method named ``cfg.name``, with the options of ``cfg`` that match its fields."""
    if cfg.name not in METHODS:
        raise ValueError(f"Unknown method {cfg.name!r}; expected one of {sorted(METHODS)}.")
    fields = {f.name for f in dataclasses.fields(METHODS[cfg.name])}
    return make_method(cfg.name, **{k: v for k, v in cfg.items() if k in fields})


__all__ = [
    "ADC",
    "C3SL",
    "METHODS",
    "Base",
    "BottleNet",
    "CutShape",
    "FedLite",
    "Method",
    "Payload",
    "Quantize",
    "RandTopK",
    "StepCost",
    "TopK",
    "Unreachable",
    "make_method",
    "method_from_config",
    "payload_shapes",
    "step_cost",
]
