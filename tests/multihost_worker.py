"""One process of the loopback multi-process test (tests/test_multihost.py).

Usage: python multihost_worker.py DATA_DIR WORKDIR. With ADC_PROCESS_ID set it joins a
`jax.distributed` job (coordinator and process count from the environment).
"""

import json
import os
import sys

import config_kit

from adc_jax import train

config = config_kit.tiny_config(
    sys.argv[1], **{"budget.steps": 4, "checkpoint_every_steps": 2, "devices.count": 0}
)
config.distributed = "ADC_PROCESS_ID" in os.environ
summary = train.train_and_evaluate(config, sys.argv[2])
print(
    "SUMMARY "
    + json.dumps({"test_accuracy": summary["test_accuracy"], "num_devices": summary["num_devices"]})
)
