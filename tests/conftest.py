"""Test setup: 8 simulated CPU devices, so the multi-device paths run on any machine.

The flag must be set before JAX initialises its backends; conftest runs before test modules
import jax. Single-device tests are unaffected: they run on device 0.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
