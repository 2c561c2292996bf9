"""Test set-up: 8 simulated CPU devices and strict rank promotion, before JAX starts."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")

# Tests compile the same quick-config steps many times (resume, kill, compare): share them.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("GDISTILL_TEST_XLA_CACHE", "/tmp/gdistill_test_xla_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
