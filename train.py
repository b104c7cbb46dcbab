r"""Trains a split ViT with ADC (or a baseline) from a config file.

    python train.py --config configs/vit_fashion_mnist.py [--workdir runs/fmnist] \
        [--config.method.xi=0.1]

Errors a user can fix (config, data, workdir, checkpoint, disk) print one paragraph and exit 1;
``--verbose`` (or ``ADC_JAX_VERBOSE=1``) shows the traceback. SIGINT and SIGTERM save a
checkpoint at the next step boundary and exit 130 and 143 (docs/runs.md).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from adc_jax import runs, train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Output directory (default: runs/<config>-<method>[-xi<ξ>]-s<seed>-<fingerprint>).",
)
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks of errors a user can fix.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _VERBOSE.value:
        os.environ["ADC_JAX_VERBOSE"] = "1"
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    config_path = config_flags.get_config_filename(flags.FLAGS["config"])
    workdir = _WORKDIR.value or train.default_workdir(config_path, _CONFIG.value)
    sys.exit(runs.run_command(lambda: train.train_and_evaluate(_CONFIG.value, workdir)))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
