"""Test set-up: 8 simulated CPU devices and strict rank promotion, before JAX starts."""
import os

import xla_env

os.environ.setdefault("XLA_FLAGS", xla_env.xla_flags(8))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# gdistill's XLA CPU flags (gdistill/runtime.py) make the test processes slower: at
# --xla_backend_optimization_level=0 XLA's own convolution kernels are unoptimized, YNNPACK's
# are prebuilt (tests/test_text_to_image.py: 446 s with them, 348 s without). Off with
# FAST_COMPILE (subprocesses inherit it); their own test strips the variable.
if xla_env.FAST_COMPILE:
  os.environ.setdefault("GDISTILL_XLA_CPU_DEFAULTS", "0")
else:
  from gdistill import runtime  # noqa: E402  (imports no JAX)
  runtime.configure_xla_cpu()  # the XLA CPU flags of a user's run (gdistill.main applies them)

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")

# Tests compile the same quick-config steps many times (resume, kill, compare): share them.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("GDISTILL_TEST_XLA_CACHE", "/tmp/gdistill_test_xla_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# The longest files first: with one file per worker at a time (--dist loadfile), a long file
# that starts last decides the wall-clock time. pytest-xdist hands out files in this order
# only with --no-loadscope-reorder (pyproject.toml); by default it sorts them by their number
# of tests, which started the README pipeline (test_cli.py, 4 tests) last.
LONGEST_FIRST = ("test_text_to_image.py", "test_cli.py", "test_inpainting.py",
                 "test_text_models.py", "test_reliability.py", "test_performance.py",
                 "test_evaluate.py")


def pytest_collection_modifyitems(items):
  def rank(item):
    name = item.path.name
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
  items.sort(key=rank)  # stable: the order inside each file is kept
