"""Every test process sees 8 simulated CPU devices, so mesh tests run in-process. On a GPU (bench/device_check.sh)
fp32 matmuls run at full precision: JAX's GPU default (TF32) is ~1e-3 off, and the parity tolerances are fp32's."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def pytest_configure(config):
  del config
  import jax
  if jax.default_backend() != "cpu":
    jax.config.update("jax_default_matmul_precision", "highest")
