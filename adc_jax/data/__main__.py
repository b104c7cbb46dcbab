"""``python -m adc_jax.data``: see :mod:`adc_jax.data.cli`."""

import sys

from adc_jax.data.cli import main

sys.exit(main())
