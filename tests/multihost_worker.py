"""One process of the loopback multi-process test (tests/test_multihost.py).

Usage: python multihost_worker.py DATA_DIR WORKDIR. With ADC_PROCESS_ID set it joins a
`jax.distributed` job (coordinator and process count from the environment).
"""

import importlib.util
import json
import os
import sys

from adc_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

spec = importlib.util.spec_from_file_location(
    "c", os.path.join(ROOT, "configs", "vit_fashion_mnist.py")
)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = module.get_config()
config.model.name = "vit_test_patch4_16"
config.dataset.data_dir = sys.argv[1]
config.batch_size = 16
config.eval_batch_size = 1000
config.budget.steps = 4
config.log_every_steps = 2
config.checkpoint_every_steps = 2
config.progress = False
config.distributed = "ADC_PROCESS_ID" in os.environ
summary = train.train_and_evaluate(config, sys.argv[2])
print(
    "SUMMARY "
    + json.dumps({"test_accuracy": summary["test_accuracy"], "num_devices": summary["num_devices"]})
)
