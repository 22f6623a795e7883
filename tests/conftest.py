"""Every test sees 8 simulated CPU devices (set before JAX is imported) so mesh tests can run;
single-device tests build their mesh from ``jax.devices()[:1]``."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
